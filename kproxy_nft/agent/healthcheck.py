"""Per-Service health-check servers on `healthCheckNodePort`, like kube-proxy's service health server.

A Service with `externalTrafficPolicy: Local` gets a `healthCheckNodePort`; cloud load balancers
probe that port on every node and send traffic only to nodes that answer 200, because with
policy Local a node without a local endpoint drops the traffic instead of forwarding it. kube-proxy
(pkg/proxy/healthcheck/service_health.go) runs one HTTP server per such Service, answering any
path with

    {"service": {"namespace": "ns", "name": "svc"}, "localEndpoints": N, "serviceProxyHealthy": true}

plus `X-Load-Balancing-Endpoint-Weight: N`, status 200 when N > 0 and the proxy itself is
healthy, else 503. This module does the same in two parts:

* pure: `desired_health_checks(state, node)` → `{port: HealthCheck(namespace, name, N)}`, and
  `render(check, healthy)` → the HTTP answer;
* shell: `HealthCheckServers`, which the agent calls after every successful sync with the state
  it synced; it reconciles the running servers to the desired map: opens new ports, closes ports
  that are gone (socket closed, port free again), and updates counts in place (a server reads
  its entry on every request, so a changed count needs no restart). A port that cannot be bound
  is logged and tried again on the next sync, never fatal, as kube-proxy does.

What N counts (kube-proxy's `EndpointsMap.LocalReadyEndpoints`, endpointschangetracker.go): the
Service's *ready* endpoints on this node, over all its ports, de-duplicated by IP (a pod behind
ports 80 and 443 is one endpoint). Deliberately not `selection.categorize_endpoints`' local set:
that one falls back to serving-but-terminating endpoints so established traffic keeps flowing
(KEP-1669), while the health check must go 503 when only terminating endpoints are left, so the
load balancer drains this node during a rolling update.

Where the servers listen: kube-proxy binds the `--nodeport-addresses`; we bind one configurable
host, by default every address of the node (dual-stack `::` where IPv6 exists, else `0.0.0.0`),
since load balancers probe from outside. With `netns` (tests, demos) the sockets are created
inside that network namespace, so nothing listens in the agent's own namespace.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

from kproxy_nft.kernel.netns import entered
from kproxy_nft.model import ClusterState, IPFamily, NodeContext, TrafficPolicy, ip_family, sort_key

log = logging.getLogger("kproxy_nft.agent.healthcheck")


# -- pure -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HealthCheck:
    """What the server on one health-check port reports."""

    namespace: str
    name: str
    local_endpoints: int


def desired_health_checks(state: ClusterState, node: NodeContext) -> dict[int, HealthCheck]:
    """Which health-check ports this node should serve, for which Service, with how many endpoints.

    One entry per Service with externalTrafficPolicy Local and a `health_check_node_port`. The
    API gives a Service one such port for all its ports; if its ports disagree anyway, or two
    Services claim one port (possible with hand-written manifests), the first in `ns/name:port`
    order wins, so the answer is deterministic.
    """
    # Runs after every sync: touch only the (few) eTP Local services' endpoints, sort only them.
    # The reader keeps the port only for policy Local but does not range-check it; a port no
    # socket can take would fail the bind on every sync, so it is left out here.
    candidates = [
        name for name, svc in state.services.items()
        if svc.external_traffic_policy is TrafficPolicy.LOCAL
        and 0 < (svc.health_check_node_port or 0) < 65536
    ]
    ports: dict[tuple[str, str], int] = {}
    for name in sorted(candidates, key=sort_key):
        ports.setdefault(name.service, cast(int, state.services[name].health_check_node_port))
    if not ports:
        return {}
    # Policy and health-check port are per Service, so the candidates are all ports of each
    # Service served here: counting over them covers every port.
    local_ips: dict[tuple[str, str], set[str]] = {service: set() for service in ports}
    for name in candidates:
        # Ready only: the terminating fallback does not count (see the module docstring).
        local_ips[name.service].update(
            ep.ip for ep in state.endpoints_of(name) if ep.ready and ep.node_name == node.hostname
        )
    desired: dict[int, HealthCheck] = {}
    for (namespace, svc_name), port in ports.items():
        ips = local_ips[(namespace, svc_name)]
        # A dual-stack pod has an IP per family: count pods of the family with more of them, as
        # each of kube-proxy's per-family proxiers counts only its own (one shared server).
        v6 = sum(1 for ip in ips if ip_family(ip) is IPFamily.V6)
        count = max(len(ips) - v6, v6)
        desired.setdefault(port, HealthCheck(namespace, svc_name, count))
    return desired


@dataclass(frozen=True)
class Answer:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def render(check: HealthCheck, proxy_healthy: bool) -> Answer:
    """kube-proxy's answer: 200 only with local endpoints *and* a healthy proxy, else 503."""
    body = {
        "service": {"namespace": check.namespace, "name": check.name},
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    }
    status = 200 if check.local_endpoints > 0 and proxy_healthy else 503
    headers = (
        ("Content-Type", "application/json"),
        ("X-Content-Type-Options", "nosniff"),
        # For load balancers that weight nodes by it (e.g. GCE's WEIGHTED_MAGLEV).
        ("X-Load-Balancing-Endpoint-Weight", str(check.local_endpoints)),
    )
    return Answer(status, headers, json.dumps(body).encode())


# -- shell ------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    """Any path, GET or HEAD: the current answer of the server's port."""

    def log_message(self, *args: Any) -> None:
        pass  # load balancers probe every few seconds per node: access logs would drown the sync log

    def _answer(self, with_body: bool) -> None:
        answer = cast(_Server, self.server).answer()
        self.send_response(answer.status)
        for key, value in answer.headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        if with_body:
            self.wfile.write(answer.body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(with_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(with_body=False)


class _Server(ThreadingHTTPServer):
    """One listening port; `answer` is asked on every request, so counts change without a restart."""

    daemon_threads = True  # a stuck prober must not keep the agent from exiting

    def __init__(self, sock: socket.socket, answer: Callable[[], Answer]) -> None:
        # The socket is made by the caller (maybe inside another netns, maybe dual-stack), so skip
        # TCPServer's own bind: it would also resolve the host name (getfqdn), a DNS query per port.
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()  # the unbound socket TCPServer.__init__ made; ours replaces it
        self.socket = sock
        self.answer = answer


class HealthCheckServers:
    """The running health-check servers, reconciled to the desired map after each sync.

    `proxy_healthy` is the agent's own health (the /healthz notion, `SyncScheduler.healthy`),
    asked per request. `host` None means every address of the node. Thread use: `sync` and
    `stop` from the agent's loop; request threads only read the current map (under a lock).
    """

    def __init__(self, node: NodeContext, proxy_healthy: Callable[[], bool], host: str | None = None,
                 netns: str | None = None) -> None:
        self.node = node
        self._proxy_healthy = proxy_healthy
        self._host = host
        self._netns = netns
        self._lock = threading.Lock()
        self._checks: dict[int, HealthCheck] = {}
        self._servers: dict[int, _Server] = {}

    @property
    def ports(self) -> frozenset[int]:
        """Ports with a listening server now."""
        return frozenset(self._servers)

    def sync(self, state: ClusterState) -> None:
        """After a successful sync: serve exactly the health checks `state` asks for."""
        self.reconcile(desired_health_checks(state, self.node))

    def reconcile(self, desired: Mapping[int, HealthCheck]) -> None:
        with self._lock:
            self._checks = dict(desired)
        # Close first: a Service moving to a port another one just left can then bind it.
        gone = [port for port in self._servers if port not in desired]
        _close([self._servers.pop(port) for port in gone])
        for port in gone:
            log.info("healthcheck port=%d closed", port)
        for port, check in sorted(desired.items()):
            if port not in self._servers:
                self._open(port, check)

    def stop(self) -> None:
        """Close every server (agent shutdown)."""
        self.reconcile({})

    def _answer(self, port: int) -> Answer:
        with self._lock:
            check = self._checks.get(port)
        if check is None:  # closed while this request was in flight
            return Answer(503, (("Content-Type", "text/plain"),), b"")
        return render(check, self._proxy_healthy())

    def _open(self, port: int, check: HealthCheck) -> None:
        try:
            with entered(self._netns):
                sock = _listen(self._host, port)
        except OSError as e:
            log.error("healthcheck port=%d service=%s/%s: cannot listen: %s (retrying on the next sync)",
                      port, check.namespace, check.name, e)
            return
        server = _Server(sock, lambda: self._answer(port))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                         name=f"healthcheck-{port}", daemon=True).start()
        self._servers[port] = server
        log.info("healthcheck port=%d service=%s/%s listening", port, check.namespace, check.name)


def _listen(host: str | None, port: int) -> socket.socket:
    """A listening TCP socket in the calling thread's network namespace."""
    if host is None:
        if socket.has_dualstack_ipv6():
            return socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
        host = "0.0.0.0"  # noqa: S104 - every address is the point: load balancers probe from outside
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


def _close(servers: Iterable[_Server]) -> None:
    """Stop serving and free the ports; in parallel, as each `shutdown` waits up to a poll interval."""
    servers = list(servers)
    stoppers = [threading.Thread(target=s.shutdown, name="healthcheck-stop", daemon=True) for s in servers]
    for t in stoppers:
        t.start()
    for t in stoppers:
        t.join()
    for s in servers:
        s.server_close()
