"""`/metrics` carries kube-proxy 1.33+'s metrics under their names, types and labels (issue 15, item 3).

KUBE_PROXY is kube-proxy's `pkg/proxy/metrics` as the Kubernetes metrics reference lists it for
v1.34 (kubernetes/website content/en/docs/reference/instrumentation/metrics.md, generated from
the source). The `ip_family` label came with kubernetes#129173 ("kube-proxy implement dual
stack metrics", merged 2024-12, in 1.33). Left out: the two "Custom" metrics kube-proxy reads
from iptables counters (`iptables_ct_state_invalid_dropped_packets_total`,
`iptables_localhost_nodeports_accepted_packets_total`).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from kproxy_nft.agent.http import Listener, metrics_route
from kproxy_nft.agent.metrics import NoLocalEndpoints, new_metrics, no_local_endpoints
from kproxy_nft.model import ClusterState, IPFamily, TrafficPolicy
from tests.helpers import NODE, endpoint, service, spn
from tests.test_agent_http import get

FAMILY = ("ip_family",)
# name (without the `kubeproxy_` prefix) → (type, label names)
KUBE_PROXY: dict[str, tuple[str, tuple[str, ...]]] = {
    "sync_proxy_rules_duration_seconds": ("histogram", FAMILY),
    "sync_full_proxy_rules_duration_seconds": ("histogram", FAMILY),
    "sync_partial_proxy_rules_duration_seconds": ("histogram", FAMILY),
    "sync_proxy_rules_last_timestamp_seconds": ("gauge", FAMILY),
    "sync_proxy_rules_last_queued_timestamp_seconds": ("gauge", FAMILY),
    "network_programming_duration_seconds": ("histogram", FAMILY),
    "sync_proxy_rules_endpoint_changes_pending": ("gauge", ()),
    "sync_proxy_rules_endpoint_changes_total": ("counter", ()),
    "sync_proxy_rules_service_changes_pending": ("gauge", ()),
    "sync_proxy_rules_service_changes_total": ("counter", ()),
    "sync_proxy_rules_iptables_total": ("gauge", ("ip_family", "table")),
    "sync_proxy_rules_iptables_last": ("gauge", ("ip_family", "table")),
    "sync_proxy_rules_iptables_restore_failures_total": ("counter", FAMILY),
    "sync_proxy_rules_iptables_partial_restore_failures_total": ("counter", FAMILY),
    "sync_proxy_rules_nftables_sync_failures_total": ("counter", FAMILY),
    "sync_proxy_rules_nftables_cleanup_failures_total": ("counter", FAMILY),
    "sync_proxy_rules_no_local_endpoints_total": ("gauge", ("ip_family", "traffic_policy")),
    "proxy_healthz_total": ("counter", ("code",)),
    "proxy_livez_total": ("counter", ("code",)),
    "conntrack_reconciler_sync_duration_seconds": ("histogram", FAMILY),
    "conntrack_reconciler_deleted_entries_total": ("counter", FAMILY),
}
OURS = "kproxy_nft_"  # our own metrics' prefix (agent/metrics.py says what each counts)


def scrape() -> dict[str, tuple[str, set[tuple[str, ...]]]]:
    """name → (type, the label-name sets of its samples), from a real /metrics answer."""
    metrics = new_metrics((IPFamily.V4, IPFamily.V6))
    # Metrics with more labels than ip_family have no series until recorded: record one each.
    metrics.iptables_rules_total.family(IPFamily.V4, table="nat").set(12)
    metrics.iptables_rules_last.family(IPFamily.V4, table="filter").set(3)
    metrics.no_local_endpoints.family(IPFamily.V6, traffic_policy="external").set(1)
    metrics.healthz_requests.labels(code="200").inc()
    metrics.livez_requests.labels(code="503").inc()
    metrics.invalid_objects.labels(kind="Service").inc()
    listener = Listener("127.0.0.1:0", 0, {"/metrics": metrics_route(metrics.registry)}).start()
    try:
        text = get(f"http://127.0.0.1:{listener.port}/metrics")[2].decode()
    finally:
        listener.stop()
    scraped = {}
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = {tuple(sorted(k for k in s.labels if k not in ("le", "quantile")))
                  for s in family.samples}
        scraped[name] = (family.type, labels)
    return scraped


def test_every_kube_proxy_metric_with_its_type_and_labels() -> None:
    scraped = scrape()
    for name, (kind, labels) in KUBE_PROXY.items():
        assert f"kubeproxy_{name}" in scraped, f"kubeproxy_{name} missing"
        assert scraped[f"kubeproxy_{name}"] == (kind, {labels}), name
    extra = {name for name in scraped if not name.startswith(OURS)} - {f"kubeproxy_{name}" for name in KUBE_PROXY}
    assert not extra, f"neither kube-proxy's nor ours: {extra}"  # e.g. prometheus-client's *_created series


def test_per_family_metrics_have_a_series_per_family_from_the_start() -> None:
    metrics = new_metrics((IPFamily.V4, IPFamily.V6))
    metrics.sync_duration.observe(0.5)
    for family in ("IPv4", "IPv6"):
        labels = {"ip_family": family}
        assert metrics.registry.get_sample_value("kubeproxy_sync_proxy_rules_duration_seconds_count", labels) == 1
        assert metrics.registry.get_sample_value("kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
                                                 labels) == 0


def test_no_local_endpoints_counts_local_policy_ports_served_only_elsewhere() -> None:
    internal = service(spn("internal"), ip="172.30.0.1", internal_traffic_policy=TrafficPolicy.LOCAL)
    external = service(spn("external"), ip="172.30.0.2", node_port=30080,
                       external_traffic_policy=TrafficPolicy.LOCAL)
    served_here = service(spn("here"), ip="172.30.0.3", internal_traffic_policy=TrafficPolicy.LOCAL)
    empty = service(spn("empty"), ip="172.30.0.4", internal_traffic_policy=TrafficPolicy.LOCAL)
    elsewhere = (endpoint("10.1.0.5", node_name="node2"),)
    state = ClusterState(
        services={svc.name: svc for svc in (internal, external, served_here, empty)},
        endpoints={internal.name: elsewhere, external.name: elsewhere,
                   served_here.name: (endpoint("10.1.0.6", node_name=NODE.hostname),)},
    )
    assert no_local_endpoints(state, NODE, IPFamily.V4) == {"internal": 1, "external": 1}
    assert no_local_endpoints(state, NODE, IPFamily.V6) == {"internal": 0, "external": 0}  # no IPv6 cluster IPs
    metrics = new_metrics((IPFamily.V4, IPFamily.V6))
    NoLocalEndpoints(metrics, (IPFamily.V4, IPFamily.V6)).update(state, NODE, None)  # a full sync's count
    assert metrics.registry.get_sample_value("kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                                             {"ip_family": "IPv4", "traffic_policy": "external"}) == 1


# One edit: service port i (of 4) becomes absent, or has these policies and endpoints.
_EDITS = st.tuples(
    st.integers(0, 3),
    st.none() | st.tuples(st.sampled_from(TrafficPolicy), st.sampled_from(TrafficPolicy),
                          st.lists(st.sampled_from(("node1", "node2", None)), max_size=3)),
)


@given(st.lists(_EDITS, max_size=12))
@settings(max_examples=150, deadline=None)
def test_no_local_endpoints_updated_per_changed_port_equals_a_full_count(
        edits: list[tuple[int, tuple[TrafficPolicy, TrafficPolicy, list[str | None]] | None]]) -> None:
    """A partial sync looks only at the ports it changed; the gauge must still be the full count."""
    metrics = new_metrics((IPFamily.V4,))
    gauge = NoLocalEndpoints(metrics, (IPFamily.V4,))
    services, endpoints = {}, {}
    gauge.update(ClusterState({}, {}), NODE, None)
    for i, edit in edits:
        name = spn(f"s{i}")
        services.pop(name, None)
        endpoints.pop(name, None)
        if edit is not None:
            internal, external, nodes = edit
            services[name] = service(name, ip=f"172.30.0.{i + 1}", node_port=30080 + i,
                                     internal_traffic_policy=internal, external_traffic_policy=external)
            endpoints[name] = tuple(endpoint(f"10.1.{i}.{j}", node_name=n) for j, n in enumerate(nodes))
        state = ClusterState(dict(services), dict(endpoints))
        gauge.update(state, NODE, frozenset({name}))
        for policy, count in no_local_endpoints(state, NODE, IPFamily.V4).items():
            assert metrics.registry.get_sample_value("kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                                                     {"ip_family": "IPv4", "traffic_policy": policy}) == count
