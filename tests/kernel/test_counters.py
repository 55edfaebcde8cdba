"""Per-endpoint connection counters (`kproxy-nft top`) against real connections, in every mode.

A netlab runs the seed's three pods; the seed's rules are programmed by each mode's proxier; N
fresh connections from testpod to 10.101.181.214:8080 must come back as N, split per endpoint
exactly as the pods saw them. A full sync afterwards must not reset the counts (the planner
reads the counters as kernel state, not as drift). With KPN_RECORD_COUNTERS=DIR the listings
read are written there (how tests/counters_recorded/ was made).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from kproxy_nft.cli import main
from kproxy_nft.config import ProxySettings
from kproxy_nft.kernel.counters import read_iptables_counters, read_nftables_listings
from kproxy_nft.kernel.iptables import open_host
from kproxy_nft.lab import ClientSpec, PodSpec
from kproxy_nft.model import IPFamily, NodeContext
from kproxy_nft.proxier import make_proxier
from kproxy_nft.sources.manifests import read_manifests
from tests.helpers import EXAMPLES
from tests.kernel.conftest import serving_lab

pytestmark = pytest.mark.kernel

NODE = NodeContext(hostname="docker-desktop", cluster_cidrs=("10.1.0.0/16",))
PODS = {"pod1": "10.1.0.47", "pod2": "10.1.0.48", "pod3": "10.1.0.49"}
VIP, PORT, CONNECTIONS = "10.101.181.214", 8080, 40


@pytest.mark.parametrize(("mode", "backend"), [("iptables", "nft"), ("iptables", "legacy"), ("nftables", None)],
                         ids=["iptables-nft", "iptables-legacy", "nftables"])
def test_counters_count_every_connection_per_endpoint(mode: str, backend: str | None) -> None:
    state = read_manifests([str(EXAMPLES)]).cluster_state()
    pods = [PodSpec(name, ip, tcp_ports=(80, 443)) for name, ip in PODS.items()]
    with serving_lab(pods, [ClientSpec("testpod", "10.1.0.50")]) as lab:
        proxier = make_proxier(ProxySettings(mode=mode, node=NODE), netns=lab.node_ns, iptables_backend=backend,
                               families=(IPFamily.V4,))
        try:
            proxier.sync(state, full=True)
            result = lab.probe("testpod", VIP, PORT, count=CONNECTIONS)
            assert not result.failures
            counted = proxier.connection_counts((IPFamily.V4,))
            _record(f"{mode}-{backend or 'nft'}", mode, lab.node_ns)
            proxier.sync(state, full=True)  # reads the kernel back: must see no drift, reset nothing
            again = proxier.connection_counts((IPFamily.V4,))
            shown = CliRunner().invoke(main, ["top", "--once", "-o", "json", "--netns", lab.node_ns])
        finally:
            proxier.close()
    assert counted is not None and again is not None
    (seed_port,) = [svc for svc in counted.services if svc.frontend == f"{VIP}:{PORT}/tcp"]
    assert {ep.address: ep.connections for ep in seed_port.endpoints} == {
        f"{PODS[pod]}:80": n for pod, n in result.counts().items()}
    assert seed_port.connections == CONNECTIONS
    others = [svc for svc in counted.services if svc is not seed_port]
    assert others and all(svc.connections == 0 for svc in others)  # nothing else was reached
    assert again.endpoint_counts() == counted.endpoint_counts()
    assert shown.exit_code == 0, shown.output
    document = json.loads(shown.output)
    assert document["mode"] == mode  # found without --proxy-mode
    (seed_json,) = [svc for svc in document["services"] if svc["frontend"] == f"{VIP}:{PORT}/tcp"]
    assert {ep["address"]: ep["connections"] for ep in seed_json["endpoints"]} == {
        ep.address: ep.connections for ep in seed_port.endpoints}


def _record(name: str, mode: str, netns: str) -> None:
    """With KPN_RECORD_COUNTERS=DIR, write the raw listings the counts were read from."""
    folder = os.environ.get("KPN_RECORD_COUNTERS")
    if not folder:
        return
    if mode == "nftables":
        listings = read_nftables_listings(netns, (IPFamily.V4,))
    else:
        listings = list(read_iptables_counters(open_host(None, netns=netns), (IPFamily.V4,)).values())
    for i, text in enumerate(listings):
        Path(folder, f"{name}-{i}.txt").write_text(text)
