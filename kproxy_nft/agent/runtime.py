"""`kproxy-nft run`: build the agent from settings, start sources and listeners, run until a signal.

The wiring only: which backend, which source (the API through reflectors, or `--manifests`),
the metrics and health listeners, and SIGTERM/SIGINT → a stop within about a second that
leaves the rules (`run_until_stopped`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

# The agent cleans conntrack and reads node addresses through pyroute2 (imported lazily by the
# one-shot commands, which seldom need it): loaded at start, so a broken install fails at once,
# not at the first UDP endpoint change, and the agent's memory is what it is from the start.
import pyroute2  # noqa: F401

from kproxy_nft.agent.changes import PREPARE
from kproxy_nft.agent.healthcheck import HealthCheckServers
from kproxy_nft.agent.http import Listener, ProxyHealth, json_route, metrics_route, text_route
from kproxy_nft.agent.main import Agent
from kproxy_nft.agent.metrics import NoLocalEndpoints, new_metrics
from kproxy_nft.agent.node_setup import setup_node
from kproxy_nft.agent.scheduler import FULL_SYNC_PERIOD
from kproxy_nft.config import ProxySettings, configz
from kproxy_nft.proxier import make_proxier, with_local_addresses
from kproxy_nft.proxier.handover import RemoveOtherModes
from kproxy_nft.sources.events import Event
from kproxy_nft.sources.manifest_watch import ManifestSource

log = logging.getLogger("kproxy_nft.agent")
# After SIGTERM: seconds a running sync gets to finish, then seconds to close the listeners;
# together with the interpreter's exit, well within the 2 s we promise.
STOP_GRACE = 0.8
CLOSE_BUDGET = 0.6


def run_agent(settings: ProxySettings, *, kubeconfig: str | None, manifest_paths: list[str],
              iptables_backend: str | None, netns: str | None, min_sync_period: float, sync_period: float,
              metrics_address: str, healthz_address: str, health_check_host: str | None = None,
              full_sync_period: float = FULL_SYNC_PERIOD, metrics_per_endpoint: bool = False) -> None:
    """`health_check_host`: where the per-Service healthCheckNodePort servers listen (None: every
    address of the node; with `netns`, inside that namespace). `metrics_per_endpoint`: serve one
    connection counter per endpoint, read from the kernel on each scrape (docs/TOP.md)."""
    settings = with_local_addresses(settings, netns)
    proxier = make_proxier(settings, netns=netns, iptables_backend=iptables_backend)
    metrics = new_metrics(proxier.families)  # the ip_family label's values
    setup_node(settings.conntrack, metrics, netns)  # kube-proxy's conntrack sysctls, before the first sync
    if metrics_per_endpoint:  # opt-in: one series per endpoint (docs/TOP.md)
        from kproxy_nft.agent.endpoint_metrics import register_endpoint_metrics

        register_endpoint_metrics(metrics.registry, proxier)
    agent = Agent(proxier, metrics, min_sync_period, sync_period, full_sync_period=full_sync_period)

    def proxy_healthy() -> bool:  # one notion of health for /healthz and the service health checks
        return agent.scheduler.healthy(time.time())

    health_checks = HealthCheckServers(settings.node, proxy_healthy, health_check_host, netns=netns)
    agent.after_sync.append(health_checks.sync)
    # kube-proxy removes the other modes' rules at start-up; we wait until our first sync is in (no gap).
    agent.after_sync.append(RemoveOtherModes(proxier))
    no_local = NoLocalEndpoints(metrics, proxier.families)
    agent.after_sync.append(lambda state: no_local.update(state, proxier.node, agent.synced_changes))

    health = ProxyHealth(proxy_healthy, lambda: agent.scheduler.last_success, time.time,
                         metrics.healthz_requests, metrics.livez_requests)

    def emit(event: Event) -> None:
        health.observe(event)  # this node's Node: /healthz drains a node being deleted (KEP-3836)
        agent.events.put(event)

    # Flags win over the Node object (kube-proxy: --node-ip over the Node's addresses).
    given = {"node_ips": settings.node.node_ips, "zone": settings.node.zone,
             "service_cidrs": settings.node.service_cidrs}
    agent.fixed_node_fields = frozenset(name for name, value in given.items() if value)
    threads: list[threading.Thread] = []
    if manifest_paths:
        source = ManifestSource(manifest_paths, emit, agent.stop, node_name=settings.node.hostname)
        threads.append(threading.Thread(target=source.run, name="manifests", daemon=True))
    else:
        from kproxy_nft.sources.kube import Reflector, api_client, list_functions

        api = api_client(kubeconfig)
        for resource, list_fn in list_functions(api, settings.node.hostname).items():
            # Services and EndpointSlices are converted on the reflector's thread, page by page
            # (`changes.PREPARE`): the decoded objects of a list are never all alive at once.
            reflector = Reflector(resource, list_fn, emit, agent.stop, prepare=PREPARE.get(resource))
            threads.append(threading.Thread(target=reflector.run, name=resource, daemon=True))

    effective = configz(settings, kubeconfig=kubeconfig, metrics_bind_address=metrics_address,
                        healthz_bind_address=healthz_address, sync_period=sync_period,
                        min_sync_period=min_sync_period)
    listeners = [
        Listener(metrics_address, 10249, {"/metrics": metrics_route(metrics.registry),
                                          "/configz": json_route(lambda: effective),
                                          "/proxyMode": text_route(settings.mode)}).start(),
    ]
    listeners.append(Listener(healthz_address, 10256, {"/healthz": health.healthz, "/livez": health.livez}).start())

    signals = StopSignals()
    signals.install()
    log.info("kproxy-nft agent: mode=%s node=%s source=%s metrics=%s healthz=%s", settings.mode,
             settings.node.hostname, "manifests" if manifest_paths else "kubernetes API", metrics_address,
             healthz_address)
    for thread in threads:
        thread.start()
    try:
        run_until_stopped(agent, signals)
    finally:
        close_side_by_side([listener.stop for listener in listeners] + [health_checks.stop], CLOSE_BUDGET)


class StopSignals:
    """SIGTERM and SIGINT, as a stop the main thread carries out.

    A Python signal handler runs on the main thread between two of its bytecodes, whatever
    that thread holds: setting `agent.stop` there takes the event's lock, which the main thread
    itself holds for a moment in each `Event.wait`, and a signal landing in that moment would
    deadlock the agent on SIGTERM. The handler only stores the signal and writes a byte to a
    pipe (neither takes a lock); the main thread, waiting on the pipe, does the rest.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.received: int | None = None

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self.handle)
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signum
        self.wake()

    def wake(self) -> None:
        """End a `wait` now (async-signal-safe: one write to a non-blocking pipe)."""
        with contextlib.suppress(OSError):  # the pipe is full: a wake is already pending
            os.write(self._write, b"\0")

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)

    def wait(self, timeout: float) -> None:
        """Until a signal or a `wake`, or `timeout` seconds."""
        ready, _, _ = select.select([self._read], [], [], timeout)
        if ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._read, 4096)


def run_until_stopped(agent: Agent, signals: StopSignals | None = None, grace: float = STOP_GRACE) -> None:
    """Run the agent's loop on a thread of its own until `agent.stop` or a signal (`signals`,
    installed by the caller; None: only `agent.stop`), then give it `grace` seconds to finish
    what it is doing, and return (the process then exits) whatever it does.

    The loop may be in a sync that takes many seconds at 10,000 services (compiling, planning,
    an iptables-restore): waiting for it made SIGTERM take up to 12 s. Leaving it is safe: a
    transaction is either not sent yet, or sent whole (libnftables: one netlink batch, committed
    by the kernel within the call; iptables-restore: started with its whole input as a file,
    so it commits on its own), and the rules stay in place. The main thread only waits, so
    the signal handler runs at once.
    """
    waiting = signals if signals is not None else StopSignals()
    agent.stop_wakers.append(waiting.wake)  # `agent.stop` set by anyone ends the wait too
    loop = threading.Thread(target=agent.run, name="agent-loop", daemon=True)
    loop.start()
    try:
        while loop.is_alive() and not agent.stop.is_set() and waiting.received is None:
            waiting.wait(1.0)
    finally:
        agent.stop_wakers.remove(waiting.wake)
        if signals is None:
            waiting.close()
    if waiting.received is not None:
        log.info("signal %s received", signal.Signals(waiting.received).name)
        agent.stop.set()
    loop.join(timeout=grace)
    if loop.is_alive():
        log.info("leaving the sync in progress (the rules stay in place)")


def close_side_by_side(closers: list[Callable[[], None]], budget: float) -> None:
    """Run the closers at once and wait at most `budget` seconds for them: each HTTP server
    takes up to its 0.5 s poll interval to stop, and one after the other they added up."""
    threads = [threading.Thread(target=close, daemon=True) for close in closers]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + budget
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.0))
