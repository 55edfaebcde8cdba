"""Stale UDP conntrack flows in a real kernel: a client that keeps its socket follows the rules again.

One long-lived UDP socket in a pod-client namespace talks to a ClusterIP service of a fresh
netlab (its node namespace programmed by the agent's backends, in every mode). Without the
cleanup its flow keeps the old NAT decision - both situations are asserted first, so the
tests fail if the cleanup is a no-op - and after `ConntrackCleaner.after_sync` the next
datagram of the same socket reaches a live endpoint. `conntrack -L` is only used to look.

Across an agent restart (a new proxier, hence a new cleaner that knows no previous state, on
the same namespace) the opposite matters as much: the flows that are still valid survive
(kubernetes#122740), while those DNATed to pods that went away, also when a service has no
endpoints left (kubernetes#139628), and un-NATed ones to a frontend served now, do not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kproxy_nft.conntrack import flows_to_delete, stale_flow_filters
from kproxy_nft.kernel.conntrack import ConntrackCleaner, list_flows
from kproxy_nft.kernel.netns import entered
from kproxy_nft.lab import ClientSpec, Lab, PodSpec
from kproxy_nft.model import ClusterState, Endpoint, IPFamily, NodeContext, Protocol, ServicePort, ServicePortName
from kproxy_nft.proxier import Proxier
from kproxy_nft.proxier.iptables import IptablesProxier
from kproxy_nft.proxier.nftables import NftablesProxier
from tests.kernel.conftest import serving_lab

pytestmark = pytest.mark.kernel

NODE = NodeContext(hostname="node1", cluster_cidrs=("10.1.0.0/16",))
PODS = (PodSpec("pod1", "10.1.0.47", udp_ports=(53,)), PodSpec("pod2", "10.1.0.48", udp_ports=(53,)))
CLIENT = ClientSpec("client", "10.1.0.50")
EXTERNAL = ClientSpec("ext", "192.168.100.2")  # off-cluster, routed to the node's 192.168.100.1
VIP = "10.96.0.53"
DNS = ServicePort(ServicePortName("kube-system", "dns", "dns", Protocol.UDP), 53, 53, cluster_ips=(VIP,))


def state(*pod_ips: str) -> ClusterState:
    return ClusterState({DNS.name: DNS}, {DNS.name: tuple(Endpoint(ip, 53) for ip in pod_ips)})


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A fresh lab per test: each starts with an empty conntrack table."""
    with serving_lab(PODS, (CLIENT, EXTERNAL)) as the_lab:
        yield the_lab


def new_proxier(mode: str, lab: Lab) -> Proxier:
    """A fresh proxier of `mode` ("iptables-nft", "iptables-legacy", "nftables") for the lab's node:
    what an agent that (re)starts makes."""
    if mode == "nftables":
        return NftablesProxier(NODE, netns=lab.node_ns)
    return IptablesProxier(NODE, iptables_backend=mode.split("-")[1], netns=lab.node_ns)


@pytest.fixture(params=["iptables-nft", "iptables-legacy", "nftables"])
def backend_mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def backend(backend_mode: str, lab: Lab) -> Iterator[Proxier]:
    """The agent's backend of the mode under test, programming the lab's node (gone with the lab)."""
    proxier = new_proxier(backend_mode, lab)
    try:
        yield proxier
    finally:
        proxier.close()


def udp_socket(netns: str, destination: tuple[str, int] = (VIP, 53)) -> socket.socket:
    """A UDP socket inside `netns`, connected to `destination`: one source port throughout."""
    with entered(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # created here, it stays in that namespace
    try:
        sock.settimeout(0.5)
        sock.connect(destination)
    except OSError:
        sock.close()
        raise
    return sock


@pytest.fixture
def client(lab: Lab) -> Iterator[socket.socket]:
    with udp_socket(lab.client_ns(CLIENT.name)) as sock:
        yield sock


@pytest.fixture
def clients(lab: Lab) -> Iterator[list[socket.socket]]:
    """Several long-lived UDP clients (QUIC-like: each keeps its source port, hence its flow)."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(udp_socket(lab.client_ns(CLIENT.name))) for _ in range(6)]


def ask(sock: socket.socket) -> str | None:
    """Send one datagram; the answering pod's name, or None when no pod answers.

    Not NATed, a datagram to the VIP either vanishes (routed to the lab's dead end) or, where
    the rules reject traffic to cluster IPs that was not DNATed, comes back as "refused".
    """
    sock.send(b"who\n")
    try:
        return sock.recv(512).decode().split()[0]
    except (TimeoutError, ConnectionRefusedError):
        return None


def reply_sources(lab: Lab) -> set[str]:
    """Where the node's UDP flows to the VIP are NATed to, as the conntrack tool shows them."""
    out = subprocess.run(
        ["ip", "netns", "exec", lab.node_ns, "conntrack", "-L", "-p", "udp", "--orig-dst", VIP],
        capture_output=True, text=True, check=True,
    ).stdout
    # Each line holds the original tuple, then the reply tuple: the second `src=` is the reply source.
    return {line.split("src=")[2].split()[0] for line in out.splitlines() if line.count("src=") == 2}


def test_flow_to_a_removed_endpoint_moves_on(lab: Lab, backend: Proxier, client: socket.socket) -> None:
    cleaner = ConntrackCleaner(NODE, netns=lab.node_ns)
    backend.sync(state("10.1.0.47"), True)
    assert cleaner.after_sync(state("10.1.0.47")).ok
    assert ask(client) == "pod1"

    backend.sync(state("10.1.0.48"), False)  # pod1 is no longer an endpoint
    # Without a cleanup the flow keeps its DNAT to pod1: this is what the cleanup is for.
    assert ask(client) == "pod1"
    assert reply_sources(lab) == {"10.1.0.47"}

    result = cleaner.after_sync(state("10.1.0.48"))
    assert result.ok and result.deleted == 1, result
    assert ask(client) == "pod2"
    assert reply_sources(lab) == {"10.1.0.48"}
    flows = list_flows(IPFamily.V4, [Protocol.UDP], netns=lab.node_ns)
    assert [(f.orig_dst, f.reply_src, f.orig_sport) for f in flows] == [
        (VIP, "10.1.0.48", client.getsockname()[1])
    ]


def test_flow_created_before_the_service_had_endpoints_is_flushed(
    lab: Lab, backend: Proxier, client: socket.socket
) -> None:
    cleaner = ConntrackCleaner(NODE, netns=lab.node_ns)
    backend.sync(ClusterState(), True)  # no service yet: the datagram is routed to the dead end
    assert ask(client) is None
    assert reply_sources(lab) == {VIP}  # a flow without NAT: its answer would come from the VIP

    backend.sync(state("10.1.0.47"), False)
    assert ask(client) is None  # the un-NATed flow black-holes the client despite the new rules

    result = cleaner.after_sync(state("10.1.0.47"))
    assert result.ok and result.deleted == 1, result
    assert ask(client) == "pod1"


Tuples = set[tuple[str, int, str, int]]


def udp_flows(lab: Lab) -> Tuples:
    """The node's UDP flows to the VIP: (client source, source port, reply source, reply port)."""
    return {(f.orig_src, f.orig_sport, f.reply_src, f.reply_sport)
            for f in list_flows(IPFamily.V4, [Protocol.UDP], netns=lab.node_ns) if f.orig_dst == VIP}


@contextlib.contextmanager
def restarted(backend_mode: str, lab: Lab, now: ClusterState) -> Iterator[Proxier]:
    """An agent that starts on a node its predecessor programmed: a new proxier (with a new
    conntrack cleaner, knowing no previous state) whose first, full sync brings `now`."""
    proxier = new_proxier(backend_mode, lab)
    try:
        proxier.sync(now, True)
        yield proxier
    finally:
        proxier.close()


def test_restart_with_nothing_changed_keeps_every_flow(
    lab: Lab, backend: Proxier, backend_mode: str, clients: list[socket.socket]
) -> None:
    both = state("10.1.0.47", "10.1.0.48")
    backend.sync(both, True)
    assert backend.clean_conntrack(both).ok
    answered = [ask(sock) for sock in clients]
    assert set(answered) <= {"pod1", "pod2"} and None not in answered, answered
    before = udp_flows(lab)
    assert len(before) == len(clients) and {reply for _, _, reply, _ in before} <= {"10.1.0.47", "10.1.0.48"}
    # What the agent did before: diff from an empty state, which takes every flow for stale.
    old_way = stale_flow_filters(ClusterState(), both, NODE)
    assert len(flows_to_delete(old_way, list_flows(IPFamily.V4, [Protocol.UDP], netns=lab.node_ns))) == len(before)

    with restarted(backend_mode, lab, both) as agent:
        result = agent.clean_conntrack(both)  # its first cleanup: a reconcile of the whole table
        assert result.ok and result.deleted == 0, result
        v4 = {r.family: r for r in result.reconciled}[IPFamily.V4]
        assert v4.deleted == 0 and v4.listed >= len(before) and v4.seconds > 0, v4
        assert udp_flows(lab) == before  # every entry is still there, with its NAT decision
        assert [ask(sock) for sock in clients] == answered  # and each client reaches the same pod


@pytest.mark.parametrize("while_down", [False, True], ids=["agent-running", "agent-restarted"])
def test_udp_service_scaled_to_zero_and_back_leaves_no_stale_flow(
    lab: Lab, backend: Proxier, backend_mode: str, client: socket.socket, while_down: bool
) -> None:
    """kubernetes#139628: kube-proxy's reconciler skipped a service without endpoints, so the flows
    of one-way senders stayed DNATed to the deleted pod. Here the zero is seen by a partial sync,
    or only by the reconcile of an agent that restarts while the service has no endpoints."""
    one, zero, other = state("10.1.0.47"), state(), state("10.1.0.48")
    backend.sync(one, True)
    assert backend.clean_conntrack(one).ok
    assert ask(client) == "pod1"
    assert {reply for _, _, reply, _ in udp_flows(lab)} == {"10.1.0.47"}

    with contextlib.ExitStack() as stack:
        agent = stack.enter_context(restarted(backend_mode, lab, zero)) if while_down else backend
        if not while_down:
            agent.sync(zero, False, frozenset({DNS.name}))
        result = agent.clean_conntrack(zero, None if while_down else frozenset({DNS.name}))
        assert result.ok and result.deleted == 1, result
        # What the agent exports as conntrack_reconciler_deleted_entries_total{ip_family="IPv4"}:
        # a reconcile ran only on the restarted agent (a partial sync diffs).
        assert [(r.family, r.deleted) for r in result.reconciled if r.family is IPFamily.V4] == (
            [(IPFamily.V4, 1)] if while_down else []
        )
        assert {reply for _, _, reply, _ in udp_flows(lab)} <= {VIP}  # nothing left DNATed to pod1
        assert ask(client) is None  # no endpoints: rejected, not sent to the deleted pod
        assert "10.1.0.47" not in {reply for _, _, reply, _ in udp_flows(lab)}

        agent.sync(other, False, frozenset({DNS.name}))  # scaled back, to another pod
        assert agent.clean_conntrack(other, frozenset({DNS.name})).ok
        assert ask(client) == "pod2"
        assert {reply for _, _, reply, _ in udp_flows(lab)} == {"10.1.0.48"}  # no stale flow survives


def test_restart_deletes_unnatted_node_port_flows_only_to_this_node(
    lab: Lab, backend: Proxier, backend_mode: str
) -> None:
    """Flows to the NodePort made before it had endpoints black-hole their clients; a flow of the
    node's own to a server elsewhere at the same port number is not the NodePort's (kube-proxy's
    reconciler matches the port alone and would delete it on every sync)."""
    node_port = 30053
    served = ClusterState({DNS.name: dataclasses.replace(DNS, node_port=node_port, service_type="NodePort")},
                          {DNS.name: (Endpoint("10.1.0.47", 53),)})
    node_ip, elsewhere = lab.addressing.node_ip, "192.168.100.254"
    backend.sync(ClusterState(), True)  # rules, hence connection tracking, but no service yet
    with udp_socket(lab.client_ns(EXTERNAL.name), (node_ip, node_port)) as external, \
            udp_socket(lab.node_ns, (elsewhere, node_port)) as outgoing:
        assert ask(external) is None  # nothing listens at the node's port
        outgoing.send(b"hello\n")  # to the dead-end upstream: a flow that is never answered
        tracked = {(f.orig_dst, f.reply_src) for f in list_flows(IPFamily.V4, [Protocol.UDP], netns=lab.node_ns)
                   if f.orig_dport == node_port}
        assert tracked == {(node_ip, node_ip), (elsewhere, elsewhere)}  # two flows, neither NATed

        with restarted(backend_mode, lab, served) as agent:
            result = agent.clean_conntrack(served)
            assert result.ok and result.deleted == 1, result
            left = [f for f in list_flows(IPFamily.V4, [Protocol.UDP], netns=lab.node_ns) if f.orig_dport == node_port]
            assert [(f.orig_dst, f.orig_sport) for f in left] == [(elsewhere, outgoing.getsockname()[1])]
            assert ask(external) == "pod1"  # the same socket now reaches the NodePort's endpoint


DNS_YAML = f"""\
apiVersion: v1
kind: Service
metadata: {{name: dns, namespace: kube-system}}
spec: {{clusterIP: {VIP}, ports: [{{name: dns, port: 53, protocol: UDP}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: dns-1, namespace: kube-system, labels: {{kubernetes.io/service-name: dns}}}}
addressType: IPv4
ports: [{{name: dns, port: 53, protocol: UDP}}]
endpoints: [{{addresses: ["10.1.0.48"]}}]
"""


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_cli_apply_cleans_after_a_change(lab: Lab, client: socket.socket, mode: str, tmp_path: Path) -> None:
    def apply() -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "kproxy_nft.cli", "apply", "-f", str(tmp_path), "--proxy-mode", mode,
                "--cluster-cidr", "10.1.0.0/16", "--iptables-backend", "nft"]
        return lab.run_in("node", argv, check=False)  # the whole command runs inside the lab's node

    # No service yet. (Rules must exist: a namespace without NAT rules tracks no connections.)
    res = apply()
    assert res.returncode == 1 and "stale flows" not in res.stdout, res.stdout + res.stderr
    assert ask(client) is None
    assert reply_sources(lab) == {VIP}

    (tmp_path / "dns.yaml").write_text(DNS_YAML)
    res = apply()
    assert res.returncode == 1, res.stdout + res.stderr
    assert "conntrack: 1 stale flows deleted" in res.stdout, res.stdout + res.stderr
    assert ask(client) == "pod2"


def test_cleanup_in_a_missing_namespace_reports_instead_of_raising() -> None:
    result = ConntrackCleaner(NODE, netns="kpn-does-not-exist").after_sync(state("10.1.0.47"))
    assert not result.ok and "kpn-does-not-exist" in result.errors[0]
