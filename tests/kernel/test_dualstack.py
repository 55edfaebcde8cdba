"""Dual-stack: IPv4 and IPv6 services through every mode, and single-stack nodes that ignore IPv6.

A dual-stack netlab (every pod and client has an IPv4 and an IPv6 address, the node forwards
both) is programmed by the agent's own backends (`IptablesProxier` with iptables-nft and with
iptables-legacy, `NftablesProxier`), which choose the families to program from the node
(`agent.main.node_families`): a node with an IPv4 and an IPv6 node IP programs both (ip6tables /
the `ip6 kproxy-nft` table next to the IPv4 rules), a node whose node IPs are all IPv4 programs
IPv4 only. `kproxy-nft apply`, run inside the node namespace, is checked for both families too.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kproxy_nft.kernel import iptables as iptables_kernel
from kproxy_nft.kernel.nftables import NftablesBackend
from kproxy_nft.lab import NODE, ClientSpec, Lab, PodSpec
from kproxy_nft.model import (
    ClusterState,
    Endpoint,
    IPFamily,
    NodeContext,
    Protocol,
    ServicePort,
    ServicePortName,
    node_families,
)
from kproxy_nft.proxier import Proxier
from kproxy_nft.proxier.iptables import IptablesProxier
from kproxy_nft.proxier.nftables import NftablesProxier
from tests.helpers import write_dual_stack_web
from tests.kernel.conftest import serving_lab
from tests.kernel.tracecheck import mode_under_test, traced_probe

pytestmark = pytest.mark.kernel

PODS = tuple(
    PodSpec(f"pod{i}", f"10.1.0.{46 + i}", tcp_ports=(80,), udp_ports=(53,), ip6=f"fd00:10:1::{46 + i}")
    for i in (1, 2, 3)
)
CLIENTS = (
    ClientSpec("testpod", "10.1.0.50", ip6="fd00:10:1::50"),
    ClientSpec("ext", "192.168.100.2", ip6="fd00:192:168:100::2"),
)
V4 = {pod.name: pod.ip for pod in PODS}
V6 = {pod.name: pod.ip6 or "" for pod in PODS}
DUAL_NODE = NodeContext(
    hostname="node1",
    node_ips=("192.168.100.1", "fd00:192:168:100::1"),
    cluster_cidrs=("10.1.0.0/16", "fd00:10:1::/64"),
)
V4_NODE = dataclasses.replace(DUAL_NODE, node_ips=("192.168.100.1",))
VIP4, VIP6 = "10.96.0.60", "fd00:96::60"


def service(name: str, *cluster_ips: str, proto: Protocol = Protocol.TCP, port: int = 80) -> ServicePort:
    return ServicePort(ServicePortName("test", name, "p", proto), port=port, target_port=port, cluster_ips=cluster_ips)


def state_of(*services: tuple[ServicePort, tuple[Endpoint, ...]]) -> ClusterState:
    return ClusterState({svc.name: svc for svc, _ in services}, {svc.name: eps for svc, eps in services})


def endpoints(addresses: dict[str, str], *pods: str, port: int = 80) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(addresses[pod], port) for pod in pods)


# The dual-stack service: IPv4 reaches pod1 and pod2, IPv6 reaches pod2 and pod3, so an answer
# from the wrong family's endpoint (pod3 over IPv4, pod1 over IPv6) shows up as such.
DUAL = service("dual", VIP4, VIP6)
DUAL_STATE = state_of((DUAL, endpoints(V4, "pod1", "pod2") + endpoints(V6, "pod2", "pod3")))


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if not Path("/proc/sys/net/ipv6").is_dir():
        pytest.skip("kernel without IPv6")
    with serving_lab(PODS, CLIENTS) as the_lab:
        yield the_lab


MakeBackend = Callable[[NodeContext], Proxier]


def _cleanup(lab: Lab, mode: str) -> None:
    """Remove what any backend of this mode left in the node namespace, both families."""
    if mode == "nftables":
        with NftablesBackend(lab.node_ns) as nft:
            nft.cleanup()
        return
    host = iptables_kernel.open_host(mode.split("-")[1], netns=lab.node_ns)
    for family in IPFamily:
        iptables_kernel.cleanup(host, family)


@pytest.fixture(params=["iptables-nft", "iptables-legacy", "nftables"])
def make_backend(request: pytest.FixtureRequest, lab: Lab) -> Iterator[MakeBackend]:
    """The agent's backend of the mode under test, for a node; everything removed afterwards."""
    mode: str = request.param

    def make(node: NodeContext) -> Proxier:
        if mode == "nftables":
            return NftablesProxier(node, netns=lab.node_ns)
        return IptablesProxier(node, iptables_backend=mode.split("-")[1], netns=lab.node_ns)

    _cleanup(lab, mode)
    try:
        yield make
    finally:
        _cleanup(lab, mode)


def program(make: MakeBackend, node: NodeContext, state: ClusterState) -> Proxier:
    backend = make(node)
    backend.sync(state, full=True)
    return backend


def kernel_rules(lab: Lab, mode: str, family: IPFamily) -> str:
    """Everything of `family` in the node's tables for this mode (iptables-save, or our nft table)."""
    if mode == "nftables":
        table = "ip" if family is IPFamily.V4 else "ip6"
        res = lab.run_in(NODE, ["nft", "list", "table", table, "kproxy-nft"], check=False)
        return res.stdout if res.returncode == 0 else ""
    tool = f"{'iptables' if family is IPFamily.V4 else 'ip6tables'}-{mode.split('-')[1]}-save"
    return lab.run_in(NODE, [tool]).stdout


# ------------------------------------------------------------------ which families (pure)
def test_node_families_rule() -> None:
    def unsupported() -> bool:
        raise AssertionError("node IPs were given: the kernel must not be asked")

    assert node_families(DUAL_NODE, unsupported) == (IPFamily.V4, IPFamily.V6)
    assert node_families(V4_NODE, unsupported) == (IPFamily.V4,)
    assert node_families(dataclasses.replace(DUAL_NODE, node_ips=("fd00::1",)), unsupported) == (IPFamily.V6,)
    no_ips = dataclasses.replace(DUAL_NODE, node_ips=())
    assert node_families(no_ips, lambda: True) == (IPFamily.V4, IPFamily.V6)
    assert node_families(no_ips, lambda: False) == (IPFamily.V4,)


# ---------------------------------------------------------------------------- datapath
def test_dual_stack_service_each_family_reaches_only_its_endpoints(lab: Lab, make_backend: MakeBackend) -> None:
    program(make_backend, DUAL_NODE, DUAL_STATE)
    res = lab.probe("testpod", VIP4, 80, count=40)
    assert res.ok and set(res.counts()) == {"pod1", "pod2"}, res.summary()
    assert res.seen_ips() == {"10.1.0.50"}  # from inside the cluster CIDR: not masqueraded
    res = lab.probe("testpod", VIP6, 80, count=40)
    assert res.ok and set(res.counts()) == {"pod2", "pod3"}, res.summary()
    assert res.seen_ips() == {"fd00:10:1::50"}
    res = lab.probe(NODE, VIP6, 80, count=10)  # locally generated: ip6 nat output
    assert res.ok and set(res.counts()) <= {"pod2", "pod3"}, res.summary()
    # Not a port of the service: no pod answers (iptables mode: lost upstream; nftables mode
    # rejects unknown ports of cluster IPs, as kube-proxy's does).
    res = lab.probe("testpod", VIP6, 53, proto="udp", count=3, timeout=0.5)
    assert not res.successes and set(res.error_counts()) <= {"timeout", "refused"}, res.summary()


def test_ipv6_only_service_and_udp(lab: Lab, make_backend: MakeBackend) -> None:
    http = service("v6only", "fd00:96::61")
    dns = service("v6dns", "fd00:96::62", proto=Protocol.UDP, port=53)
    state = state_of((http, endpoints(V6, "pod1")), (dns, endpoints(V6, "pod3", port=53)))
    program(make_backend, DUAL_NODE, state)
    assert lab.probe("testpod", "fd00:96::61", 80, count=5).counts() == {"pod1": 5}
    assert lab.probe("ext", "fd00:96::61", 80, count=5).counts() == {"pod1": 5}
    res = lab.probe("testpod", "fd00:96::62", 53, proto="udp", count=5)
    assert res.counts() == {"pod3": 5} and res.seen_ips() == {"fd00:10:1::50"}, res.summary()


def test_ipv6_masquerade_for_external_client_and_hairpin(
    lab: Lab, request: pytest.FixtureRequest, make_backend: MakeBackend
) -> None:
    mode = mode_under_test(request)  # the trace reads this mode's rules
    program(make_backend, DUAL_NODE, DUAL_STATE)
    res = traced_probe(lab, mode, "ext", VIP6, 80, count=20)
    assert res.ok and set(res.counts()) == {"pod2", "pod3"}, res.summary()
    assert res.seen_ips() and res.seen_ips() <= set(lab.node_ips6), res.summary()  # masqueraded
    res = traced_probe(lab, mode, "ext", VIP4, 80, count=10)
    assert res.ok and res.seen_ips() <= set(lab.node_ips), res.summary()
    res = traced_probe(lab, mode, "pod2", VIP6, 80, count=40)  # hairpin: pod2 reaching itself is masqueraded
    assert res.ok and res.counts().get("pod2", 0) > 0, res.summary()
    for attempt in res.attempts:
        assert attempt.seen_ip == ("fd00:10:1::1" if attempt.pod == "pod2" else V6["pod2"]), res.summary()


def test_ipv6_service_without_endpoints_is_refused(
    lab: Lab, request: pytest.FixtureRequest, make_backend: MakeBackend
) -> None:
    mode = mode_under_test(request)  # the trace reads this mode's rules
    tcp = service("empty6", "fd00:96::63")
    udp = service("empty6dns", "fd00:96::63", proto=Protocol.UDP, port=53)
    program(make_backend, DUAL_NODE, state_of((tcp, ()), (udp, ()), (DUAL, endpoints(V6, "pod2"))))
    for client in ("testpod", NODE):  # forward and output hooks
        res = traced_probe(lab, mode, client, "fd00:96::63", 80, count=3, timeout=3.0)
        assert res.error_counts() == {"refused": 3}, res.summary()
        # Refused, not timed out -- but after ~1 s: this kernel's IPv6 TCP (6.18 here) gives up
        # a SYN_SENT socket on the ICMPv6 port unreachable that answers the retransmitted SYN,
        # not the first one, with any ip6tables/nft REJECT (IPv4 and UDP: at once).
        assert max(a.elapsed for a in res.attempts) < 1.5, res.summary()
    res = traced_probe(lab, mode, "testpod", "fd00:96::63", 53, proto="udp", count=3, timeout=2.0)
    assert res.error_counts() == {"refused": 3}, res.summary()
    assert max(a.elapsed for a in res.attempts) < 0.5
    assert traced_probe(lab, mode, "testpod", VIP6, 80, count=3).counts() == {"pod2": 3}  # the others still work


# ----------------------------------------------------------------------- single stack
def test_single_stack_node_programs_no_ipv6(
    lab: Lab, make_backend: MakeBackend, request: pytest.FixtureRequest
) -> None:
    mode = request.node.callspec.params["make_backend"]
    backend = program(make_backend, V4_NODE, DUAL_STATE)
    assert backend.families == (IPFamily.V4,)  # type: ignore[attr-defined]
    res = lab.probe("testpod", VIP4, 80, count=10)
    assert res.ok and set(res.counts()) <= {"pod1", "pod2"}, res.summary()
    res = lab.probe("testpod", VIP6, 80, count=1, timeout=0.5)
    assert res.error_counts() == {"timeout": 1}, res.summary()  # no DNAT: lost upstream
    assert VIP4 in kernel_rules(lab, mode, IPFamily.V4)
    v6 = kernel_rules(lab, mode, IPFamily.V6)
    assert VIP6 not in v6 and "KUBE-" not in v6 and "kproxy" not in v6, v6

    # The same node with an IPv6 node IP too: now the IPv6 cluster IP is programmed.
    program(make_backend, DUAL_NODE, DUAL_STATE)
    assert VIP6 in kernel_rules(lab, mode, IPFamily.V6)
    assert lab.probe("testpod", VIP6, 80, count=5).ok


def test_node_without_node_ips_programs_both_families(lab: Lab, make_backend: MakeBackend) -> None:
    backend = program(make_backend, dataclasses.replace(DUAL_NODE, node_ips=()), DUAL_STATE)
    assert backend.families == (IPFamily.V4, IPFamily.V6)  # type: ignore[attr-defined]
    assert lab.probe("testpod", VIP6, 80, count=5).ok


# ------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_cli_apply_programs_both_families(lab: Lab, mode: str, tmp_path: Path) -> None:
    write_dual_stack_web(tmp_path, V4["pod1"], V6["pod3"])
    argv = [sys.executable, "-m", "kproxy_nft.cli", "apply", "-f", str(tmp_path), "--proxy-mode", mode,
            "--cluster-cidr", "10.1.0.0/16,fd00:10:1::/64"]
    if mode == "iptables":
        argv += ["--iptables-backend", "nft"]
    try:
        res = lab.run_in(NODE, argv, check=False)
        assert res.returncode == 1, res.stdout + res.stderr  # 1: changes applied
        assert lab.probe("testpod", "10.96.0.70", 8080, count=5).counts() == {"pod1": 5}
        assert lab.probe("testpod", "fd00:96::70", 8080, count=5).counts() == {"pod3": 5}
        res = lab.run_in(NODE, argv, check=False)
        assert res.returncode == 0, res.stdout + res.stderr  # 0: nothing left to change
    finally:
        lab.run_in(NODE, [sys.executable, "-m", "kproxy_nft.cli", "cleanup", "--proxy-mode", mode], check=False)
