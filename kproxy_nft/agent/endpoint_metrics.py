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
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kproxy_nft.kernel.counters import CounterReadError, read_counters
from kproxy_nft.model import IPFamily
from kproxy_nft.top import sample_of

log = logging.getLogger(__name__)

Reader = Callable[[str, str | None, Iterable[IPFamily]], list[str]]


class EndpointConnections(Collector):
    """Reads `mode`'s counters in `netns` on every scrape (`read`: injectable for tests)."""

    def __init__(self, mode: str, netns: str | None, families: Sequence[IPFamily], read: Reader = read_counters):
        self.mode, self.netns, self.families, self.read = mode, netns, tuple(families), read
        self.failing = False  # log a failure once, and the recovery

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        connections = CounterMetricFamily(
            "kproxy_nft_endpoint_new_connections", "New connections sent to each endpoint of each service port, "
            "as the kernel counted them (cluster IP traffic only in nftables mode).",
            labels=("service_port", "frontend", "endpoint"))
        up = 1
        try:
            sample = sample_of(self.mode, self.read(self.mode, self.netns, self.families), time.time())
        except CounterReadError as e:
            up = 0
            if not self.failing:
                log.warning("--metrics-per-endpoint: cannot read the %s counters: %s", self.mode, e)
            self.failing = True
        else:
            if self.failing:
                log.info("--metrics-per-endpoint: the %s counters can be read again", self.mode)
            self.failing = False
            for svc in sample.services:
                for ep in svc.endpoints:
                    connections.add_metric((svc.service or "", svc.frontend or "", ep.address), ep.connections)
        yield connections
        yield GaugeMetricFamily("kproxy_nft_endpoint_counters_up",
                                "1 when the last scrape could read the per-endpoint counters, else 0.", value=up)

    def describe(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """Nothing read at registration (the registry calls this, or `collect` without it)."""
        return iter(())


def register_endpoint_metrics(registry: CollectorRegistry, mode: str, netns: str | None,
                              families: Sequence[IPFamily]) -> EndpointConnections:
    """Serve the per-endpoint counters from `registry` (the agent's /metrics)."""
    collector = EndpointConnections(mode, netns, families)
    registry.register(collector)
    return collector


__all__ = ["EndpointConnections", "register_endpoint_metrics"]
