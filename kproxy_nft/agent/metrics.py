"""Prometheus metrics under kube-proxy's names, so existing dashboards and alerts keep working.

Names, types, labels and buckets follow kube-proxy 1.33+'s `pkg/proxy/metrics/metrics.go`
(listed in the Kubernetes metrics reference, v1.34); counters are declared without the `_total`
suffix because prometheus-client appends it. Since kubernetes#129173 (1.33) the metrics of a
sync carry the label `ip_family` ("IPv4", "IPv6"), as kube-proxy runs one proxier per family.
Ours programs both families in one sync, so such a value is recorded for every family the node
programs (`PerFamily`). kube-proxy's two "Custom" metrics read from iptables counters
(`iptables_ct_state_invalid_dropped_packets_total`, `iptables_localhost_nodeports_accepted_packets_total`)
are not served. One extra metric is ours: `kproxy_nft_drift_repairs_total{what,noticed_by}`,
one count per repair of rules found different from what we had applied (a chain deleted by
hand, another tool's flush), `noticed_by` netlink, canary or full-sync; with
`kproxy_nft_drift_monitor_unavailable` 1 when no nf_tables notifications could be had. And
`kproxy_nft_conntrack_cleanup_errors_total`: failures deleting stale UDP/SCTP conntrack flows
after a sync (kube-proxy only logs those; the sync itself still counts as successful).
And `kproxy_nft_invalid_objects_total{kind}`: objects skipped as invalid (from the API or from
manifests), each distinct problem of an object once; `kind` is "Service", "EndpointSlice",
"Endpoints", "ServiceCIDR", or "unknown" (e.g. a manifest file that is not valid YAML).
And `kproxy_nft_sysctl_failures_total{name}`: node settings the agent could not make at startup
(`agent/node_setup.py`; e.g. a read-only /proc/sys in a container), `name` as `sysctl` spells it
(`net.netfilter.nf_conntrack_max`). kube-proxy stops there; the agent warns and goes on.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from kproxy_nft.model import ClusterState, IPFamily, NodeContext, ServicePortName, TrafficPolicy
from kproxy_nft.selection import categorize_endpoints, endpoints_of_family

# kube-proxy exposes no `*_created` series (prometheus-client adds one per counter and
# histogram): an operator's scrape should hold the same series after the switch.
disable_created_metrics()  # type: ignore[no-untyped-call]

IP_FAMILY = "ip_family"  # the label's name, kubernetes#129173


def family_label(family: IPFamily) -> str:
    """kube-proxy's label value: v1.IPFamily, "IPv4" or "IPv6"."""
    return f"IPv{family.value}"


# kube-proxy: metrics.ExponentialBuckets(0.001, 2, 15) for sync durations.
SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
# kube-proxy's network-programming buckets: fine below a minute, coarse up to five.
PROGRAMMING_BUCKETS = (
    *(0.25 * i for i in range(1, 3)),
    *(float(i) for i in range(1, 60)),
    *(60.0 + 5 * i for i in range(12)),
    *(120.0 + 30 * i for i in range(7)),
)


class PerFamily:
    """A metric labelled `ip_family` (and maybe more), recorded for every family of the node.

    `observe`, `set` and `inc` record the value under each family, as the agent's one sync
    stands for kube-proxy's two; `family(f, **labels)` is one family's child, for values known
    per family. Each family's child exists from the start (0), so a dashboard sees the series
    before the first sync.
    """

    def __init__(self, metric: Any, families: Sequence[IPFamily]) -> None:
        self.metric = metric
        self.labels = tuple(family_label(f) for f in families)
        if metric._labelnames == (IP_FAMILY,):  # noqa: SLF001 - only the family label: create the children now
            for label in self.labels:
                metric.labels(label)

    def family(self, family: IPFamily, **labels: str) -> Any:
        return self.metric.labels(**{IP_FAMILY: family_label(family), **labels})

    def observe(self, value: float) -> None:
        for label in self.labels:
            self.metric.labels(label).observe(value)

    def set(self, value: float) -> None:
        for label in self.labels:
            self.metric.labels(label).set(value)

    def inc(self, amount: float = 1.0) -> None:
        for label in self.labels:
            self.metric.labels(label).inc(amount)


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    sync_duration: PerFamily
    sync_full_duration: PerFamily
    sync_partial_duration: PerFamily
    network_programming: PerFamily
    last_sync_timestamp: PerFamily
    last_queued_timestamp: PerFamily
    endpoint_changes: Counter
    endpoint_changes_pending: Gauge
    service_changes: Counter
    service_changes_pending: Gauge
    sync_failures: dict[str, PerFamily]  # proxy mode → kube-proxy's failure counter of that mode
    # Recorded by the proxier / agent loop where they know the value (see the issue 15 report):
    iptables_partial_restore_failures: PerFamily
    nftables_cleanup_failures: PerFamily
    iptables_rules_total: PerFamily  # labels: ip_family, table (rules kube-proxy owns)
    iptables_rules_last: PerFamily  # labels: ip_family, table (rules written by the last sync)
    conntrack_reconcile_duration: PerFamily
    conntrack_reconcile_deleted: PerFamily
    no_local_endpoints: PerFamily  # labels: ip_family, traffic_policy ("internal" | "external")
    healthz_requests: Counter  # label: code
    livez_requests: Counter  # label: code
    drift_repairs: Counter  # labels: what (e.g. "ip kproxy-nft", "IPv4 nat"), noticed_by (netlink, canary, full-sync)
    drift_monitor_unavailable: Gauge  # 1: no nf_tables notifications, drift is probed each sync period
    conntrack_cleanup_errors: Counter
    invalid_objects: Counter  # label: kind
    sysctl_failures: Counter  # label: name


def new_metrics(families: Sequence[IPFamily] = (IPFamily.V4,)) -> Metrics:
    """A fresh registry with every metric (one per agent; tests make their own); `families`:
    the IP families the node programs (the `ip_family` values recorded)."""
    r = CollectorRegistry()

    def per_family(kind: Any, name: str, documentation: str, *labels: str, **kwargs: Any) -> PerFamily:
        return PerFamily(kind(name, documentation, [IP_FAMILY, *labels], registry=r, **kwargs), families)

    return Metrics(
        registry=r,
        sync_duration=per_family(Histogram, "kubeproxy_sync_proxy_rules_duration_seconds",
                                 "SyncProxyRules latency in seconds", buckets=SYNC_BUCKETS),
        sync_full_duration=per_family(Histogram, "kubeproxy_sync_full_proxy_rules_duration_seconds",
                                      "SyncProxyRules latency in seconds for full resyncs", buckets=SYNC_BUCKETS),
        sync_partial_duration=per_family(Histogram, "kubeproxy_sync_partial_proxy_rules_duration_seconds",
                                         "SyncProxyRules latency in seconds for partial resyncs",
                                         buckets=SYNC_BUCKETS),
        network_programming=per_family(Histogram, "kubeproxy_network_programming_duration_seconds",
                                       "In Cluster Network Programming Latency in seconds",
                                       buckets=PROGRAMMING_BUCKETS),
        last_sync_timestamp=per_family(Gauge, "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                                       "The last time proxy rules were successfully synced"),
        last_queued_timestamp=per_family(Gauge, "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                                         "The last time a sync of proxy rules was queued"),
        endpoint_changes=Counter("kubeproxy_sync_proxy_rules_endpoint_changes",
                                 "Cumulative proxy rules Endpoint changes", registry=r),
        endpoint_changes_pending=Gauge("kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                                       "Pending proxy rules Endpoint changes", registry=r),
        service_changes=Counter("kubeproxy_sync_proxy_rules_service_changes",
                                "Cumulative proxy rules Service changes", registry=r),
        service_changes_pending=Gauge("kubeproxy_sync_proxy_rules_service_changes_pending",
                                      "Pending proxy rules Service changes", registry=r),
        sync_failures={
            "iptables": per_family(Counter, "kubeproxy_sync_proxy_rules_iptables_restore_failures",
                                   "Cumulative proxy iptables restore failures"),
            "nftables": per_family(Counter, "kubeproxy_sync_proxy_rules_nftables_sync_failures",
                                   "Cumulative proxy nftables sync failures"),
        },
        iptables_partial_restore_failures=per_family(
            Counter, "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures",
            "Cumulative proxy iptables partial restore failures"),
        nftables_cleanup_failures=per_family(Counter, "kubeproxy_sync_proxy_rules_nftables_cleanup_failures",
                                             "Cumulative proxy nftables cleanup failures"),
        iptables_rules_total=per_family(Gauge, "kubeproxy_sync_proxy_rules_iptables_total",
                                        "Total number of iptables rules owned by kube-proxy", "table"),
        iptables_rules_last=per_family(Gauge, "kubeproxy_sync_proxy_rules_iptables_last",
                                       "Number of iptables rules written by kube-proxy in last sync", "table"),
        conntrack_reconcile_duration=per_family(Histogram, "kubeproxy_conntrack_reconciler_sync_duration_seconds",
                                                "ReconcileConntrackFlowsLatency latency in seconds",
                                                buckets=SYNC_BUCKETS),
        conntrack_reconcile_deleted=per_family(Counter, "kubeproxy_conntrack_reconciler_deleted_entries",
                                               "Cumulative conntrack flows deleted by conntrack reconciler"),
        no_local_endpoints=per_family(Gauge, "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                                      "Number of services with a Local traffic policy and no endpoints",
                                      "traffic_policy"),
        healthz_requests=Counter("kubeproxy_proxy_healthz", "Cumulative proxy healthz HTTP status", ["code"],
                                 registry=r),
        livez_requests=Counter("kubeproxy_proxy_livez", "Cumulative proxy livez HTTP status", ["code"], registry=r),
        drift_repairs=Counter("kproxy_nft_drift_repairs",
                              "Repairs of rules found different from what was applied (one per repair)",
                              ["what", "noticed_by"], registry=r),
        drift_monitor_unavailable=Gauge("kproxy_nft_drift_monitor_unavailable",
                                        "1 when nf_tables notifications could not be opened (canaries are probed)",
                                        registry=r),
        conntrack_cleanup_errors=Counter("kproxy_nft_conntrack_cleanup_errors",
                                         "Failures deleting stale conntrack flows after a sync", registry=r),
        invalid_objects=Counter("kproxy_nft_invalid_objects",
                                "Objects skipped as invalid (an invalid update keeps the previous version)",
                                ["kind"], registry=r),
        sysctl_failures=Counter("kproxy_nft_sysctl_failures",
                                "Node settings (conntrack sysctls) that could not be made at startup", ["name"],
                                registry=r),
    )


def _lacks_local(state: ClusterState, name: ServicePortName, node: NodeContext,
                 family: IPFamily) -> tuple[bool, bool] | None:
    """(internal, external) policies of service port `name` that are Local and find endpoints,
    but none on this node; None when neither does (or the port is gone)."""
    svc = state.services.get(name)
    if svc is None:
        return None
    internal = svc.internal_traffic_policy is TrafficPolicy.LOCAL
    external = svc.external_traffic_policy is TrafficPolicy.LOCAL and svc.externally_accessible_in(family)
    if not (internal or external) or svc.cluster_ip(family) is None:
        return None  # the common case, cheap: no endpoint is looked at
    selection = categorize_endpoints(svc, endpoints_of_family(state.endpoints_of(name), family), node, family)
    return (internal, external) if selection.has_any and not selection.local else None


def no_local_endpoints(state: ClusterState, node: NodeContext, family: IPFamily) -> dict[str, int]:
    """kube-proxy's `sync_proxy_rules_no_local_endpoints_total` of one family's proxier: the
    service ports whose traffic policy is Local (internal; or external, for the externally
    reachable ones) that have endpoints, but none usable on this node."""
    lacking = [flags for name in state.services if (flags := _lacks_local(state, name, node, family))]
    return {"internal": sum(internal for internal, _ in lacking), "external": sum(external for _, external in lacking)}


class NoLocalEndpoints:
    """The `no_local_endpoints` gauge kept up to date after each sync (an agent hook): a full
    sync counts every service port, a partial one looks only at those it changed."""

    def __init__(self, metrics: Metrics, families: Sequence[IPFamily]) -> None:
        self._metrics = metrics
        # Per family, the service ports lacking local endpoints now: usually few.
        self._lacking: dict[IPFamily, dict[ServicePortName, tuple[bool, bool]]] = {f: {} for f in families}

    def update(self, state: ClusterState, node: NodeContext, changed: Collection[ServicePortName] | None) -> None:
        """After a sync of `state`; `changed`: the service ports it changed (None: a full sync)."""
        for family, lacking in self._lacking.items():
            if changed is None:
                lacking.clear()
            for name in state.services if changed is None else changed:
                flags = _lacks_local(state, name, node, family)
                if flags is None:
                    lacking.pop(name, None)
                else:
                    lacking[name] = flags
            gauge = self._metrics.no_local_endpoints
            gauge.family(family, traffic_policy="internal").set(sum(i for i, _ in lacking.values()))
            gauge.family(family, traffic_policy="external").set(sum(e for _, e in lacking.values()))
