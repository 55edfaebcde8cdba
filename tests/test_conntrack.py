"""Which conntrack flows a sync makes stale (kproxy_nft.conntrack), and the cleaner's bookkeeping.

Examples pin down kube-proxy's two cases (a UDP service port that gains endpoints, an endpoint
that leaves) on every frontend kind; a hypothesis property replays random state changes on a
simulated conntrack table and checks that what the filters leave behind is exactly the flows
that still point at a reachable endpoint.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy_nft.agent.main import Agent
from kproxy_nft.agent.metrics import new_metrics
from kproxy_nft.conntrack import Flow, FlowFilter, Frontend, flows_to_delete, stale_flow_filters
from kproxy_nft.kernel import conntrack as kernel_conntrack
from kproxy_nft.kernel.conntrack import CleanupResult, ConntrackCleaner
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


# -- the cleaner's bookkeeping (the kernel part is replaced) ----------------------------------


def test_cleaner_retries_after_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[FlowFilter, ...]] = []
    outcome = [CleanupResult(errors=("ctnetlink: Operation not permitted",)), CleanupResult(deleted=1)]

    def fake_delete(filters: tuple[FlowFilter, ...], netns: str | None = None) -> CleanupResult:
        calls.append(tuple(filters))
        return outcome.pop(0)

    monkeypatch.setattr(kernel_conntrack, "delete_stale_flows", fake_delete)
    cleaner = ConntrackCleaner(NODE, netns="kpn-x")
    served = state(dns(), endpoint("10.0.0.1", 53))
    assert not cleaner.after_sync(served).ok  # first sync: newly served, and the delete fails
    assert cleaner.after_sync(served).deleted == 1  # same state: the same filters are tried again
    assert calls == [(FlowFilter(fe(CIP)),)] * 2
    assert cleaner.after_sync(served) == CleanupResult()  # done: nothing changed, the kernel is not asked
    assert len(calls) == 2


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
    results = [CleanupResult(errors=("a", "b")), CleanupResult(deleted=3)]
    monkeypatch.setattr(kernel_conntrack, "delete_stale_flows", lambda filters, netns=None: results.pop(0))
    backend = CleaningBackend()
    # Last cleaned for a served DNS port; the tracker's (empty) state then makes its endpoint gone.
    backend.conntrack.previous = state(dns(), endpoint("10.0.0.1", 53))
    agent = Agent(backend, new_metrics(), min_sync_period=0.0, sync_period=30.0)
    for _ in range(2):
        outcome = agent.scheduler.run_due()
        assert outcome is not None and outcome.ok  # a conntrack failure never fails the sync
        agent.scheduler.request()
    errors = agent.metrics.registry.get_sample_value("kproxy_nft_conntrack_cleanup_errors_total")
    assert errors == 2 and results == []  # counted once per error; the second sync retried and succeeded


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
    flows = []
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
