"""Endpoint selection (kube-proxy's CategorizeEndpoints), the one function both backends use."""

from __future__ import annotations

from dataclasses import replace

from kproxy_nft.model import NodeContext, TrafficPolicy
from kproxy_nft.selection import categorize_endpoints
from tests.helpers import NODE, endpoint, service

READY_LOCAL = endpoint("10.0.0.1", node_name="node1")
READY_REMOTE = endpoint("10.0.0.2", node_name="node2")
TERMINATING_LOCAL = endpoint("10.0.0.3", node_name="node1", ready=False, serving=True, terminating=True)
TERMINATING_REMOTE = endpoint("10.0.0.4", node_name="node2", ready=False, serving=True, terminating=True)
NOT_SERVING = endpoint("10.0.0.5", node_name="node1", ready=False, serving=False, terminating=True)


def ips(eps: tuple) -> list[str]:  # type: ignore[type-arg]
    return [ep.ip for ep in eps]


def test_cluster_policy_uses_ready_endpoints_only() -> None:
    sel = categorize_endpoints(service(), (READY_LOCAL, READY_REMOTE, TERMINATING_LOCAL), NODE)
    assert ips(sel.cluster) == ["10.0.0.1", "10.0.0.2"] and sel.local == () and sel.has_any
    assert sel.all_reachable == sel.cluster


def test_falls_back_to_serving_terminating_when_nothing_is_ready() -> None:
    sel = categorize_endpoints(service(), (TERMINATING_LOCAL, TERMINATING_REMOTE, NOT_SERVING), NODE)
    assert ips(sel.cluster) == ["10.0.0.3", "10.0.0.4"]


def test_no_usable_endpoints() -> None:
    sel = categorize_endpoints(service(), (NOT_SERVING,), NODE)
    assert sel.cluster == () and not sel.has_any


def test_internal_local_uses_this_nodes_endpoints_and_their_terminating_fallback() -> None:
    svc = service(internal_traffic_policy=TrafficPolicy.LOCAL)
    sel = categorize_endpoints(svc, (READY_LOCAL, READY_REMOTE), NODE)
    assert sel.cluster == () and ips(sel.local) == ["10.0.0.1"] and sel.all_reachable == sel.local
    sel = categorize_endpoints(svc, (TERMINATING_LOCAL, READY_REMOTE), NODE)
    assert ips(sel.local) == ["10.0.0.3"] and sel.local_uses_terminating and sel.has_any
    sel = categorize_endpoints(svc, (READY_REMOTE,), NODE)
    assert sel.local == () and sel.has_any


def test_external_local_keeps_cluster_endpoints_for_short_circuit_and_unions_both() -> None:
    svc = service(external_traffic_policy=TrafficPolicy.LOCAL, node_port=30080, service_type="NodePort")
    sel = categorize_endpoints(svc, (TERMINATING_LOCAL, READY_REMOTE), NODE)
    assert ips(sel.cluster) == ["10.0.0.2"] and ips(sel.local) == ["10.0.0.3"]
    assert ips(sel.all_reachable) == ["10.0.0.2", "10.0.0.3"]


def test_zone_hints_narrow_only_when_every_ready_endpoint_has_them() -> None:
    node = replace(NODE, zone="a")
    a = endpoint("10.0.0.1", zone_hints=frozenset({"a"}))
    b = endpoint("10.0.0.2", zone_hints=frozenset({"b"}))
    unhinted = endpoint("10.0.0.3")
    assert ips(categorize_endpoints(service(), (a, b), node).cluster) == ["10.0.0.1"]
    assert ips(categorize_endpoints(service(), (a, b, unhinted), node).cluster) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    # No hint for this zone: use everything rather than black-hole the traffic.
    assert len(categorize_endpoints(service(), (b,), node).cluster) == 1
    assert len(categorize_endpoints(service(), (a, b), NodeContext(hostname="node1")).cluster) == 2


def test_node_hints_win_over_zone_hints() -> None:
    node = replace(NODE, zone="a")
    mine = endpoint("10.0.0.1", zone_hints=frozenset({"a"}), node_hints=frozenset({"node1"}))
    other = endpoint("10.0.0.2", zone_hints=frozenset({"a"}), node_hints=frozenset({"node2"}))
    assert ips(categorize_endpoints(service(), (mine, other), node).cluster) == ["10.0.0.1"]
