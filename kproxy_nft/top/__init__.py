"""New connections per service port and per endpoint, from the counters the kernel keeps (`kproxy-nft top`).

Both modes count in the NAT rules, which see only the first packet of a connection, so a packet
count is a count of new connections:

* nftables: every element of the `@backends-<proto>` maps (key `cluster IP . port . index`,
  value `endpoint ip . port`) has its own counter (the maps are declared with `counter`). Only
  traffic to cluster IPs goes through those maps: external traffic (node ports, external and
  load-balancer IPs) is DNATed by its service port's `external-…` chain through an anonymous
  map, whose elements nft 1.0.6 cannot count ("missing statement in map declaration"), so it is
  not counted (docs/TOP.md). The elements carry no service name: a service port is named by its
  cluster IP, port and protocol.
* iptables: the packet counter of each `KUBE-SEP-…` chain's DNAT rule (`iptables-save -c`); the
  rule's comment names the service port, the `… cluster IP` rule of `KUBE-SERVICES` gives its
  cluster IP. Every frontend of a service port (cluster IP, node port, external IPs) goes
  through the same endpoint chains, so these counts include external traffic.

A counter starts at 0 when its element or rule is (re)created: when an endpoint comes, when an
nftables element's endpoint changes (indexes shift when one leaves), when iptables rewrites a
chain's rules (a full restore of the nat table). `with_rates` turns two samples into rates and
treats a counter that went down as restarted.

Pure: it parses listings that `kernel/counters.py` reads, and knows no clock (times are given).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from kproxy_nft.compile.nftables import BACKENDS_PREFIX
from kproxy_nft.kernel.iptables_text import cluster_ip_frontends, dnat_counters
from kproxy_nft.kernel.nftables_text import parse_counted_listing


@dataclass(frozen=True)
class EndpointCount:
    """One endpoint of one service port: new connections counted, and per second lately."""

    address: str  # `ip:port`, `[ip6]:port`
    connections: int
    rate: float | None = None  # since the previous sample (None: no previous sample)


@dataclass(frozen=True)
class ServicePortCount:
    """One service port's endpoints and their counts."""

    frontend: str | None  # its cluster IP, `ip:port/proto` (`[ip6]:port/proto`), when known
    service: str | None  # `ns/name:port`, when the rules name it (iptables mode)
    endpoints: tuple[EndpointCount, ...]

    @property
    def label(self) -> str:
        """How the service port is shown: its name and cluster IP, whichever are known."""
        return " ".join(part for part in (self.service, self.frontend) if part) or "?"

    @property
    def connections(self) -> int:
        return sum(ep.connections for ep in self.endpoints)

    @property
    def rate(self) -> float | None:
        rates = [ep.rate for ep in self.endpoints]
        return None if any(r is None for r in rates) else sum(r for r in rates if r is not None)

    def shares(self) -> list[tuple[str, float]]:
        """Each endpoint's share of the connections: of the recent ones when there are rates and
        any traffic lately, else of all counted (all 0 when nothing was counted)."""
        recent = self.rate
        use_rates = recent is not None and recent > 0
        total = recent if use_rates and recent is not None else self.connections
        return [(ep.address, ((ep.rate or 0.0) if use_rates else ep.connections) / total if total else 0.0)
                for ep in self.endpoints]

    @property
    def key(self) -> tuple[str | None, str | None]:
        return (self.frontend, self.service)


@dataclass(frozen=True)
class Sample:
    """The counters of one node at one moment."""

    mode: str  # iptables | nftables
    time: float  # seconds, on the caller's clock
    services: tuple[ServicePortCount, ...]
    interval: float | None = None  # seconds since the sample the rates are computed from

    def as_dict(self) -> dict[str, Any]:
        """The `top --once -o json` document (docs/TOP.md: keep it stable)."""
        return {
            "mode": self.mode,
            "time": self.time,
            "interval": self.interval,
            "services": [
                {"service": svc.service, "frontend": svc.frontend, "connections": svc.connections,
                 "rate": svc.rate,
                 "endpoints": [{"address": ep.address, "connections": ep.connections, "rate": ep.rate}
                               for ep in svc.endpoints]}
                for svc in self.services
            ],
        }

    def by_rate(self) -> list[ServicePortCount]:
        """Busiest first: by rate, then by connections counted; then by name, for a stable view."""
        return sorted(self.services, key=lambda s: (-(s.rate or 0.0), -s.connections, s.label))

    def endpoint_counts(self) -> dict[tuple[str, str], int]:
        """(service port label, endpoint address) → connections: the flat view tests compare."""
        return {(svc.label, ep.address): ep.connections for svc in self.services for ep in svc.endpoints}


def _host_port(ip: str, port: str) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _grouped(counts: Iterable[tuple[tuple[str | None, str | None], str, int]]) -> tuple[ServicePortCount, ...]:
    """((frontend, service), endpoint, connections) rows → service ports, counts of one endpoint
    summed, in name order (endpoints in the order first seen)."""
    grouped: dict[tuple[str | None, str | None], dict[str, int]] = {}
    for key, address, packets in counts:
        endpoints = grouped.setdefault(key, {})
        endpoints[address] = endpoints.get(address, 0) + packets
    return tuple(
        ServicePortCount(frontend, service, tuple(EndpointCount(a, n) for a, n in endpoints.items()))
        for (frontend, service), endpoints in sorted(grouped.items(), key=lambda kv: (kv[0][1] or "", kv[0][0] or ""))
    )


def from_nftables(listings: Iterable[str]) -> tuple[ServicePortCount, ...]:
    """Service ports from `nft list map … backends-<proto>` listings (`kernel.counters`)."""
    rows = []
    for text in listings:
        for counted in parse_counted_listing(text):
            if not counted.name.startswith(BACKENDS_PREFIX):
                continue
            proto = counted.name.removeprefix(BACKENDS_PREFIX)
            for element in counted.elements:
                vip, port, _index = element.key.rsplit(" . ", 2)
                ep_ip, _, ep_port = (element.value or "").rpartition(" . ")
                rows.append(((f"{_host_port(vip, port)}/{proto}", None), _host_port(ep_ip, ep_port), element.packets))
    return _grouped(rows)


def from_iptables(listings: Iterable[str]) -> tuple[ServicePortCount, ...]:
    """Service ports from `iptables-save -c -t nat` outputs, one per family (`kernel.counters`)."""
    rows = []
    for text in listings:
        frontends = cluster_ip_frontends(text)
        for rule in dnat_counters(text):
            rows.append(((frontends.get(rule.service or ""), rule.service), rule.destination, rule.packets))
    return _grouped(rows)


def with_rates(before: Sample | None, after: Sample) -> Sample:
    """`after` with each endpoint's connections per second since `before` (unchanged without one).

    An endpoint new since `before`, or whose counter went down (its element or rule was
    recreated), counts from 0.
    """
    if before is None or after.time <= before.time:
        return after
    interval = after.time - before.time
    previous = {(svc.key, ep.address): ep.connections for svc in before.services for ep in svc.endpoints}

    def rated(svc: ServicePortCount) -> ServicePortCount:
        endpoints = []
        for ep in svc.endpoints:
            then = previous.get((svc.key, ep.address), 0)
            grown = ep.connections - then if ep.connections >= then else ep.connections
            endpoints.append(replace(ep, rate=grown / interval))
        return replace(svc, endpoints=tuple(endpoints))

    return replace(after, services=tuple(rated(svc) for svc in after.services), interval=interval)


__all__ = ["EndpointCount", "Sample", "ServicePortCount", "from_iptables", "from_nftables", "with_rates"]
