"""healthCheckNodePort servers: the desired map from the cluster state (pure), and real loopback servers."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import replace

import pytest

from kproxy_nft.agent.healthcheck import HealthCheck, HealthCheckServers, desired_health_checks, render
from kproxy_nft.agent.main import Agent
from kproxy_nft.agent.metrics import new_metrics
from kproxy_nft.model import ClusterState, Endpoint, ServicePort, ServicePortName, TrafficPolicy
from kproxy_nft.selection import categorize_endpoints
from tests.fake_proxier import FakeProxier
from tests.helpers import NODE, endpoint, service, spn

LOCAL = TrafficPolicy.LOCAL


def lb(name: ServicePortName, hc_port: int | None = 32000, **kw: object) -> ServicePort:
    """A LoadBalancer service port with externalTrafficPolicy Local and a health-check node port."""
    fields: dict[str, object] = {"service_type": "LoadBalancer", "node_port": 30080,
                                 "external_traffic_policy": LOCAL, "health_check_node_port": hc_port}
    fields.update(kw)
    return service(name, **fields)


def state(*entries: tuple[ServicePort, tuple[Endpoint, ...]]) -> ClusterState:
    return ClusterState({svc.name: svc for svc, _ in entries}, {svc.name: eps for svc, eps in entries})


def local(ip: str, port: int = 80, **kw: object) -> Endpoint:
    return endpoint(ip, port, node_name="node1", **kw)


def remote(ip: str, port: int = 80) -> Endpoint:
    return endpoint(ip, port, node_name="node2")


def terminating(ip: str, port: int = 80, node: str = "node1") -> Endpoint:
    return endpoint(ip, port, node_name=node, ready=False, serving=True, terminating=True)


# -- the desired map (pure) -------------------------------------------------------------------


def test_counts_this_nodes_ready_endpoints_only() -> None:
    web = spn("web", "shop", "http")
    got = desired_health_checks(state((lb(web), (local("10.1.0.1"), local("10.1.0.2"), remote("10.1.0.3")))), NODE)
    assert got == {32000: HealthCheck("shop", "web", 2)}


def test_several_ports_share_one_server_and_an_ip_counts_once() -> None:
    http_, https = spn("web", "shop", "http"), spn("web", "shop", "https")
    got = desired_health_checks(state(
        (lb(http_), (local("10.1.0.1", 80), local("10.1.0.2", 80))),
        (lb(https, port=443), (local("10.1.0.1", 443), local("10.1.0.4", 443), remote("10.1.0.3", 443))),
    ), NODE)
    assert got == {32000: HealthCheck("shop", "web", 3)}  # 10.1.0.1 behind both ports is one endpoint


def test_a_dual_stack_pod_counts_once() -> None:
    web = spn("web", "shop", "http")
    pods = (local("10.1.0.1"), local("fd00::1"), local("10.1.0.2"), local("fd00::2"), local("fd00::3"))
    assert desired_health_checks(state((lb(web), pods)), NODE) == {32000: HealthCheck("shop", "web", 3)}


def test_terminating_endpoints_do_not_count_even_when_traffic_still_uses_them() -> None:
    """kube-proxy: only terminating endpoints left → 503, so the load balancer drains the node,
    although the datapath keeps sending to them (categorize_endpoints' local fallback)."""
    web = spn("web")
    eps = (terminating("10.1.0.1"), remote("10.1.0.3"))
    assert [ep.ip for ep in categorize_endpoints(lb(web), eps, NODE).local] == ["10.1.0.1"]  # traffic: yes
    assert desired_health_checks(state((lb(web), eps)), NODE) == {32000: HealthCheck("ns1", "web", 0)}
    not_ready = endpoint("10.1.0.2", node_name="node1", ready=False, serving=False)
    got = desired_health_checks(state((lb(web), (terminating("10.1.0.1"), not_ready, local("10.1.0.5")))), NODE)
    assert got[32000].local_endpoints == 1


def test_no_endpoints_still_serves_the_port_with_zero() -> None:
    assert desired_health_checks(state((lb(spn("web")), ())), NODE) == {32000: HealthCheck("ns1", "web", 0)}


@pytest.mark.parametrize(("external", "internal", "hc_port", "served"), [
    (LOCAL, TrafficPolicy.CLUSTER, 32000, True),
    (LOCAL, LOCAL, 32000, True),  # iTP changes pod-to-service traffic, not what the load balancer sees
    (TrafficPolicy.CLUSTER, TrafficPolicy.CLUSTER, None, False),
    (TrafficPolicy.CLUSTER, LOCAL, None, False),  # iTP Local alone never gets a health check
    (TrafficPolicy.CLUSTER, TrafficPolicy.CLUSTER, 32000, False),  # a stray port without eTP Local
    (LOCAL, TrafficPolicy.CLUSTER, None, False),
    (LOCAL, TrafficPolicy.CLUSTER, 70000, False),  # unbindable: left out rather than failing every sync
])
def test_only_external_local_services_with_a_port(external: TrafficPolicy, internal: TrafficPolicy,
                                                  hc_port: int | None, served: bool) -> None:
    svc = lb(spn("web"), hc_port, external_traffic_policy=external, internal_traffic_policy=internal)
    got = desired_health_checks(state((svc, (local("10.1.0.1"),))), NODE)
    assert got == ({hc_port: HealthCheck("ns1", "web", 1)} if served else {})


def test_node_identity_decides_what_is_local() -> None:
    svc_state = state((lb(spn("web")), (local("10.1.0.1"), remote("10.1.0.2"), remote("10.1.0.3"))))
    assert desired_health_checks(svc_state, replace(NODE, hostname="node2"))[32000].local_endpoints == 2
    assert desired_health_checks(svc_state, replace(NODE, hostname="node9"))[32000].local_endpoints == 0


def test_several_services_and_a_port_claimed_twice() -> None:
    a, b, c = spn("a", "ns"), spn("b", "ns"), spn("c", "ns")
    got = desired_health_checks(state(
        (lb(c, 32002), (local("10.1.0.9"),)),
        (lb(b, 32001), (local("10.1.0.1"), local("10.1.0.2"))),
        (lb(a, 32001), ()),  # hand-written clash: the first in ns/name order keeps the port
    ), NODE)
    assert got == {32001: HealthCheck("ns", "a", 0), 32002: HealthCheck("ns", "c", 1)}


def test_render_matches_kube_proxy() -> None:
    answer = render(HealthCheck("shop", "web", 2), proxy_healthy=True)
    assert answer.status == 200
    assert json.loads(answer.body) == {"service": {"namespace": "shop", "name": "web"}, "localEndpoints": 2,
                                       "serviceProxyHealthy": True}
    assert dict(answer.headers) == {"Content-Type": "application/json", "X-Content-Type-Options": "nosniff",
                                    "X-Load-Balancing-Endpoint-Weight": "2"}
    assert render(HealthCheck("shop", "web", 0), proxy_healthy=True).status == 503
    unhealthy = render(HealthCheck("shop", "web", 2), proxy_healthy=False)
    assert unhealthy.status == 503 and json.loads(unhealthy.body)["serviceProxyHealthy"] is False


# -- real servers on loopback -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str = "/") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


class Health:
    """The proxy's health as the agent would report it, switchable by the test."""

    def __init__(self) -> None:
        self.ok = True

    def __call__(self) -> bool:
        return self.ok


@pytest.fixture
def servers() -> Iterator[tuple[HealthCheckServers, Health]]:
    health = Health()
    manager = HealthCheckServers(NODE, health, host="127.0.0.1")
    try:
        yield manager, health
    finally:
        manager.stop()


def hc_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("healthcheck-")]


def test_servers_answer_update_in_place_and_close(servers: tuple[HealthCheckServers, Health]) -> None:
    manager, health = servers
    port = free_port()
    web = spn("web", "shop", "http")
    manager.sync(state((lb(web, port), ())))
    assert manager.ports == {port}

    status, headers, body = get(port, "/any/path?x=1")
    assert status == 503
    assert json.loads(body) == {"service": {"namespace": "shop", "name": "web"}, "localEndpoints": 0,
                                "serviceProxyHealthy": True}
    assert headers["Content-Type"] == "application/json" and headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Load-Balancing-Endpoint-Weight"] == "0"

    manager.sync(state((lb(web, port), (local("10.1.0.1"), local("10.1.0.2"), remote("10.1.0.3")))))
    status, headers, body = get(port, "/")
    assert status == 200 and json.loads(body)["localEndpoints"] == 2
    assert headers["X-Load-Balancing-Endpoint-Weight"] == "2"

    health.ok = False  # the agent's own sync is overdue: every service health check fails
    status, _, body = get(port)
    assert status == 503 and json.loads(body) == {"service": {"namespace": "shop", "name": "web"},
                                                  "localEndpoints": 2, "serviceProxyHealthy": False}
    health.ok = True

    manager.sync(ClusterState())  # the service is gone: socket closed, thread ended
    assert manager.ports == frozenset() and refused(port)
    assert hc_threads() == []


def test_a_port_change_moves_the_server(servers: tuple[HealthCheckServers, Health]) -> None:
    manager, _ = servers
    old, new = free_port(), free_port()
    web = spn("web")
    manager.sync(state((lb(web, old), (local("10.1.0.1"),))))
    assert get(old)[0] == 200
    manager.sync(state((lb(web, new), (local("10.1.0.1"),))))
    assert manager.ports == {new} and refused(old) and get(new)[0] == 200


def test_a_busy_port_is_retried_on_the_next_sync(servers: tuple[HealthCheckServers, Health],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    manager, _ = servers
    busy, fine = free_port(), free_port()
    web, api = spn("web"), spn("api")
    desired = state((lb(web, busy), (local("10.1.0.1"),)), (lb(api, fine), (local("10.1.0.2"),)))
    blocker = socket.create_server(("127.0.0.1", busy))
    try:
        manager.sync(desired)  # not fatal: the other service's server still starts
        assert manager.ports == {fine} and get(fine)[0] == 200
        assert any(f"port={busy}" in r.message and "cannot listen" in r.message for r in caplog.records)
    finally:
        blocker.close()
    manager.sync(desired)
    assert manager.ports == {busy, fine}
    status, _, body = get(busy)
    assert status == 200 and json.loads(body)["service"] == {"namespace": "ns1", "name": "web"}


def test_stop_closes_everything() -> None:
    ports = [free_port(), free_port()]
    manager = HealthCheckServers(NODE, lambda: True, host="127.0.0.1")
    manager.sync(state(*((lb(spn(f"s{i}"), port), ()) for i, port in enumerate(ports))))
    assert manager.ports == set(ports) and len(hc_threads()) == 2
    manager.stop()
    assert all(refused(port) for port in ports) and hc_threads() == []


# -- wiring into the agent --------------------------------------------------------------------


class FakeBackend(FakeProxier):
    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail

    def sync(self, state: ClusterState, full: bool, changed: object = None) -> str:
        if self.fail:
            raise RuntimeError("kernel said no")
        return "ok"


def test_agent_hands_each_successful_sync_to_its_hooks() -> None:
    seen: list[ClusterState] = []

    def broken(_: ClusterState) -> None:
        raise ValueError("a hook bug")

    agent = Agent(FakeBackend(), new_metrics(), min_sync_period=0.0, sync_period=30.0)
    agent.after_sync += [broken, seen.append]
    outcome = agent.scheduler.run_due()
    assert outcome is not None and outcome.ok  # a failing hook does not fail the sync
    assert len(seen) == 1 and isinstance(seen[0], ClusterState)

    failing = Agent(FakeBackend(fail=True), new_metrics(), min_sync_period=0.0, sync_period=30.0)
    failing.after_sync.append(seen.append)
    outcome = failing.scheduler.run_due()
    assert outcome is not None and not outcome.ok and len(seen) == 1  # nothing synced: hooks not called
