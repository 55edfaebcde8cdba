"""The agent's /metrics, /healthz and /livez listeners, over real loopback HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from kproxy_nft.agent.http import Listener, health_route, metrics_route, parse_bind
from kproxy_nft.agent.metrics import new_metrics


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


def test_metrics_and_health_over_http() -> None:
    metrics = new_metrics()
    metrics.service_changes.inc(3)
    state = {"healthy": True}
    listener = Listener("127.0.0.1:0", 0, {
        "/metrics": metrics_route(metrics.registry),
        "/healthz": health_route(lambda: state["healthy"], lambda: 1_700_000_000.0, lambda: 1_700_000_005.0),
    }).start()
    try:
        base = f"http://127.0.0.1:{listener.port}"
        status, headers, body = get(base + "/metrics")
        assert status == 200 and b"kubeproxy_sync_proxy_rules_service_changes_total 3.0" in body
        status, headers, body = get(base + "/healthz")
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert json.loads(body) == {"lastUpdated": "2023-11-14T22:13:20Z", "currentTime": "2023-11-14T22:13:25Z",
                                    "nodeEligible": True}
        state["healthy"] = False
        assert get(base + "/healthz")[0] == 503
        assert get(base + "/nope")[0] == 404
    finally:
        listener.stop()
