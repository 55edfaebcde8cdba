"""The agent's HTTP listeners, as kube-proxy's: the metrics server and the health server.

On `--metrics-bind-address`: Prometheus `/metrics`, `/configz` (the effective configuration
as JSON, `config.configz`) and `/proxyMode` (the mode as plain text), like kube-proxy's
`serveMetrics` (cmd/kube-proxy/app/server.go).

On `--healthz-bind-address`: `/healthz` and `/livez`, answered as kube-proxy's
`proxierHealthServer` does (pkg/proxy/healthcheck/proxier_health.go, kubernetes/kubernetes
commit 08dd657a71c07cf5e71e1b191fd9e8588786b3db). Both are 503 when a change has waited for
the kernel too long (`SyncScheduler.healthy`). `/healthz` is also 503 while this node is being
deleted -- its Node has a deletionTimestamp or the `ToBeDeletedByClusterAutoscaler` taint
(KEP-3836) -- so cloud load balancers drain it first; `/livez` ignores the Node (a container
liveness probe must not restart the proxy of a draining node). Bodies: `/healthz`
`{"lastUpdated", "currentTime", "nodeEligible"}`, `/livez` `{"lastUpdated", "currentTime"}`;
`lastUpdated` is the current time while healthy (kube-proxy keeps that old meaning), else the
last successful sync. Times are RFC 3339 (kube-proxy prints Go's `time.Time` default format).
Each answer is counted in `kubeproxy_proxy_healthz_total{code}` / `kubeproxy_proxy_livez_total{code}`.
Both listeners bind to loopback unless told otherwise (the DaemonSet opens healthz to the
node's network for load balancers).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from kproxy_nft.convert import convert_node
from kproxy_nft.sources.events import Change, Event, Replace

Route = Callable[[], tuple[int, str, bytes]]  # → (status, content type, body)


def parse_bind(address: str, default_port: int) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT`, `HOST` or `:PORT` → (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or "]" in port or (host.count(":") and not host.startswith("[")):
        host, port = address, str(default_port)
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - only when the user wrote ":PORT"


class Listener:
    """A small threaded HTTP server with fixed GET routes, started and stopped by the agent."""

    def __init__(self, address: str, default_port: int, routes: dict[str, Route]) -> None:
        host, port = parse_bind(address, default_port)
        routes_ = routes

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass  # access logs would drown the sync log; Prometheus scrapes every few seconds

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                route = routes_.get(self.path.split("?", 1)[0])
                if route is None:
                    self.send_error(404)
                    return
                status, content_type, body = route()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name=f"http-{port}", daemon=True)

    def start(self) -> Listener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def metrics_route(registry: CollectorRegistry) -> Route:
    return lambda: (200, CONTENT_TYPE_LATEST, generate_latest(registry))


def text_route(text: str) -> Route:
    """A fixed plain-text answer (`/proxyMode`)."""
    return lambda: (200, "text/plain; charset=utf-8", text.encode())


def json_route(document: Callable[[], object]) -> Route:
    """`document()` as JSON on every request (`/configz`)."""
    return lambda: (200, "application/json", json.dumps(document()).encode())


def _iso(ts: float | None) -> str:
    return datetime.fromtimestamp(ts or 0, UTC).isoformat().replace("+00:00", "Z")


class ProxyHealth:
    """The answers of `/healthz` and `/livez`, and this node's eligibility for traffic.

    `healthy()`: the proxy keeps up with changes; `last_updated()`: when it last synced;
    `observe(event)`: every event of the sources, of which it reads this node's Node objects
    (kube-proxy's `SyncNode`, called by its Node event handler). Request threads only read
    `node_eligible`, which one assignment replaces.
    """

    def __init__(self, healthy: Callable[[], bool], last_updated: Callable[[], float | None],
                 now: Callable[[], float], healthz_requests: Counter, livez_requests: Counter) -> None:
        self._healthy = healthy
        self._last_updated = last_updated
        self._now = now
        self._healthz_requests = healthz_requests
        self._livez_requests = livez_requests
        self.node_eligible = True  # until a Node event says otherwise, as kube-proxy starts

    def observe(self, event: Event) -> None:
        if not isinstance(event, Replace | Change) or event.resource != "nodes":
            return
        nodes = event.items if isinstance(event, Replace) else (event.obj,)
        if nodes:  # an empty list says nothing about the node: keep what is known
            self.node_eligible = not convert_node(nodes[0]).being_deleted

    def _answer(self, healthy: bool, requests: Counter, **extra: bool) -> tuple[int, str, bytes]:
        now = self._now()
        status = 200 if healthy else 503
        requests.labels(code=str(status)).inc()
        body = {"lastUpdated": _iso(now if healthy else self._last_updated()), "currentTime": _iso(now), **extra}
        return status, "application/json", json.dumps(body).encode()

    def healthz(self) -> tuple[int, str, bytes]:
        eligible = self.node_eligible
        return self._answer(self._healthy() and eligible, self._healthz_requests, nodeEligible=eligible)

    def livez(self) -> tuple[int, str, bytes]:
        return self._answer(self._healthy(), self._livez_requests)
