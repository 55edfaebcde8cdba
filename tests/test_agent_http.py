"""The agent's listeners over real loopback HTTP: /metrics, /configz, /proxyMode; /healthz and /livez
(kube-proxy's bodies, headers and request counts; /healthz drains a node being deleted, KEP-3836)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from kubernetes.client import V1Node

from kproxy_nft.agent.http import Listener, ProxyHealth, json_route, metrics_route, parse_bind, text_route
from kproxy_nft.agent.metrics import Metrics, new_metrics
from kproxy_nft.config import Overrides, configz, resolve
from kproxy_nft.sources.events import Change, Event, Replace


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:10249", ("127.0.0.1", 10249)),
    ("0.0.0.0", ("0.0.0.0", 10256)),
    ("[::1]:8080", ("::1", 8080)),
    ("::1", ("::1", 10256)),
    (":9000", ("0.0.0.0", 9000)),
])
def test_parse_bind(text: str, expected: tuple[str, int]) -> None:
    assert parse_bind(text, 10256) == expected


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback test server
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def health(state: dict[str, bool], metrics: Metrics) -> ProxyHealth:
    return ProxyHealth(lambda: state["healthy"], lambda: 1_700_000_000.0, lambda: 1_700_000_005.0,
                       metrics.healthz_requests, metrics.livez_requests)


def test_metrics_and_health_over_http() -> None:
    metrics = new_metrics()
    metrics.service_changes.inc(3)
    state = {"healthy": True}
    proxy_health = health(state, metrics)
    listener = Listener("127.0.0.1:0", 0, {
        "/metrics": metrics_route(metrics.registry),
        "/healthz": proxy_health.healthz,
        "/livez": proxy_health.livez,
    }).start()
    try:
        base = f"http://127.0.0.1:{listener.port}"
        status, headers, body = get(base + "/metrics")
        assert status == 200 and b"kubeproxy_sync_proxy_rules_service_changes_total 3.0" in body
        status, headers, body = get(base + "/healthz")
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert headers["X-Content-Type-Options"] == "nosniff"
        # Healthy: lastUpdated is "now", as kube-proxy keeps it (proxier_health.go).
        assert json.loads(body) == {"lastUpdated": "2023-11-14T22:13:25Z", "currentTime": "2023-11-14T22:13:25Z",
                                    "nodeEligible": True}
        state["healthy"] = False
        status, _, body = get(base + "/healthz")
        assert status == 503 and json.loads(body)["lastUpdated"] == "2023-11-14T22:13:20Z"  # the last sync
        status, _, body = get(base + "/livez")
        assert status == 503 and json.loads(body) == {"lastUpdated": "2023-11-14T22:13:20Z",
                                                      "currentTime": "2023-11-14T22:13:25Z"}
        assert get(base + "/nope")[0] == 404
        scraped = get(base + "/metrics")[2].decode()
        assert 'kubeproxy_proxy_healthz_total{code="200"} 1.0' in scraped
        assert 'kubeproxy_proxy_healthz_total{code="503"} 1.0' in scraped
        assert 'kubeproxy_proxy_livez_total{code="503"} 1.0' in scraped
    finally:
        listener.stop()


def node(deleting: bool = False, taint: str | None = None) -> V1Node:
    meta: dict[str, object] = {"name": "node-1"}
    if deleting:
        meta["deletionTimestamp"] = "2024-05-01T10:00:00Z"
    taints = [{"key": taint, "value": "1714557600", "effect": "NoSchedule"}] if taint else []
    return V1Node.model_validate({"metadata": meta, "spec": {"taints": taints}})


@pytest.mark.parametrize("event", [
    Change("nodes", "MODIFIED", node(deleting=True)),
    Change("nodes", "MODIFIED", node(taint="ToBeDeletedByClusterAutoscaler")),
    Replace("nodes", (node(taint="ToBeDeletedByClusterAutoscaler"),)),
    Change("nodes", "DELETED", node(deleting=True)),
], ids=["deletionTimestamp", "autoscaler-taint", "relist", "deleted"])
def test_healthz_drains_a_node_being_deleted_and_livez_does_not(event: Event) -> None:
    metrics = new_metrics()
    proxy_health = health({"healthy": True}, metrics)
    proxy_health.observe(Replace("nodes", (node(),)))
    assert proxy_health.healthz()[0] == 200
    proxy_health.observe(event)
    status, _, body = proxy_health.healthz()
    assert status == 503 and json.loads(body)["nodeEligible"] is False
    assert proxy_health.livez()[0] == 200
    # Other resources and an empty node list say nothing about the node.
    proxy_health.observe(Replace("nodes", ()))
    proxy_health.observe(Replace("services", ()))
    assert proxy_health.healthz()[0] == 503
    proxy_health.observe(Change("nodes", "MODIFIED", node(taint="node.kubernetes.io/unschedulable")))
    assert proxy_health.healthz()[0] == 200  # cordoned is not deleted: still serves
    codes = {s.labels["code"]: s.value for s in metrics.healthz_requests.collect()[0].samples
             if s.name.endswith("_total")}
    assert codes == {"200": 2.0, "503": 2.0}


def test_configz_and_proxy_mode_on_the_metrics_listener() -> None:
    settings = resolve({"kind": "KubeProxyConfiguration", "mode": "nftables", "clusterCIDR": "10.1.0.0/16",
                        "iptables": {"masqueradeBit": 12}}, Overrides(node_ips=("192.0.2.1",)), "node-1")
    document = configz(settings, kubeconfig=None, metrics_bind_address="127.0.0.1:10249",
                       healthz_bind_address="0.0.0.0:10256", sync_period=30.0, min_sync_period=1.0)
    listener = Listener("127.0.0.1:0", 0, {"/configz": json_route(lambda: document),
                                            "/proxyMode": text_route(settings.mode)}).start()
    try:
        base = f"http://127.0.0.1:{listener.port}"
        status, headers, body = get(base + "/proxyMode")
        assert (status, headers["Content-Type"], body) == (200, "text/plain; charset=utf-8", b"nftables")
        status, headers, body = get(base + "/configz")
        assert status == 200 and headers["Content-Type"] == "application/json"
        config = json.loads(body)["kubeproxy.config.k8s.io"]
        assert config["Mode"] == "nftables" and config["HostnameOverride"] == "node-1"
        assert config["BindAddress"] == "192.0.2.1" and config["DetectLocal"]["ClusterCIDRs"] == ["10.1.0.0/16"]
        assert config["IPTables"]["MasqueradeBit"] == 12 and config["NodePortAddresses"] == ["primary"]
        assert (config["SyncPeriod"], config["MinSyncPeriod"]) == ("30s", "1s")
        assert config["HealthzBindAddress"] == "0.0.0.0:10256"
    finally:
        listener.stop()
