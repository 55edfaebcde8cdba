"""`run --metrics-per-endpoint`: new connections per endpoint as a Prometheus counter, read on scrape.

Opt-in because of its cardinality: one series per endpoint of every service port (300,000 at
30,000 services of 10 endpoints). Nothing is kept between scrapes: each scrape reads the
counters the kernel keeps (`kernel/counters.py`: `nft -j list map` of the backend maps, or
`iptables-save -c -t nat`) and reports them as they are, so the series is exactly the kernel's
count (Prometheus' `rate()` handles a counter that restarts at 0 when its element or rule is
recreated). A scrape therefore costs one listing: milliseconds at a few hundred services, seconds
at tens of thousands (the scrape interval should allow for it).

    kproxy_nft_endpoint_new_connections_total{service_port, frontend, endpoint}
    kproxy_nft_endpoint_counters_up   1 when the last read worked, else 0 (the reason is logged)

`service_port` is `ns/name:port` in iptables mode and empty in nftables mode (the backend map
elements carry no name), `frontend` the cluster IP `ip:port/proto`, `endpoint` `ip:port`. What
each mode counts is in docs/TOP.md (nftables: cluster IP traffic only).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kproxy_nft.kernel.counters import CounterReadError
from kproxy_nft.proxier import Proxier
from kproxy_nft.top import Sample

log = logging.getLogger(__name__)
Result = TypeVar("Result")


class _Call(Generic[Result]):
    """One call of a `SingleFlight` function, shared by everyone who asked while it ran."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Result | None = None
        self.error: BaseException | None = None


class SingleFlight(Generic[Result]):
    """`fn()`, run once for all callers that ask while it is running (golang.org/x/sync's
    singleflight): two Prometheus servers scraping together cost one counter listing, not two,
    and a scrape that times out and is retried does not start a second one beside it."""

    def __init__(self, fn: Callable[[], Result]) -> None:
        self._fn = fn
        self._lock = threading.Lock()
        self._running: _Call[Result] | None = None

    def __call__(self) -> Result:
        with self._lock:
            call, leader = self._running, self._running is None
            if call is None:
                call = self._running = _Call()
        if leader:
            try:
                call.result = self._fn()
            except BaseException as e:  # every waiting caller gets it too
                call.error = e
            finally:
                with self._lock:
                    self._running = None
                call.done.set()
        else:
            call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[return-value]  # set when no error was

class EndpointConnections(Collector):
    """Reads the counters on every scrape: `read` is the proxier's `connection_counts` (a fake
    in tests); `mode` only names them in log lines."""

    def __init__(self, mode: str, read: Callable[[], Sample | None]):
        self.mode, self.read = mode, SingleFlight(read)  # concurrent scrapes share one read
        self.failing = False  # log a failure once, and the recovery

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        connections = CounterMetricFamily(
            "kproxy_nft_endpoint_new_connections", "New connections sent to each endpoint of each service port, "
            "as the kernel counted them (cluster IP traffic only in nftables mode).",
            labels=("service_port", "frontend", "endpoint"))
        up = 1
        try:
            sample = self.read()
        except CounterReadError as e:
            up = 0
            if not self.failing:
                log.warning("--metrics-per-endpoint: cannot read the %s counters: %s", self.mode, e)
            self.failing = True
        else:
            if self.failing:
                log.info("--metrics-per-endpoint: the %s counters can be read again", self.mode)
            self.failing = False
            for svc in sample.services if sample is not None else ():
                for ep in svc.endpoints:
                    connections.add_metric((svc.service or "", svc.frontend or "", ep.address), ep.connections)
        yield connections
        yield GaugeMetricFamily("kproxy_nft_endpoint_counters_up",
                                "1 when the last scrape could read the per-endpoint counters, else 0.", value=up)

    def describe(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """Nothing read at registration (the registry calls this, or `collect` without it)."""
        return iter(())


def register_endpoint_metrics(registry: CollectorRegistry, proxier: Proxier) -> EndpointConnections:
    """Serve the per-endpoint counters of `proxier`'s mode from `registry` (the agent's /metrics)."""
    collector = EndpointConnections(proxier.mode, lambda: proxier.connection_counts(proxier.families))
    registry.register(collector)
    return collector


__all__ = ["EndpointConnections", "SingleFlight", "register_endpoint_metrics"]
