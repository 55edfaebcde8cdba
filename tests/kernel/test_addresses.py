"""The node's interface addresses as the agent reads them (pyroute2, inside a namespace)."""

from __future__ import annotations

import pytest

from kproxy_nft.kernel.addresses import local_addresses
from tests.kernel.conftest import run_in

pytestmark = pytest.mark.kernel


def test_addresses_of_the_namespace_not_ours(netns: str) -> None:
    run_in(netns, ["ip", "link", "set", "lo", "up"])
    run_in(netns, ["ip", "link", "add", "kpn0", "type", "veth", "peer", "name", "kpn1"])
    run_in(netns, ["ip", "address", "add", "10.20.3.4/24", "dev", "kpn0"])
    found = local_addresses(netns)
    assert "10.20.3.4" in found and "127.0.0.1" in found
    assert "10.20.3.4" not in local_addresses()  # the caller's namespace is unchanged
