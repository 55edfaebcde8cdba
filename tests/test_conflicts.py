"""Destinations claimed twice: one deterministic winner, and the index equals a fresh resolve."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy_nft.compile import nftables
from kproxy_nft.compile.iptables import compile_ruleset, render_restore
from kproxy_nft.conflicts import ConflictIndex, claims, resolve
from kproxy_nft.model import ClusterState, IPFamily, Protocol, ServicePort, ServicePortName
from tests.helpers import NODE

A = ServicePortName("shop", "a", "http")
B = ServicePortName("shop", "b", "http")
C = ServicePortName("zoo", "c", "")


def port(name: ServicePortName, cluster_ip: str, **fields: object) -> ServicePort:
    return ServicePort(name=name, port=80, target_port=8080, cluster_ips=(cluster_ip,), **fields)  # type: ignore[arg-type]


def test_an_external_ip_never_takes_another_services_cluster_ip() -> None:
    """CVE-2020-8554: an externalIP naming a cluster IP must not capture its traffic."""
    thief = port(A, "10.96.0.1", external_ips=("10.96.0.2",))  # A sorts first, and still loses
    victim = port(B, "10.96.0.2")
    state, found = resolve(ClusterState({A: thief, B: victim}))
    assert state.services[B] == victim
    assert state.services[A].external_ips == ()
    assert [str(c) for c in found] == [
        "10.96.0.2:80/TCP is claimed twice: cluster IP of shop/b:http keeps it; externalIP of shop/a:http "
        "is not programmed there (allocated addresses win over externalIPs, then name order)"
    ]


def test_equal_claims_go_to_the_first_name() -> None:
    a = port(A, "10.96.0.1", external_ips=("192.0.2.1",), node_port=30080, service_type="NodePort")
    b = port(B, "10.96.0.2", external_ips=("192.0.2.1",), node_port=30080, service_type="NodePort")
    state, found = resolve(ClusterState({B: b, A: a}))
    assert state.services[A] == a
    assert (state.services[B].external_ips, state.services[B].node_port) == ((), None)
    assert len(found) == 2


def test_other_protocols_and_ports_do_not_conflict() -> None:
    a = port(A, "10.96.0.1", external_ips=("192.0.2.1",))
    b = port(ServicePortName("shop", "b", "dns", Protocol.UDP), "10.96.0.2", external_ips=("192.0.2.1",))
    state, found = resolve(ClusterState({A: a, B: b}))
    assert found == () and dict(state.services) == {A: a, B: b}


names = st.sampled_from([A, B, C, ServicePortName("shop", "a", "dns", Protocol.UDP)])
ips = st.sampled_from(["10.96.0.1", "10.96.0.2", "192.0.2.1", "fd00::1"])


@st.composite
def ports(draw: st.DrawFn, name: ServicePortName) -> ServicePort:
    return ServicePort(
        name=name, port=draw(st.sampled_from([80, 443])), target_port=80, service_type="LoadBalancer",
        cluster_ips=(draw(ips),), external_ips=tuple(draw(st.lists(ips, max_size=2, unique=True))),
        load_balancer_ips=tuple(draw(st.lists(ips, max_size=1))), node_port=draw(st.sampled_from([None, 30000])),
    )


@st.composite
def states(draw: st.DrawFn) -> ClusterState:
    chosen = draw(st.lists(names, unique=True, max_size=4))
    return ClusterState({name: draw(ports(name)) for name in chosen})


@given(states(), st.randoms(use_true_random=False))
@settings(max_examples=300, deadline=None)
def test_resolve_leaves_each_destination_to_one_port_in_any_order(state: ClusterState, rnd: random.Random) -> None:
    resolved, _ = resolve(state)
    items = list(state.services.items())
    rnd.shuffle(items)
    assert resolve(ClusterState(dict(items)))[0] == resolved
    seen: set[object] = set()
    for svc in resolved.services.values():
        for destination in claims(svc):
            assert destination not in seen
            seen.add(destination)
    # Both compilers take the resolved state (nftables would refuse a duplicate map key).
    render_restore(compile_ruleset(resolved, NODE, IPFamily.V4))
    nftables.render_script(nftables.compile_all(resolved, NODE))


@st.composite
def edits(draw: st.DrawFn) -> list[tuple[ServicePortName, ServicePort | None]]:
    """A sequence of single changes: one service port added, changed or removed at a time."""
    out: list[tuple[ServicePortName, ServicePort | None]] = []
    for _ in range(draw(st.integers(1, 12))):
        name = draw(names)
        out.append((name, draw(st.none() | ports(name))))
    return out


@given(edits())
@settings(max_examples=300, deadline=None)
def test_the_index_updated_per_change_equals_a_fresh_resolve(changes: list[tuple[ServicePortName, ServicePort | None]]
                                                             ) -> None:
    index = ConflictIndex()
    current: dict[ServicePortName, ServicePort] = {}
    programmed: dict[ServicePortName, ServicePort] = {}
    for name, new in changes:
        for affected in index.update(name, new):  # only these are recomputed: the rest must be right already
            resolved = index.resolved(affected)
            if resolved is None:
                programmed.pop(affected, None)
            else:
                programmed[affected] = resolved
        if new is None:
            current.pop(name, None)
        else:
            current[name] = new
        expected, found = resolve(ClusterState(current))
        assert programmed == dict(expected.services)
        assert [str(c) for c in index.conflicts()] == [str(c) for c in found]
