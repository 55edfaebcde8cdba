"""The agent's HTTP listeners: Prometheus `/metrics`, and `/healthz` + `/livez` like kube-proxy.

Health answers as kube-proxy's `ProxierHealthServer` does: 200 with
`{"lastUpdated": …, "currentTime": …, "nodeEligible": true}` while healthy, 503 when a change
has waited for the kernel longer than twice the sync period. Both listeners bind to loopback
unless told otherwise (the DaemonSet opens healthz to the node's network for load balancers).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

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


def health_route(healthy: Callable[[], bool], last_updated: Callable[[], float | None],
                 now: Callable[[], float]) -> Route:
    """kube-proxy's healthz body and status."""

    def iso(ts: float | None) -> str:
        return datetime.fromtimestamp(ts or 0, UTC).isoformat().replace("+00:00", "Z")

    def route() -> tuple[int, str, bytes]:
        body = {"lastUpdated": iso(last_updated()), "currentTime": iso(now()), "nodeEligible": True}
        return (200 if healthy() else 503), "application/json", json.dumps(body).encode()

    return route
