"""Fixtures for kernel tests: a throwaway, unconnected network namespace per test."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest

from kproxy_nft.lab import Addressing, ClientSpec, Lab, PodSpec
from kproxy_nft.lab.netns import throwaway_netns
from kproxy_nft.model import ClusterState, IPFamily, NodeContext
from kproxy_nft.proxier.iptables import IptablesProxier

BACKENDS = ("nft", "legacy")


@pytest.fixture
def netns() -> Iterator[str]:
    """An empty network namespace `kpn-<random>`, deleted after the test even if it fails."""
    with throwaway_netns() as name:
        yield name


@contextmanager
def serving_lab(pods: Sequence[PodSpec], clients: Sequence[ClientSpec],
                addressing: Addressing | None = None) -> Iterator[Lab]:
    """A netlab with every pod's server started, torn down even if the test fails (skips without root)."""
    if os.geteuid() != 0:
        pytest.skip("netlab needs root")
    with Lab(pods, clients, addressing=addressing) as lab:
        lab.start_servers()
        yield lab


def run_in(ns: str, argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command inside a namespace (argument list, never a shell string)."""
    return subprocess.run(["ip", "netns", "exec", ns, *argv], input=stdin, capture_output=True, text=True)


def iptables_apply(netns: str, backend: str, state: ClusterState, node: NodeContext) -> None:
    """IPv4 rules for `state` in `netns`, as `kproxy-nft apply --proxy-mode iptables` puts them:
    the kernel read, planned against and changed in one restore (route_localnet set if needed)."""
    proxier = IptablesProxier(node, netns=netns, iptables_backend=backend, families=(IPFamily.V4,))
    proxier.apply(proxier.plan(state))
