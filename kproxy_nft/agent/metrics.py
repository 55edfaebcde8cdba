"""Prometheus metrics under kube-proxy's names, so existing dashboards and alerts keep working.

Names, types and buckets follow kube-proxy's `pkg/proxy/metrics/metrics.go`; counters are
declared without the `_total` suffix because prometheus-client appends it. One extra metric is
ours: `kproxy_nft_drift_repairs_total`, how often a full sync found the kernel different from
what we had applied (a chain deleted by hand, another tool's flush) and repaired it. And
`kproxy_nft_conntrack_cleanup_errors_total`: failures deleting stale UDP/SCTP conntrack flows
after a sync (kube-proxy only logs those; the sync itself still counts as successful).
And `kproxy_nft_invalid_objects_total{kind}`: objects skipped as invalid (from the API or from
manifests), each distinct problem of an object once; `kind` is "Service", "EndpointSlice",
"Endpoints", "ServiceCIDR", or "unknown" (e.g. a manifest file that is not valid YAML).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# kube-proxy: metrics.ExponentialBuckets(0.001, 2, 15) for sync durations.
SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
# kube-proxy's network-programming buckets: fine below a minute, coarse up to five.
PROGRAMMING_BUCKETS = (
    *(0.25 * i for i in range(1, 3)),
    *(float(i) for i in range(1, 60)),
    *(60.0 + 5 * i for i in range(12)),
    *(120.0 + 30 * i for i in range(7)),
)


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    sync_duration: Histogram
    sync_full_duration: Histogram
    sync_partial_duration: Histogram
    network_programming: Histogram
    last_sync_timestamp: Gauge
    last_queued_timestamp: Gauge
    endpoint_changes: Counter
    endpoint_changes_pending: Gauge
    service_changes: Counter
    service_changes_pending: Gauge
    sync_failures: dict[str, Counter]  # proxy mode → kube-proxy's failure counter of that mode
    drift_repairs: Counter
    conntrack_cleanup_errors: Counter
    invalid_objects: Counter  # label: kind


def new_metrics() -> Metrics:
    """A fresh registry with every metric (one per agent; tests make their own)."""
    r = CollectorRegistry()
    return Metrics(
        registry=r,
        sync_duration=Histogram("kubeproxy_sync_proxy_rules_duration_seconds",
                                "SyncProxyRules latency in seconds", buckets=SYNC_BUCKETS, registry=r),
        sync_full_duration=Histogram("kubeproxy_sync_full_proxy_rules_duration_seconds",
                                     "SyncProxyRules latency in seconds for full resyncs",
                                     buckets=SYNC_BUCKETS, registry=r),
        sync_partial_duration=Histogram("kubeproxy_sync_partial_proxy_rules_duration_seconds",
                                        "SyncProxyRules latency in seconds for partial resyncs",
                                        buckets=SYNC_BUCKETS, registry=r),
        network_programming=Histogram("kubeproxy_network_programming_duration_seconds",
                                      "In Cluster Network Programming Latency in seconds",
                                      buckets=PROGRAMMING_BUCKETS, registry=r),
        last_sync_timestamp=Gauge("kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                                  "The last time proxy rules were successfully synced", registry=r),
        last_queued_timestamp=Gauge("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                                    "The last time a sync of proxy rules was queued", registry=r),
        endpoint_changes=Counter("kubeproxy_sync_proxy_rules_endpoint_changes",
                                 "Cumulative proxy rules Endpoint changes", registry=r),
        endpoint_changes_pending=Gauge("kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                                       "Pending proxy rules Endpoint changes", registry=r),
        service_changes=Counter("kubeproxy_sync_proxy_rules_service_changes",
                                "Cumulative proxy rules Service changes", registry=r),
        service_changes_pending=Gauge("kubeproxy_sync_proxy_rules_service_changes_pending",
                                      "Pending proxy rules Service changes", registry=r),
        sync_failures={
            "iptables": Counter("kubeproxy_sync_proxy_rules_iptables_restore_failures",
                                "Cumulative proxy iptables restore failures", registry=r),
            "nftables": Counter("kubeproxy_sync_proxy_rules_nftables_sync_failures",
                                "Cumulative proxy nftables sync failures", registry=r),
        },
        drift_repairs=Counter("kproxy_nft_drift_repairs",
                              "Full syncs that found the kernel's rules different from what was applied",
                              registry=r),
        conntrack_cleanup_errors=Counter("kproxy_nft_conntrack_cleanup_errors",
                                         "Failures deleting stale conntrack flows after a sync", registry=r),
        invalid_objects=Counter("kproxy_nft_invalid_objects",
                                "Objects skipped as invalid (an invalid update keeps the previous version)",
                                ["kind"], registry=r),
    )
