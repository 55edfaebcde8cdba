"""`kproxy-nft run`: build the agent from settings, start sources and listeners, run until a signal.

The wiring only: which backend, which source (the API through reflectors, or `--manifests`),
the metrics and health listeners, and SIGTERM/SIGINT → a clean stop that leaves the rules.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

from kproxy_nft.agent.healthcheck import HealthCheckServers
from kproxy_nft.agent.http import Listener, health_route, metrics_route
from kproxy_nft.agent.main import Agent
from kproxy_nft.agent.metrics import new_metrics
from kproxy_nft.config import ProxySettings
from kproxy_nft.proxier import make_proxier, with_local_addresses
from kproxy_nft.sources.manifest_watch import ManifestSource

log = logging.getLogger("kproxy_nft.agent")


def run_agent(settings: ProxySettings, *, kubeconfig: str | None, manifest_paths: list[str],
              iptables_backend: str | None, netns: str | None, min_sync_period: float, sync_period: float,
              metrics_address: str, healthz_address: str, health_check_host: str | None = None) -> None:
    """`health_check_host`: where the per-Service healthCheckNodePort servers listen (None: every
    address of the node; with `netns`, inside that namespace)."""
    metrics = new_metrics()
    settings = with_local_addresses(settings, netns)
    agent = Agent(make_proxier(settings, netns=netns, iptables_backend=iptables_backend), metrics,
                  min_sync_period, sync_period)

    def proxy_healthy() -> bool:  # one notion of health for /healthz and the service health checks
        return agent.scheduler.healthy(time.time())

    health_checks = HealthCheckServers(settings.node, proxy_healthy, health_check_host, netns=netns)
    agent.after_sync.append(health_checks.sync)

    threads: list[threading.Thread] = []
    if manifest_paths:
        source = ManifestSource(manifest_paths, agent.events.put, agent.stop)
        threads.append(threading.Thread(target=source.run, name="manifests", daemon=True))
    else:
        from kproxy_nft.sources.kube import Reflector, api_client, list_functions

        api = api_client(kubeconfig)
        # Flags win over the Node object (kube-proxy: --node-ip over the Node's addresses).
        given = {"node_ips": settings.node.node_ips, "zone": settings.node.zone,
                 "service_cidrs": settings.node.service_cidrs}
        agent.fixed_node_fields = frozenset(name for name, value in given.items() if value)
        for resource, list_fn in list_functions(api, settings.node.hostname).items():
            reflector = Reflector(resource, list_fn, agent.events.put, agent.stop)
            threads.append(threading.Thread(target=reflector.run, name=resource, daemon=True))

    listeners = [
        Listener(metrics_address, 10249, {"/metrics": metrics_route(metrics.registry)}).start(),
    ]
    health = health_route(proxy_healthy, lambda: agent.scheduler.last_success, time.time)
    listeners.append(Listener(healthz_address, 10256, {"/healthz": health, "/livez": health}).start())

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s received", signal.Signals(signum).name)
        agent.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("kproxy-nft agent: mode=%s node=%s source=%s metrics=%s healthz=%s", settings.mode,
             settings.node.hostname, "manifests" if manifest_paths else "kubernetes API", metrics_address,
             healthz_address)
    for thread in threads:
        thread.start()
    try:
        agent.run()
    finally:
        for listener in listeners:
            listener.stop()
        health_checks.stop()
