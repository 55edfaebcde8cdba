"""Which conntrack flows a sync makes stale (kproxy_nft.conntrack), and the cleaner's bookkeeping.

Examples pin down kube-proxy's two cases (a UDP service port that gains endpoints, an endpoint
that leaves) on every frontend kind; a hypothesis property replays random state changes on a
simulated conntrack table and checks that what the filters leave behind is exactly the flows
that still point at a reachable endpoint. The reconciler (the table against the current state
alone, for restarts) has its own examples and properties: exactly the stale flows of any table,
whatever the order, idempotent, and the same as the diff's on the flows a previous state left.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy_nft.agent.main import Agent
from kproxy_nft.agent.metrics import new_metrics
from kproxy_nft.conntrack import (
    Flow,
    FlowFilter,
    Frontend,
    flows_to_delete,
    nodeport_destinations,
    reconcile_flows,
    stale_flow_filters,
)
from kproxy_nft.kernel import conntrack as kernel_conntrack
from kproxy_nft.kernel.conntrack import CleanupResult, ConntrackCleaner, Reconciliation, reconcile_table
from kproxy_nft.model import ClusterState, Endpoint, IPFamily, Protocol, ServicePort, ServicePortName, TrafficPolicy
from kproxy_nft.selection import categorize_endpoints
from tests.fake_proxier import FakeProxier
from tests.helpers import NODE, endpoint, service, spn

UDP, V4, V6 = Protocol.UDP, IPFamily.V4, IPFamily.V6
DNS = spn("dns", port="dns", protocol=UDP)
CIP, EXT, LB = "172.30.0.10", "203.0.113.7", "198.51.100.9"


def dns(**kw: object) -> ServicePort:
    return service(DNS, CIP, 53, **kw)


def state(svc: ServicePort | None, *eps: Endpoint) -> ClusterState:
    if svc is None:
        return ClusterState()
    return ClusterState({svc.name: svc}, {svc.name: eps} if eps else {})


def fe(ip: str | None, port: int = 53, family: IPFamily = V4) -> Frontend:
    return Frontend(family, UDP, port, ip)


EVERY_FRONTEND = dict(external_ips=(EXT,), load_balancer_ips=(LB,), node_port=30053, service_type="LoadBalancer")


# -- examples ---------------------------------------------------------------------------------


def test_nothing_changed_nothing_to_delete() -> None:
    s = state(dns(), endpoint("10.0.0.1", 53))
    assert stale_flow_filters(s, s, NODE) == ()
    assert stale_flow_filters(s, state(dns(), endpoint("10.0.0.1", 53)), NODE) == ()  # equal, not identical


def test_tcp_is_left_alone() -> None:
    web = service(spn("web"), CIP, 80)
    before = ClusterState({web.name: web}, {web.name: (endpoint("10.0.0.1"),)})
    assert stale_flow_filters(before, ClusterState({web.name: web}), NODE) == ()


def test_removed_endpoint_on_every_frontend() -> None:
    svc = dns(**EVERY_FRONTEND)
    before = state(svc, endpoint("10.0.0.1", 53), endpoint("10.0.0.2", 53))
    after = state(svc, endpoint("10.0.0.2", 53))
    gone = ("10.0.0.1", 53)
    assert stale_flow_filters(before, after, NODE) == (  # sorted by port, then address
        FlowFilter(fe(CIP), gone),
        FlowFilter(fe(LB), gone),
        FlowFilter(fe(EXT), gone),
        FlowFilter(fe(None, 30053), gone),
    )


def test_newly_served_flushes_every_flow_of_every_frontend() -> None:
    svc = dns(**EVERY_FRONTEND)
    expected = tuple(FlowFilter(f) for f in (fe(CIP), fe(LB), fe(EXT), fe(None, 30053)))
    assert stale_flow_filters(state(svc), state(svc, endpoint("10.0.0.1", 53)), NODE) == expected
    # A service that did not exist was not served either (its IP was routed to nowhere).
    assert stale_flow_filters(ClusterState(), state(svc, endpoint("10.0.0.1", 53)), NODE) == expected
    # Endpoints that are neither ready nor serving do not make it served.
    not_serving = endpoint("10.0.0.1", 53, ready=False, serving=False)
    assert stale_flow_filters(state(svc), state(svc, not_serving), NODE) == ()


def test_newly_served_wins_over_gone_endpoints() -> None:
    """Not served before (only a non-serving endpoint), served now: one filter takes everything."""
    before = state(dns(), endpoint("10.0.0.1", 53, ready=False, serving=False))
    assert stale_flow_filters(before, state(dns(), endpoint("10.0.0.2", 53)), NODE) == (FlowFilter(fe(CIP)),)


def test_deleted_service_loses_the_flows_dnated_through_it() -> None:
    before = state(dns(node_port=30053), endpoint("10.0.0.1", 53))
    assert stale_flow_filters(before, ClusterState(), NODE) == (
        FlowFilter(fe(CIP), ("10.0.0.1", 53)),
        FlowFilter(fe(None, 30053), ("10.0.0.1", 53)),
    )
    assert stale_flow_filters(state(dns()), ClusterState(), NODE) == ()  # had no endpoints: nothing NATed


def test_port_change_and_target_port_change() -> None:
    ep = endpoint("10.0.0.1", 53)
    moved = stale_flow_filters(state(dns(), ep), state(dataclasses.replace(dns(), port=54), ep), NODE)
    assert moved == (FlowFilter(fe(CIP, 53), ("10.0.0.1", 53)), FlowFilter(fe(CIP, 54)))
    retargeted = stale_flow_filters(state(dns(), ep), state(dns(), endpoint("10.0.0.1", 5353)), NODE)
    assert retargeted == (FlowFilter(fe(CIP), ("10.0.0.1", 53)),)


def test_terminating_endpoint_is_gone_only_when_no_longer_used() -> None:
    ready = (endpoint("10.0.0.1", 53), endpoint("10.0.0.2", 53))
    terminating = endpoint("10.0.0.1", 53, ready=False, serving=True, terminating=True)
    # Another endpoint is ready: the terminating one leaves the reachable set.
    after = state(dns(), terminating, endpoint("10.0.0.2", 53))
    assert stale_flow_filters(state(dns(), *ready), after, NODE) == (FlowFilter(fe(CIP), ("10.0.0.1", 53)),)
    # It is the last one: traffic keeps using it (KEP-1669), so its flows stay.
    assert stale_flow_filters(state(dns(), ready[0]), state(dns(), terminating), NODE) == ()


def test_external_traffic_policy_local_first_local_endpoint() -> None:
    """Remote endpoints served the cluster IP all along, but this node dropped NodePort traffic."""
    svc = dns(node_port=30053, external_traffic_policy=TrafficPolicy.LOCAL, service_type="NodePort")
    remote = endpoint("10.0.0.1", 53, node_name="node2")
    local = endpoint("10.0.0.2", 53, node_name=NODE.hostname)
    assert stale_flow_filters(state(svc, remote), state(svc, remote, local), NODE) == (FlowFilter(fe(None, 30053)),)


def test_internal_traffic_policy_local() -> None:
    svc = dns(internal_traffic_policy=TrafficPolicy.LOCAL)
    remote = endpoint("10.0.0.1", 53, node_name="node2")
    local = endpoint("10.0.0.2", 53, node_name=NODE.hostname)
    assert stale_flow_filters(state(svc, remote), state(svc, remote, local), NODE) == (FlowFilter(fe(CIP)),)
    assert stale_flow_filters(state(svc, remote, local), state(svc, remote), NODE) == (
        FlowFilter(fe(CIP), ("10.0.0.2", 53)),
    )


def test_dual_stack_per_family_and_canonical_ipv6() -> None:
    svc = dataclasses.replace(dns(), cluster_ips=(CIP, "fd00:96::0:a"))
    v4, v6 = endpoint("10.0.0.1", 53), endpoint("fd00:10::0001", 53)
    assert stale_flow_filters(state(svc, v4, v6), state(svc, v4), NODE) == (
        FlowFilter(fe("fd00:96::a", family=V6), ("fd00:10::1", 53)),
    )
    # An IPv6 endpoint on a service without an IPv6 cluster IP is never programmed: nothing to clean.
    assert stale_flow_filters(state(dns(), v4, v6), state(dns(), v4), NODE) == ()


def test_sctp_too() -> None:
    svc = service(spn("sig", protocol=Protocol.SCTP), CIP, 3868)
    before, after = state(svc, endpoint("10.0.0.1", 3868)), state(svc)
    assert stale_flow_filters(before, after, NODE) == (
        FlowFilter(Frontend(V4, Protocol.SCTP, 3868, CIP), ("10.0.0.1", 3868)),
    )


def flow(dst: str, dport: int, reply: tuple[str, int], sport: int = 40000, family: IPFamily = V4,
         protocol: Protocol = UDP) -> Flow:
    return Flow(family, protocol, "10.1.0.50", dst, sport, dport, reply[0], reply[1])


@pytest.mark.parametrize(
    ("f", "hit", "miss"),
    [
        (FlowFilter(fe(CIP)), flow(CIP, 53, (CIP, 53)), flow(CIP, 54, (CIP, 54))),
        (FlowFilter(fe(CIP), ("10.0.0.1", 53)), flow(CIP, 53, ("10.0.0.1", 53)), flow(CIP, 53, ("10.0.0.2", 53))),
        (FlowFilter(fe(CIP), ("10.0.0.1", 53)), flow(CIP, 53, ("10.0.0.1", 53)), flow(CIP, 53, ("10.0.0.1", 5353))),
        (FlowFilter(fe(CIP), ("10.0.0.1", 53)), flow(CIP, 53, ("10.0.0.1", 53)), flow(EXT, 53, ("10.0.0.1", 53))),
        (FlowFilter(fe(None, 30053)), flow("192.168.1.1", 30053, ("10.0.0.9", 53)), flow(CIP, 53, ("10.0.0.9", 53))),
        (FlowFilter(fe(CIP)), flow(CIP, 53, (CIP, 53)), flow(CIP, 53, (CIP, 53), protocol=Protocol.TCP)),
        (FlowFilter(fe(CIP)), flow(CIP, 53, (CIP, 53)), dataclasses.replace(flow(CIP, 53, (CIP, 53)), family=V6)),
    ],
)
def test_filter_matching(f: FlowFilter, hit: Flow, miss: Flow) -> None:
    assert f.matches(hit)
    assert not f.matches(miss)
    assert flows_to_delete([f, f], [miss, hit, hit]) == (hit,)


def test_filters_read_well_in_logs() -> None:
    assert str(FlowFilter(fe(None, 30053))) == "udp *:30053 (all flows: newly served)"
    assert str(FlowFilter(fe("fd00::a", family=V6), ("fd00::1", 53))) == (
        "udp [fd00::a]:53 DNATed to [fd00::1]:53 (endpoint gone)"
    )


# -- the reconciler: the table against the current state alone ---------------------------------

LOCAL = ("192.168.1.1", "10.0.0.254")  # the node's interface addresses (a NodePort answers on each)
EP1, EP2 = ("10.0.0.1", 53), ("10.0.0.2", 53)


def reconcile(s: ClusterState, *flows: Flow, local: tuple[str, ...] | None = LOCAL) -> dict[Flow, FlowFilter]:
    return reconcile_flows(s, NODE, flows, local)


def test_restart_with_nothing_changed_keeps_every_valid_flow() -> None:
    s = state(dns(**EVERY_FRONTEND), endpoint(*EP1), endpoint(*EP2))
    valid = [flow(CIP, 53, EP1), flow(EXT, 53, EP2, sport=2), flow(LB, 53, EP1, sport=3),
             flow(LOCAL[0], 30053, EP2, sport=4), flow(LOCAL[1], 30053, EP1, sport=5)]
    assert reconcile(s, *valid) == {}


def test_what_the_reconciler_deletes_and_why() -> None:
    s = state(dns(**EVERY_FRONTEND), endpoint(*EP2))
    gone = flow(CIP, 53, EP1)  # DNATed to a pod that is no longer an endpoint
    retargeted = flow(EXT, 53, ("10.0.0.2", 5353), sport=2)  # the right pod, an old targetPort
    unnatted = flow(CIP, 53, (CIP, 53), sport=3)  # made while the service had no endpoints
    node_port = flow(LOCAL[1], 30053, EP1, sport=4)
    assert reconcile(s, gone, retargeted, unnatted, node_port, flow(CIP, 53, EP2, sport=5)) == {
        gone: FlowFilter(fe(CIP), EP1),
        retargeted: FlowFilter(fe(EXT), ("10.0.0.2", 5353)),
        unnatted: FlowFilter(fe(CIP)),
        node_port: FlowFilter(fe(None, 30053), EP1),
    }


def test_scaled_to_zero_deletes_the_flows_to_gone_pods() -> None:
    """kubernetes#139628: kube-proxy skipped frontends without endpoints, and one-way senders kept
    their flows DNATed to the deleted pods for hours. Un-NATed flows stay: the rules reject them."""
    dnatted, unnatted = flow(CIP, 53, EP1), flow(CIP, 53, (CIP, 53), sport=2)
    assert reconcile(state(dns()), dnatted, unnatted) == {dnatted: FlowFilter(fe(CIP), EP1)}
    back = state(dns(), endpoint(*EP2))
    assert reconcile(back, dnatted, unnatted) == {dnatted: FlowFilter(fe(CIP), EP1), unnatted: FlowFilter(fe(CIP))}


def test_unnatted_node_port_flows_only_to_this_nodes_addresses() -> None:
    s = state(dns(node_port=30053, service_type="NodePort"), endpoint(*EP1))
    to_node = flow(LOCAL[0], 30053, (LOCAL[0], 30053))
    outgoing = flow("198.18.0.9", 30053, ("198.18.0.9", 30053), sport=2)  # to a server elsewhere at that port
    loopback = flow("127.0.0.1", 30053, ("127.0.0.1", 30053), sport=3)  # localhost NodePorts are off
    everything_local = (*LOCAL, "127.0.0.1")
    assert reconcile(s, to_node, outgoing, loopback, local=everything_local) == {to_node: FlowFilter(fe(None, 30053))}
    # Unknown interfaces: only the node IPs are known to be this node's.
    assert reconcile(s, to_node, local=None) == {}
    node = dataclasses.replace(NODE, node_ips=(LOCAL[0],))
    assert reconcile_flows(s, node, [to_node, outgoing]) == {to_node: FlowFilter(fe(None, 30053))}
    # --nodeport-addresses: exactly those, whatever the interfaces hold.
    node = dataclasses.replace(NODE, node_ips=(LOCAL[0],), nodeport_addresses=("10.0.0.0/8",), local_addresses=LOCAL)
    other = flow(LOCAL[1], 30053, (LOCAL[1], 30053), sport=4)
    assert reconcile_flows(s, node, [to_node, other], LOCAL) == {other: FlowFilter(fe(None, 30053))}
    # IPv4 loopback serves NodePorts with localhost NodePorts on (iptables mode): then it is ours.
    node = dataclasses.replace(NODE, localhost_nodeports=True)
    assert set(reconcile_flows(s, node, [loopback], ("127.0.0.1",))) == {loopback}
    assert nodeport_destinations(NODE, V6, ("::1", "fd00::0:1", "10.0.0.1")) == {"fd00::1"}


def test_a_service_port_wins_over_a_node_port_of_the_same_number() -> None:
    """As in the rules: the service IP:port is matched before the NodePorts."""
    other = service(spn("other", protocol=UDP), "172.30.0.99", 30053)
    svc = dns(node_port=30053, service_type="NodePort")
    s = ClusterState({svc.name: svc, other.name: other},
                     {svc.name: (endpoint(*EP1),), other.name: (endpoint("10.0.0.9", 30053),)})
    to_other = flow("172.30.0.99", 30053, ("10.0.0.9", 30053))
    assert reconcile(s, to_other) == {}
    assert set(reconcile(s, flow("172.30.0.99", 30053, EP1))) == {flow("172.30.0.99", 30053, EP1)}


def test_reconciler_ignores_what_is_not_a_service_flow() -> None:
    web = service(spn("web"), CIP, 80)  # TCP: its flows are never ours
    s = ClusterState({web.name: web, DNS: dns()}, {DNS: (endpoint(*EP1),)})
    tcp = flow(CIP, 80, ("10.0.0.7", 80), protocol=Protocol.TCP)
    elsewhere = flow("8.8.8.8", 53, ("8.8.8.8", 53), sport=2)
    wrong_family = dataclasses.replace(flow(CIP, 53, ("10.0.0.7", 53)), family=V6)
    assert reconcile(s, tcp, elsewhere, wrong_family) == {}


def test_reconciler_per_family() -> None:
    svc = dataclasses.replace(dns(), cluster_ips=(CIP, "fd00:96::a"))
    s = state(svc, endpoint("fd00:10::1", 53))  # no IPv4 endpoint: only IPv4's DNATed flows go
    v6_ok = flow("fd00:96::a", 53, ("fd00:10::1", 53), family=V6)
    v4_gone = flow(CIP, 53, EP1, sport=2)
    assert set(reconcile(s, v6_ok, v4_gone)) == {v4_gone}


# -- the cleaner's bookkeeping (the kernel part is replaced) ----------------------------------


class FakeKernel:
    """Stands in for the cleaner's two kernel calls; records which ran, with what, and answers in turn."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *answers: CleanupResult) -> None:
        self.calls: list[tuple[str, tuple[FlowFilter, ...]]] = []
        self.answers = list(answers)
        monkeypatch.setattr(kernel_conntrack, "delete_stale_flows", self.delete)
        monkeypatch.setattr(kernel_conntrack, "reconcile_table", self.reconcile)

    def _answer(self, kind: str, filters: tuple[FlowFilter, ...]) -> CleanupResult:
        self.calls.append((kind, filters))
        return self.answers.pop(0) if self.answers else CleanupResult()

    def delete(self, filters: tuple[FlowFilter, ...], netns: str | None = None) -> CleanupResult:
        return self._answer("diff", tuple(filters))

    def reconcile(self, state: ClusterState, node: object, families: object, netns: str | None = None,
                  filters: tuple[FlowFilter, ...] = (), clock: object = None) -> CleanupResult:
        return self._answer("reconcile", tuple(filters))


FAILED = CleanupResult(errors=("ctnetlink: Operation not permitted",))
GONE_1 = FlowFilter(fe(CIP), ("10.0.0.1", 53))


def test_cleaner_reconciles_first_then_diffs(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = FakeKernel(monkeypatch)
    cleaner = ConntrackCleaner(NODE, netns="kpn-x")
    both, one = state(dns(), endpoint("10.0.0.1", 53), endpoint("10.0.0.2", 53)), state(dns(), endpoint("10.0.0.2", 53))
    # A fresh cleaner (an agent that just started) knows no previous state: no diff, the table decides.
    assert cleaner.after_sync(both, {DNS}).ok
    cleaner.after_sync(one, {DNS})  # then only what the change made stale
    cleaner.after_sync(one, set())  # nothing changed: the kernel is not asked
    cleaner.after_sync(one, None)  # a full sync reconciles again
    assert kernel.calls == [("reconcile", ()), ("diff", (GONE_1,)), ("reconcile", ())]


def test_cleaner_reconciles_after_a_failure_with_the_diff_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = FakeKernel(monkeypatch, CleanupResult(), FAILED)
    cleaner = ConntrackCleaner(NODE, netns="kpn-x")
    both = state(dns(), endpoint("10.0.0.1", 53), endpoint("10.0.0.2", 53))
    cleaner.after_sync(both, {DNS})
    assert not cleaner.after_sync(state(dns(), endpoint("10.0.0.2", 53)), {DNS}).ok
    # Retried as a reconcile, still carrying the diff from the last cleaned state: the deleted
    # service's flows are found by the diff alone (the reconciler no longer sees its frontend).
    assert cleaner.after_sync(ClusterState(), {DNS}).ok
    assert kernel.calls[1:] == [
        ("diff", (GONE_1,)),
        ("reconcile", (FlowFilter(fe(CIP), ("10.0.0.1", 53)), FlowFilter(fe(CIP), ("10.0.0.2", 53)))),
    ]
    assert cleaner.previous == ClusterState()


def test_cleaner_reconciles_after_a_bug_in_the_diff(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = FakeKernel(monkeypatch)
    cleaner = ConntrackCleaner(NODE)
    served = state(dns(), endpoint(*EP1))
    cleaner.after_sync(served, {DNS})

    def bug(*args: object) -> tuple[FlowFilter, ...]:
        raise KeyError("a bug")

    monkeypatch.setattr(kernel_conntrack, "stale_flow_filters", bug)
    assert not cleaner.after_sync(served, {DNS}).ok  # reported, never raised
    monkeypatch.setattr(kernel_conntrack, "stale_flow_filters", stale_flow_filters)
    cleaner.after_sync(served, set())
    assert [kind for kind, _ in kernel.calls] == ["reconcile", "reconcile"]


def test_cleaner_keeps_only_its_families(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = FakeKernel(monkeypatch)
    cleaner = ConntrackCleaner(NODE, families=(V4,))
    svc = dataclasses.replace(dns(), cluster_ips=(CIP, "fd00:96::a"))
    v4, v6 = endpoint("10.0.0.1", 53), endpoint("fd00:10::1", 53)
    cleaner.after_sync(state(svc, v4, v6), {DNS})
    cleaner.after_sync(state(svc), {DNS})
    assert kernel.calls[1] == ("diff", (GONE_1,))


class ClosableSocket:
    def close(self) -> None:
        pass


def test_reconcile_table_per_family_with_the_diff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel calls replaced: what is listed per family, what gets deleted, what is recorded."""
    gone, valid = flow(CIP, 53, EP1), flow(CIP, 53, EP2, sport=2)
    removed_service = flow("172.30.0.77", 53, ("10.0.0.9", 53), sport=3)  # only the diff knows its frontend
    listed = {V4: [gone, valid, removed_service], V6: []}
    deleted: list[Flow] = []
    monkeypatch.setattr(kernel_conntrack, "_open", lambda family: ClosableSocket())
    monkeypatch.setattr(kernel_conntrack, "_dump", lambda sock, family, protocols: iter(listed[family]))

    def delete(sock: object, f: Flow) -> bool:
        deleted.append(f)
        return True

    monkeypatch.setattr(kernel_conntrack, "_delete", delete)
    monkeypatch.setattr(kernel_conntrack, "local_addresses", lambda: LOCAL)
    ticks = iter([10.0, 10.25, 20.0, 20.5])
    diff = FlowFilter(fe("172.30.0.77"), ("10.0.0.9", 53))
    result = reconcile_table(state(dns(), endpoint(*EP2)), NODE, [V6, V4], filters=[diff], clock=lambda: next(ticks))
    assert result.ok and result.deleted == 2
    assert deleted == [gone, removed_service]  # sorted, each once
    assert result.reconciled == (Reconciliation(V4, 3, 2, 0.25), Reconciliation(V6, 0, 0, 0.5))
    assert result.filters == (GONE_1, diff)


def test_reconcile_table_reports_a_listing_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(sock: object, family: IPFamily, protocols: object) -> Iterator[Flow]:
        raise OSError("ctnetlink: Operation not permitted")

    monkeypatch.setattr(kernel_conntrack, "_open", lambda family: ClosableSocket())
    monkeypatch.setattr(kernel_conntrack, "_dump", broken)
    monkeypatch.setattr(kernel_conntrack, "local_addresses", lambda: LOCAL)
    result = reconcile_table(state(dns()), NODE, [V4])
    # Like kube-proxy, nothing is recorded for a table that could not be listed.
    assert result.errors == ("IPv4: cleaning flows: OSError('ctnetlink: Operation not permitted')",)
    assert result.reconciled == ()


class CleaningBackend(FakeProxier):
    """A proxier whose rules always apply, with a conntrack cleaner like the real ones."""

    mode = "iptables"

    def __init__(self) -> None:
        super().__init__(NODE)
        self.conntrack = ConntrackCleaner(NODE, netns="kpn-x")

    def clean_conntrack(self, state: ClusterState,
                        changed: frozenset[ServicePortName] | None = None) -> CleanupResult:
        return self.conntrack.after_sync(state, changed)


def test_agent_counts_cleanup_errors_and_keeps_the_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = FakeKernel(monkeypatch, CleanupResult(errors=("a", "b")), CleanupResult(deleted=3))
    agent = Agent(CleaningBackend(), new_metrics(), min_sync_period=0.0, sync_period=30.0)
    for _ in range(2):
        outcome = agent.scheduler.run_due()
        assert outcome is not None and outcome.ok  # a conntrack failure never fails the sync
        agent.scheduler.request()
    errors = agent.metrics.registry.get_sample_value("kproxy_nft_conntrack_cleanup_errors_total")
    assert errors == 2 and not kernel.answers  # counted once per error; the second sync retried and succeeded
    assert [kind for kind, _ in kernel.calls] == ["reconcile", "reconcile"]


# -- property: a simulated table after random changes -----------------------------------------

NODE_IP = "192.168.1.1"  # destination of NodePort flows in the simulated table
SLOTS = range(3)


@st.composite
def udp_states(draw: st.DrawFn) -> ClusterState:
    """Up to three UDP service ports with fixed cluster IPs; ports, frontends and endpoints vary."""
    services, endpoints = {}, {}
    for i in SLOTS:
        if not draw(st.booleans()):
            continue
        svc = service(
            spn(f"s{i}", protocol=UDP), f"172.30.0.{i + 1}", draw(st.sampled_from([53, 54])),
            node_port=draw(st.sampled_from([None, 30000 + i])),
            external_ips=draw(st.sampled_from([(), (f"203.0.113.{i + 1}",)])),
        )
        services[svc.name] = svc
        eps = {}
        for _ in range(draw(st.integers(0, 3))):
            ready = draw(st.booleans())
            ep = Endpoint(f"10.0.0.{draw(st.integers(1, 4))}", draw(st.sampled_from([53, 5353])), ready=ready,
                          serving=ready or draw(st.booleans()), terminating=not ready and draw(st.booleans()))
            eps[ep.address] = ep
        endpoints[svc.name] = tuple(eps[k] for k in sorted(eps))
    return ClusterState(services, endpoints)


def frontends_of(s: ClusterState) -> dict[tuple[str, int], tuple[bool, frozenset[tuple[str, int]]]]:
    """(destination, port) → (served, reachable endpoints): the oracle, from categorize_endpoints."""
    out = {}
    for name, svc in s.services.items():
        sel = categorize_endpoints(svc, s.endpoints_of(name), NODE)
        backends = (bool(sel.cluster), frozenset((ep.ip, ep.port) for ep in sel.all_reachable))
        out.update({(ip, svc.port): backends for ip in (*svc.cluster_ips, *svc.external_ips)})
        if svc.node_port:
            out[(NODE_IP, svc.node_port)] = backends
    return out


def table_of(s: ClusterState) -> list[Flow]:
    """The flows a state leaves behind: DNATed to each reachable endpoint, or not NATed at all."""
    flows: list[Flow] = []
    for (dst, port), (served, reachable) in frontends_of(s).items():
        for reply in sorted(reachable) if served else [(dst, port)]:
            flows.append(flow(dst, port, reply, sport=40000 + len(flows)))
    return flows


@settings(max_examples=300, deadline=None)
@given(udp_states(), udp_states())
def test_what_survives_points_at_reachable_endpoints(before: ClusterState, after: ClusterState) -> None:
    filters = stale_flow_filters(before, after, NODE)
    assert list(filters) == sorted(set(filters), key=FlowFilter.sort_key)  # a deterministic set
    assert stale_flow_filters(before, after, NODE) == filters
    table = table_of(before)
    deleted = set(flows_to_delete(filters, table))
    now, then = frontends_of(after), frontends_of(before)
    for f in table:
        served, reachable = now.get((f.orig_dst, f.orig_dport), (False, frozenset()))
        natted = (f.reply_src, f.reply_sport) != (f.orig_dst, f.orig_dport)
        if f in deleted:
            # Only what went stale: a NAT to a gone endpoint, or a frontend that became served.
            assert (natted and (f.reply_src, f.reply_sport) not in reachable) or (
                served and not then[(f.orig_dst, f.orig_dport)][0]
            ), f
        else:
            # What stays is NATed to an endpoint still reachable, or not NATed and still unserved.
            assert (f.reply_src, f.reply_sport) in reachable if natted else not served, f


@settings(max_examples=150, deadline=None)
@given(udp_states(), udp_states())
def test_candidates_from_the_change_tracker_give_the_same_filters(before: ClusterState, after: ClusterState) -> None:
    """With the changed ports named (as the agent's tracker does), nothing else is compared."""
    changed = {n for n in {*before.services, *after.services}
               if before.services.get(n) != after.services.get(n) or before.endpoints_of(n) != after.endpoints_of(n)}
    expected = stale_flow_filters(before, after, NODE)
    assert stale_flow_filters(before, after, NODE, changed) == expected
    assert stale_flow_filters(before, after, NODE, set()) == ()


# -- properties of the reconciler --------------------------------------------------------------

OTHER_HOST = "192.168.1.2"  # not this node: un-NATed flows to its ports are never ours
DESTINATIONS = [*(f"172.30.0.{i + 1}" for i in SLOTS), *(f"203.0.113.{i + 1}" for i in SLOTS), NODE_IP, OTHER_HOST]
PORTS = [53, 54, *(30000 + i for i in SLOTS), 40000]


@st.composite
def tables(draw: st.DrawFn) -> list[Flow]:
    """Any mix of flows to the states' frontends and elsewhere: not NATed, or NATed to a pod or anywhere."""
    flows = []
    for sport in draw(st.lists(st.integers(1024, 65535), unique=True, max_size=25)):
        dst, dport = draw(st.sampled_from(DESTINATIONS)), draw(st.sampled_from(PORTS))
        reply = draw(st.one_of(
            st.just((dst, dport)),
            st.tuples(st.sampled_from([f"10.0.0.{i}" for i in range(1, 5)]), st.sampled_from([53, 5353])),
            st.tuples(st.sampled_from(DESTINATIONS), st.sampled_from(PORTS)),
        ))
        protocol = draw(st.sampled_from([UDP, UDP, UDP, Protocol.TCP]))
        flows.append(flow(dst, dport, reply, sport=sport, protocol=protocol))
    return flows


def frontend_of(s: ClusterState, f: Flow) -> tuple[bool, frozenset[tuple[str, int]], bool] | None:
    """The oracle: (served, reachable, is a NodePort) of the frontend a flow was sent to, a service
    IP:port first."""
    by_ip, by_port = {}, {}
    for name, svc in s.services.items():
        sel = categorize_endpoints(svc, s.endpoints_of(name), NODE)
        backends = (bool(sel.cluster), frozenset((ep.ip, ep.port) for ep in sel.all_reachable))
        by_ip.update({(ip, svc.port): backends for ip in (*svc.cluster_ips, *svc.external_ips)})
        if svc.node_port:
            by_port[svc.node_port] = backends
    if f.protocol is not UDP:
        return None
    found = by_ip.get((f.orig_dst, f.orig_dport))
    if found is not None:
        return (*found, False)
    found = by_port.get(f.orig_dport)
    return None if found is None else (*found, True)


def reversed_state(s: ClusterState) -> ClusterState:
    """The same state with its services and endpoints in the opposite order."""
    return ClusterState(dict(reversed(list(s.services.items()))), dict(reversed(list(s.endpoints.items()))))


@settings(max_examples=300, deadline=None)
@given(udp_states(), tables(), st.randoms(use_true_random=False))
def test_reconciler_deletes_exactly_the_stale_flows(s: ClusterState, table: list[Flow], rnd: random.Random) -> None:
    stale = reconcile_flows(s, NODE, table, (NODE_IP,))
    for f in table:
        found = frontend_of(s, f)
        natted = (f.reply_src, f.reply_sport) != (f.orig_dst, f.orig_dport)
        if found is None or (f.reply_src, f.reply_sport) in found[1]:
            assert f not in stale, f  # not a service's flow, or DNATed to an endpoint valid now
        elif natted:
            assert f in stale, f  # DNATed to what no longer is an endpoint (also of an empty frontend)
        else:  # not NATed: stale once served, and for a NodePort only when sent to this node
            served, _, node_port = found
            assert (f in stale) == (served and (not node_port or f.orig_dst == NODE_IP)), f
    # Input order never matters, neither the table's nor the state's.
    shuffled = rnd.sample(table, len(table))
    assert reconcile_flows(reversed_state(s), NODE, shuffled, (NODE_IP,)) == stale
    # Deleting what it picks leaves nothing to pick.
    assert reconcile_flows(s, NODE, [f for f in table if f not in stale], (NODE_IP,)) == {}


@settings(max_examples=300, deadline=None)
@given(udp_states(), udp_states())
def test_reconciler_agrees_with_the_diff(before: ClusterState, after: ClusterState) -> None:
    """On the flows `before` left, the reconciler deletes what the diff deletes, except the flows of
    frontends `after` no longer has (which only the diff can know of), and nothing more."""
    table = table_of(before)
    by_diff = set(flows_to_delete(stale_flow_filters(before, after, NODE), table))
    by_reconciler = set(reconcile_flows(after, NODE, table, (NODE_IP,)))
    assert by_reconciler <= by_diff
    assert by_reconciler == {f for f in by_diff if frontend_of(after, f) is not None}
