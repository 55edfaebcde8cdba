"""Real packets for every Service type and traffic policy, in every mode (kube-proxy is the spec).

One module-scoped netlab: three pods (tcp 80, udp 53), a pod client `testpod` (10.1.0.50) and
two external clients `ext` (192.168.100.2) and `ext2` (192.168.100.3) routed through the node
`node-a` (192.168.100.1). Each test programs the node with the `mode` fixture: kube-proxy's
iptables layout through iptables-nft and iptables-legacy, or our nftables layout.

Negative cases must be able to fail, so whatever the rules do *not* translate has somewhere
to go that answers:

* a server named `node` listens in the node namespace on every NodePort used here: a NodePort
  that is not DNATed is answered by "node" (not refused), so a REJECT or DROP is the rule's;
* the dead-end "wan" namespace (the node's default gateway) is made to own the service CIDR
  10.96.0.0/12 and the external range 203.0.113.0/24 and runs a server named `wan` (tcp 80,
  81, udp 53): a service IP that is not DNATed, dropped or rejected leaks there and "wan"
  answers, as an upstream router would.

All of it lives in this lab's `kpn-…` namespaces and goes away with them.

Where kube-proxy is cited, the reference is kubernetes/kubernetes pkg/proxy/iptables/proxier.go
(`syncProxyRules`: KUBE-EXT-/KUBE-FW- chains, KUBE-EXTERNAL-SERVICES, KUBE-PROXY-FIREWALL) and
pkg/proxy/nftables/proxier.go (`nftablesJumpChains`, `cluster-ips-check`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from kproxy_nft.compile.nftables import compile_all
from kproxy_nft.kernel import iptables as iptables_kernel
from kproxy_nft.kernel.iptables_text import strip_comments
from kproxy_nft.kernel.nftables import NftablesBackend
from kproxy_nft.lab import NODE, ClientSpec, Lab, PodSpec, ProbeResult
from kproxy_nft.lab import server as netlab_server
from kproxy_nft.model import ClusterState, Endpoint, NodeContext, Protocol, ServicePort, ServicePortName, TrafficPolicy
from tests.kernel.conftest import iptables_apply, serving_lab
from tests.kernel.tracecheck import predict, traced_probe

pytestmark = pytest.mark.kernel

NODE_A = NodeContext(hostname="node-a", node_ips=("192.168.100.1",), cluster_cidrs=("10.1.0.0/16",))
NODE_IP = "192.168.100.1"
SERVICE_CIDR = "10.96.0.0/12"
EXTERNAL_RANGE = "203.0.113.0/24"
LB_IP = "203.0.113.10"
EXT_IP = "203.0.113.20"
POD_IPS = {"pod1": "10.1.0.47", "pod2": "10.1.0.48", "pod3": "10.1.0.49"}
PODS = tuple(PodSpec(name, ip, tcp_ports=(80,), udp_ports=(53,)) for name, ip in POD_IPS.items())
CLIENTS = (ClientSpec("testpod", "10.1.0.50"), ClientSpec("ext", "192.168.100.2"), ClientSpec("ext2", "192.168.100.3"))
EXT_CLIENT_IP = "192.168.100.2"

# Every NodePort of this file, so that the node's own listener can answer what is not DNATed.
NODE_TCP_PORTS = (30080, 30081, 30082, 30083, 30084, 30086, 30100, 30101)
NODE_UDP_PORTS = (30053,)
LEAK = "wan"  # the server that answers service traffic leaking out of the node
NODE_LISTENER = "node"  # the server that answers NodePort traffic that was not DNATed

ROUTE_LOCALNET = "net.ipv4.conf.all.route_localnet"
DROP_TIMEOUT = 0.5
REJECT_FAST = 0.5  # a REJECT answers within milliseconds; a SYN retry would take 1 s


# ---------------------------------------------------------------------------------------------
# model builders
# ---------------------------------------------------------------------------------------------


# Probes per "every endpoint answers" check: the chance that a random pick misses one endpoint
# is 3·(2/3)^40 ≈ 3e-7 for three, 2·(1/2)^25 ≈ 6e-8 for two: never a flaky failure.
SPREAD3 = 40
SPREAD2 = 25

def svc(name: str, vip: str, port: int = 80, proto: Protocol = Protocol.TCP, **kw: Any) -> ServicePort:
    """A service port named test/<name>:p (target port = port)."""
    return ServicePort(
        name=ServicePortName("test", name, "p", proto), port=port, target_port=port, cluster_ips=(vip,), **kw
    )


def load_balancer(name: str, vip: str, node_port: int, **kw: Any) -> ServicePort:
    """A LoadBalancer service port that also answers on the external IP EXT_IP and the ingress IP LB_IP."""
    return svc(
        name,
        vip,
        node_port=node_port,
        service_type="LoadBalancer",
        external_ips=(EXT_IP,),
        load_balancer_ips=(LB_IP,),
        **kw,
    )


def ep(pod: str, node: str = "node-a", port: int = 80, **kw: Any) -> Endpoint:
    return Endpoint(POD_IPS[pod], port, node_name=node, **kw)


def cluster(*entries: tuple[ServicePort, Sequence[Endpoint]]) -> ClusterState:
    return ClusterState(
        {s.name: s for s, _ in entries},
        {s.name: tuple(sorted(eps, key=lambda e: e.address)) for s, eps in entries},
    )


# ---------------------------------------------------------------------------------------------
# lab: pods, clients, and listeners for traffic that is not translated
# ---------------------------------------------------------------------------------------------


def _start_server(lab: Lab, ns: str, name: str, tcp: Sequence[int], udp: Sequence[int]) -> subprocess.Popen[bytes]:
    """The netlab server in any namespace of the lab, waited for (READY line), stopped with the lab."""
    args = [sys.executable, "-I", "-S", netlab_server.__file__, "--name", name]
    args += [a for p in tcp for a in ("--tcp", str(p))] + [a for p in udp for a in ("--udp", str(p))]
    proc: subprocess.Popen[bytes] = lab.spawn(ns, args, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 10.0)
    line = proc.stdout.readline().decode() if ready else ""
    assert line.startswith("READY"), f"server {name} in {ns} not ready: {line!r}"
    proc.stdout.close()  # it never writes after READY
    return proc


def _make_wan_answer(lab: Lab) -> None:
    """Let the dead-end upstream own the service and external ranges, and answer on them."""
    for cidr in (SERVICE_CIDR, EXTERNAL_RANGE):
        lab.run_in(lab.wan_ns, ["ip", "route", "add", "local", cidr, "dev", "lo"])
    lab.run_in(lab.wan_ns, ["ip", "route", "add", "default", "via", NODE_IP, "dev", "eth0"])  # replies
    _start_server(lab, lab.wan_ns, LEAK, tcp=(80, 81), udp=(53,))


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with serving_lab(PODS, CLIENTS) as the_lab:
        _make_wan_answer(the_lab)
        _start_server(the_lab, the_lab.node_ns, NODE_LISTENER, NODE_TCP_PORTS, NODE_UDP_PORTS)
        yield the_lab


@dataclass(frozen=True)
class Mode:
    """One way of programming the node: `load` a state, `dump` the rules as the kernel holds them."""

    name: str
    load_with: Callable[[ClusterState, NodeContext], object]
    dump: Callable[[], str]

    @property
    def iptables(self) -> bool:
        return self.name.startswith("iptables")

    def load(self, state: ClusterState, node: NodeContext = NODE_A) -> None:
        self.load_with(state, node)

    def probe(self, lab: Lab, client: str, ip: str, port: int, **kw: Any) -> ProbeResult:
        """`lab.probe`, and the tracer's prediction for the same packet checked against it."""
        return traced_probe(lab, self.name, client, ip, port, **kw)


@pytest.fixture(params=["iptables-nft", "iptables-legacy", "nftables"])
def mode(request: pytest.FixtureRequest, lab: Lab) -> Iterator[Mode]:
    """The node namespace programmed in one mode; its rules are removed after the test."""
    if request.param == "nftables":
        with NftablesBackend(lab.node_ns) as nft:
            dump = lambda: lab.run_in(NODE, ["nft", "list", "ruleset"]).stdout  # noqa: E731
            yield Mode(request.param, lambda state, node: nft.sync(compile_all(state, node)), dump)
            nft.cleanup()
        return
    backend = request.param.split("-")[1]
    save = lambda: lab.run_in(NODE, [f"iptables-{backend}-save"]).stdout  # noqa: E731
    yield Mode(request.param, lambda state, node: iptables_apply(lab.node_ns, backend, state, node), save)
    iptables_kernel.cleanup(iptables_kernel.open_host(backend, netns=lab.node_ns))


@contextlib.contextmanager
def sysctl(lab: Lab, key: str, value: str) -> Iterator[None]:
    """Set a sysctl inside the node namespace for the block, restoring the old value after."""
    old = lab.run_in(NODE, ["sysctl", "-n", key]).stdout.strip()
    lab.run_in(NODE, ["sysctl", "-q", "-w", f"{key}={value}"])
    try:
        yield
    finally:
        lab.run_in(NODE, ["sysctl", "-q", "-w", f"{key}={old}"])


# ---------------------------------------------------------------------------------------------
# assertions (failure messages carry the rules the kernel holds)
# ---------------------------------------------------------------------------------------------


def _explain(mode: Mode, res: ProbeResult, expected: str) -> str:
    return f"[{mode.name}] expected {expected}, got {res.summary()}\n--- rules in the node namespace ---\n{mode.dump()}"


def assert_reaches(mode: Mode, res: ProbeResult, pods: set[str], seen: set[str] | None = None) -> None:
    """Every attempt answered, by exactly the pods `pods` (all of them), seeing sources in `seen`."""
    assert res.ok and set(res.counts()) == pods, _explain(mode, res, f"answers from exactly {sorted(pods)}")
    if seen is not None:
        assert res.seen_ips() <= seen, _explain(mode, res, f"source addresses in {sorted(seen)}, saw {res.seen_ips()}")


def assert_one_pod(mode: Mode, res: ProbeResult, what: str) -> str:
    """Every attempt answered by one and the same pod; returns its name."""
    pods = set(res.counts())
    assert res.ok and len(pods) == 1 and pods <= POD_IPS.keys(), _explain(mode, res, what)
    return pods.pop()


def assert_refused(mode: Mode, res: ProbeResult) -> None:
    """REJECT: every attempt refused, and at once (not after a timeout or a retransmission)."""
    assert res.error_counts() == {"refused": len(res)}, _explain(mode, res, "refused")
    slowest = max(a.elapsed for a in res.attempts)
    assert slowest < REJECT_FAST, _explain(mode, res, f"refused within {REJECT_FAST}s, slowest {slowest}s")


def assert_dropped(mode: Mode, res: ProbeResult) -> None:
    """DROP: every attempt timed out (neither a pod nor the leak/node listener answered)."""
    assert res.error_counts() == {"timeout": len(res)}, _explain(mode, res, "timeouts (DROP)")


def masqueraded(lab: Lab) -> set[str]:
    return set(lab.node_ips)


# ---------------------------------------------------------------------------------------------
# 1. NodePort
# ---------------------------------------------------------------------------------------------

NODEPORT = svc("np", "10.96.1.10", node_port=30080, service_type="NodePort")
NODEPORT_EPS = (ep("pod1"), ep("pod2", "node-b"), ep("pod3", "node-b"))


def test_nodeport_from_outside_pods_and_the_node(lab: Lab, mode: Mode) -> None:
    mode.load(cluster((NODEPORT, NODEPORT_EPS)))
    # eTP Cluster: every endpoint, the client masqueraded to a node address (KUBE-EXT- marks all).
    assert_reaches(mode, mode.probe(lab, "ext", NODE_IP, 30080, count=SPREAD3), set(POD_IPS), masqueraded(lab))
    assert_reaches(mode, mode.probe(lab, "testpod", NODE_IP, 30080, count=SPREAD3), set(POD_IPS), masqueraded(lab))
    assert_reaches(mode, mode.probe(lab, NODE, NODE_IP, 30080, count=SPREAD3), set(POD_IPS), masqueraded(lab))
    # Localhost NodePorts are off by default: 127.0.0.1 reaches the node's own listener.
    assert_reaches(mode, mode.probe(lab, NODE, "127.0.0.1", 30080, count=3), {NODE_LISTENER})


def test_localhost_nodeports_when_enabled(lab: Lab, mode: Mode) -> None:
    """iptables mode serves 127.0.0.1:<nodePort> when enabled, and its backend turns on
    route_localnet, without which the kernel drops 127.0.0.1-sourced packets leaving lo (kube-proxy's
    iptables proxier sets the sysctl too). nftables mode never does, even with the sysctl on
    (kube-proxy's nftables proxier leaves loopback out of nodeport-ips, or matches
    `ip daddr != 127.0.0.0/8`)."""
    state = cluster((NODEPORT, NODEPORT_EPS))
    with sysctl(lab, ROUTE_LOCALNET, "0" if mode.iptables else "1"):
        mode.load(state, dataclasses.replace(NODE_A, localhost_nodeports=True))
        res = mode.probe(lab, NODE, "127.0.0.1", 30080, count=30)
        if mode.iptables:
            assert_reaches(mode, res, set(POD_IPS), masqueraded(lab))
            assert lab.run_in(NODE, ["sysctl", "-n", ROUTE_LOCALNET]).stdout.strip() == "1"
        else:
            assert_reaches(mode, res, {NODE_LISTENER})


def test_nodeport_addresses_limit_where_nodeports_answer(lab: Lab, mode: Mode) -> None:
    state = cluster((NODEPORT, NODEPORT_EPS))
    # Control: "every local address" (a /0) serves the NodePort on the pod gateway 10.1.0.1 too.
    mode.load(state, dataclasses.replace(NODE_A, nodeport_addresses=("0.0.0.0/0",)))
    assert_reaches(mode, mode.probe(lab, "testpod", "10.1.0.1", 30080, count=SPREAD3), set(POD_IPS))
    mode.load(state, dataclasses.replace(NODE_A, nodeport_addresses=("192.168.100.1/32",)))
    assert_reaches(mode, mode.probe(lab, "ext", NODE_IP, 30080, count=SPREAD3), set(POD_IPS), masqueraded(lab))
    assert_reaches(mode, mode.probe(lab, "testpod", NODE_IP, 30080, count=SPREAD3), set(POD_IPS))
    assert_reaches(mode, mode.probe(lab, "testpod", "10.1.0.1", 30080, count=3), {NODE_LISTENER})


# ---------------------------------------------------------------------------------------------
# 2./3. external IPs, load-balancer ingress IPs, source ranges
# ---------------------------------------------------------------------------------------------


def test_external_and_load_balancer_ips(lab: Lab, mode: Mode) -> None:
    lb = load_balancer("lb", "10.96.1.20", 30081)
    mode.load(cluster((lb, (ep("pod1"), ep("pod2", "node-b")))))
    pods = {"pod1", "pod2"}
    for ip in (LB_IP, EXT_IP):
        assert_reaches(mode, mode.probe(lab, "ext", ip, 80, count=SPREAD2), pods, masqueraded(lab))
        # Pods and the node reach them too (KUBE-SERVICES matches them from any source).
        assert_reaches(mode, mode.probe(lab, "testpod", ip, 80, count=SPREAD2), pods, masqueraded(lab))
        assert_reaches(mode, mode.probe(lab, NODE, ip, 80, count=SPREAD2), pods)
    # Only the service's port is translated: another port of the LB IP leaks upstream.
    assert_reaches(mode, mode.probe(lab, "ext", LB_IP, 81, count=2), {LEAK})


def test_load_balancer_source_ranges(lab: Lab, mode: Mode) -> None:
    fw = svc(
        "fw",
        "10.96.1.30",
        node_port=30082,
        service_type="LoadBalancer",
        load_balancer_ips=(LB_IP,),
        load_balancer_source_ranges=("192.168.100.2/32",),
    )
    mode.load(cluster((fw, (ep("pod1"), ep("pod2", "node-b")))))
    assert_reaches(mode, mode.probe(lab, "ext", LB_IP, 80, count=SPREAD2), {"pod1", "pod2"}, masqueraded(lab))
    # Outside the ranges: dropped (KUBE-PROXY-FIREWALL / firewall-check), not leaked upstream.
    assert_dropped(mode, mode.probe(lab, "ext2", LB_IP, 80, count=2, timeout=DROP_TIMEOUT))
    # The NodePort of the same service is not subject to the ranges.
    assert_reaches(mode, mode.probe(lab, "ext2", NODE_IP, 30082, count=SPREAD2), {"pod1", "pod2"}, masqueraded(lab))


# ---------------------------------------------------------------------------------------------
# 4./5. traffic policies
# ---------------------------------------------------------------------------------------------


def _local_external(name: str, vip: str, node_port: int) -> ServicePort:
    return load_balancer(name, vip, node_port, external_traffic_policy=TrafficPolicy.LOCAL)


def test_external_traffic_policy_local(lab: Lab, mode: Mode) -> None:
    local = _local_external("etp", "10.96.1.40", 30083)
    mode.load(cluster((local, (ep("pod1"), ep("pod2", "node-b")))))
    for target, port in ((NODE_IP, 30083), (LB_IP, 80), (EXT_IP, 80)):
        # Only this node's endpoint, and it sees the client's real address.
        assert_reaches(mode, mode.probe(lab, "ext", target, port, count=12), {"pod1"}, {EXT_CLIENT_IP})
    # Pod traffic short-circuits to the cluster endpoints (kube-proxy: "pod traffic for ... external
    # destinations" → KUBE-SVC-), and so does the node's own, masqueraded ("masquerade LOCAL traffic").
    assert_reaches(mode, mode.probe(lab, "testpod", NODE_IP, 30083, count=SPREAD2), {"pod1", "pod2"})
    assert_reaches(mode, mode.probe(lab, NODE, NODE_IP, 30083, count=SPREAD2), {"pod1", "pod2"}, masqueraded(lab))


def test_external_traffic_policy_local_without_local_endpoints(lab: Lab, mode: Mode) -> None:
    local = _local_external("etp", "10.96.1.41", 30084)
    mode.load(cluster((local, (ep("pod2", "node-b"), ep("pod3", "node-b")))))
    for target, port in ((NODE_IP, 30084), (LB_IP, 80), (EXT_IP, 80)):
        assert_dropped(mode, mode.probe(lab, "ext", target, port, count=2, timeout=DROP_TIMEOUT))
    assert_reaches(mode, mode.probe(lab, "testpod", "10.96.1.41", 80, count=SPREAD2), {"pod2", "pod3"})
    # kube-proxy still short-circuits pod traffic to the cluster endpoints (its DROP sits in filter
    # KUBE-EXTERNAL-SERVICES, after the DNAT; the spec above is silent on this).
    assert_reaches(mode, mode.probe(lab, "testpod", NODE_IP, 30084, count=SPREAD2), {"pod2", "pod3"})
    # The node itself to the external IP: the modes differ (docs/TRACE.md), and the trace says how:
    # iptables has no KUBE-EXTERNAL-SERVICES in OUTPUT and short-circuits it, nftables drops it there.
    res = mode.probe(lab, NODE, EXT_IP, 80, count=SPREAD2, timeout=DROP_TIMEOUT)
    if mode.iptables:
        assert_reaches(mode, res, {"pod2", "pod3"}, masqueraded(lab))
    else:
        assert_dropped(mode, res)


def test_internal_traffic_policy_local(lab: Lab, mode: Mode) -> None:
    itp = svc("itp", "10.96.1.50", internal_traffic_policy=TrafficPolicy.LOCAL)
    mode.load(cluster((itp, (ep("pod1"), ep("pod2", "node-b"), ep("pod3", "node-b")))))
    assert_reaches(mode, mode.probe(lab, "testpod", "10.96.1.50", 80, count=20), {"pod1"})
    mode.load(cluster((itp, (ep("pod2", "node-b"), ep("pod3", "node-b")))))
    assert_dropped(mode, mode.probe(lab, "testpod", "10.96.1.50", 80, count=2, timeout=DROP_TIMEOUT))


# ---------------------------------------------------------------------------------------------
# 6. no endpoints; invalid and unallocated service addresses
# ---------------------------------------------------------------------------------------------


def test_no_endpoints_rejects_every_address(lab: Lab, mode: Mode) -> None:
    empty = load_balancer("empty", "10.96.1.60", 30086)
    mode.load(cluster((empty, ())))
    assert_refused(mode, mode.probe(lab, "testpod", "10.96.1.60", 80, count=3))
    assert_refused(mode, mode.probe(lab, NODE, "10.96.1.60", 80, count=3))
    # The node listens on 30086 and the upstream on the external IPs: refused means rejected.
    assert_refused(mode, mode.probe(lab, "ext", NODE_IP, 30086, count=3))
    assert_refused(mode, mode.probe(lab, "ext", EXT_IP, 80, count=3))
    assert_refused(mode, mode.probe(lab, "ext", LB_IP, 80, count=3))


def test_nftables_rejects_unknown_ports_and_drops_unallocated_ips(lab: Lab, mode: Mode) -> None:
    if mode.iptables:
        pytest.skip("kube-proxy's iptables mode has no cluster-ips-check: such traffic is routed as usual")
    web = svc("web", "10.96.1.61")
    mode.load(cluster((web, (ep("pod1"),))), dataclasses.replace(NODE_A, service_cidrs=(SERVICE_CIDR,)))
    assert_reaches(mode, mode.probe(lab, "testpod", "10.96.1.61", 80, count=3), {"pod1"})
    # Port 81 is not the service's: rejected (the upstream would answer it otherwise).
    assert_refused(mode, mode.probe(lab, "testpod", "10.96.1.61", 81, count=3))
    assert_refused(mode, mode.probe(lab, NODE, "10.96.1.61", 81, count=3))
    # An address of the service CIDR that no service has: dropped.
    assert_dropped(mode, mode.probe(lab, "testpod", "10.96.200.200", 80, count=2, timeout=DROP_TIMEOUT))
    assert_dropped(mode, mode.probe(lab, NODE, "10.96.200.200", 80, count=2, timeout=DROP_TIMEOUT))


# ---------------------------------------------------------------------------------------------
# 7./8. endpoint selection: terminating fallback, topology hints
# ---------------------------------------------------------------------------------------------


def terminating(pod: str, serving: bool = True) -> Endpoint:
    return ep(pod, ready=False, serving=serving, terminating=True)


def test_terminating_endpoints_fallback(lab: Lab, mode: Mode) -> None:
    term = svc("term", "10.96.1.70")
    # All terminating: the serving ones keep taking connections (pod3 is not serving).
    mode.load(cluster((term, (terminating("pod1"), terminating("pod2"), terminating("pod3", serving=False)))))
    assert_reaches(mode, mode.probe(lab, "testpod", "10.96.1.70", 80, count=SPREAD2), {"pod1", "pod2"})
    # A ready endpoint: the terminating ones get no new connections.
    mode.load(cluster((term, (ep("pod1"), terminating("pod2"), terminating("pod3")))))
    assert_reaches(mode, mode.probe(lab, "testpod", "10.96.1.70", 80, count=20), {"pod1"})


def test_topology_hints(lab: Lab, mode: Mode) -> None:
    hinted = svc("hints", "10.96.1.80")
    node = dataclasses.replace(NODE_A, zone="zone-a")

    def at(pod: str, *zones: str) -> Endpoint:
        return ep(pod, zone=zones[0] if zones else None, zone_hints=frozenset(zones))

    mode.load(cluster((hinted, (at("pod1", "zone-a"), at("pod2", "zone-b"), at("pod3", "zone-a")))), node)
    assert_reaches(mode, mode.probe(lab, "testpod", "10.96.1.80", 80, count=SPREAD2), {"pod1", "pod3"})
    # One endpoint without hints: hints are ignored, every endpoint is used.
    mode.load(cluster((hinted, (at("pod1", "zone-a"), at("pod2", "zone-b"), at("pod3")))), node)
    assert_reaches(mode, mode.probe(lab, "testpod", "10.96.1.80", 80, count=SPREAD3), set(POD_IPS))


# ---------------------------------------------------------------------------------------------
# 9. UDP and SCTP
# ---------------------------------------------------------------------------------------------


def test_udp_cluster_ip_and_nodeport(lab: Lab, mode: Mode) -> None:
    dns = svc("dns", "10.96.1.90", 53, Protocol.UDP, node_port=30053, service_type="NodePort")
    mode.load(cluster((dns, (ep("pod1", port=53), ep("pod2", "node-b", port=53)))))
    pods = {"pod1", "pod2"}
    assert_reaches(mode, mode.probe(lab, "testpod", "10.96.1.90", 53, count=SPREAD2, proto="udp"), pods, {"10.1.0.50"})
    assert_reaches(mode, mode.probe(lab, "ext", NODE_IP, 30053, count=SPREAD2, proto="udp"), pods, masqueraded(lab))


def sctp_unsupported() -> str | None:
    """Why SCTP sockets cannot be opened here (the lab's namespaces share this kernel), or None."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP).close()
    except OSError as exc:
        return f"this kernel has no SCTP sockets ({exc})"
    return None


# Stdlib-only SCTP peers (the netlab server and prober speak TCP and UDP only). The server answers
# each association with "<name> <peer ip>:<peer port>", like the netlab server.
SCTP_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[2])))
s.listen(64)
print("READY", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(f"{sys.argv[1]} {peer[0]}:{peer[1]}".encode())
    c.close()
"""
SCTP_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
s.settimeout(1.0)
s.connect((sys.argv[1], int(sys.argv[2])))
print(s.recv(200).decode())
"""


def _sctp_answer(lab: Lab, client: str, ip: str, port: int) -> str:
    """Name of the pod that answered an SCTP association, or the client's error line."""
    res = lab.run_in(client, [sys.executable, "-I", "-S", "-c", SCTP_CLIENT, ip, str(port)], check=False)
    return res.stdout.split()[0] if res.returncode == 0 and res.stdout.strip() else f"error: {res.stderr.strip()}"


def test_sctp_rules_load_and_carry_traffic(lab: Lab, mode: Mode) -> None:
    sctp = svc("sctp", "10.96.1.95", 80, Protocol.SCTP, node_port=30132, service_type="NodePort")
    mode.load(cluster((sctp, (ep("pod1"), ep("pod2", "node-b")))))
    lines = mode.dump().lower().splitlines()
    assert any("sctp" in line and "10.96.1.95" in line for line in lines), f"no SCTP cluster IP rule:\n{lines}"
    assert any("sctp" in line and "30132" in line for line in lines), f"no SCTP NodePort rule:\n{lines}"
    reason = sctp_unsupported()
    if reason:
        pytest.skip(f"rules load; no SCTP traffic: {reason}")
    procs = [
        lab.spawn(pod, [sys.executable, "-I", "-S", "-c", SCTP_SERVER, pod, "80"], stdout=subprocess.PIPE)
        for pod in ("pod1", "pod2")
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().startswith(b"READY")
        for client, ip, port in (("testpod", "10.96.1.95", 80), ("ext", NODE_IP, 30132)):
            answers = {_sctp_answer(lab, client, ip, port) for _ in range(12)}
            assert answers == {"pod1", "pod2"}, f"[{mode.name}] SCTP {client} → {ip}:{port}: {answers}"
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


# ---------------------------------------------------------------------------------------------
# `kproxy-nft trace --live` reads the node and changes nothing
# ---------------------------------------------------------------------------------------------


def _everything(lab: Lab, mode: Mode) -> str:
    """All the node namespace's rules of the mode's kind, both families (timestamps left out)."""
    if not mode.iptables:
        return lab.run_in(NODE, ["nft", "list", "ruleset"]).stdout
    backend = mode.name.split("-")[1]
    saved = (lab.run_in(NODE, [f"{tool}-{backend}-save"]).stdout for tool in ("iptables", "ip6tables"))
    return "".join(strip_comments(text) for text in saved)


def test_trace_live_reads_the_rules_and_changes_nothing(lab: Lab, mode: Mode) -> None:
    mode.load(cluster((NODEPORT, NODEPORT_EPS)))
    before = _everything(lab, mode)
    argv = [sys.executable, "-m", "kproxy_nft.cli", "trace", "--live", "--netns", lab.node_ns,
            "--proxy-mode", "iptables" if mode.iptables else "nftables",
            "--src", EXT_CLIENT_IP, "--dst", f"{NODE_IP}:30080", "-o", "json"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert _everything(lab, mode) == before
    live = json.loads(done.stdout)
    expected = predict(lab, mode.name, "ext", NODE_IP, 30080).as_dict()
    assert (live["verdict"], live["endpoints"], live["masquerade"]) == (
        expected["verdict"], expected["endpoints"], expected["masquerade"]), live
    assert live["verdict"] == "dnat" and len(live["endpoints"]) == 3 and live["masquerade"]


@pytest.mark.parametrize("proxy_mode", ["iptables", "nftables"])
def test_trace_live_without_privileges_says_so(proxy_mode: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("setpriv to nobody needs root")
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "kproxy_nft.cli",
            "trace", "--live", "--proxy-mode", proxy_mode, "--src", "10.1.0.50", "--dst", "10.96.0.1:80"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.count("\n") == 1 and "root needed" in done.stderr, done.stderr


# ---------------------------------------------------------------------------------------------
# 10. ClientIP session affinity through a NodePort
# ---------------------------------------------------------------------------------------------


def test_session_affinity_via_nodeport(lab: Lab, mode: Mode) -> None:
    eps = (ep("pod1"), ep("pod2", "node-b"), ep("pod3", "node-b"))
    sticky = svc("sticky", "10.96.1.100", node_port=30100, service_type="NodePort", session_affinity_seconds=600)
    brief = svc("brief", "10.96.1.101", node_port=30101, service_type="NodePort", session_affinity_seconds=1)
    mode.load(cluster((sticky, eps), (brief, eps)))
    res = mode.probe(lab, "ext", NODE_IP, 30100, count=20)
    assert_one_pod(mode, res, "20 connections on one endpoint")

    # A 1-second affinity: sticky within the second, a fresh random choice once it has expired.
    # Each retry after expiry is a 1-in-3 draw of the same pod, so ask until another one answers.
    res = mode.probe(lab, "ext", NODE_IP, 30101, count=5)
    first = assert_one_pod(mode, res, "5 quick connections on one endpoint")
    seen = [first]
    for _ in range(10):
        time.sleep(1.6)
        seen.append(assert_one_pod(mode, mode.probe(lab, "ext", NODE_IP, 30101, count=1), "an answer from a pod"))
        if seen[-1] != first:
            break
    assert set(seen) != {first}, f"[{mode.name}] affinity never expired: {seen}"
