"""Two services claiming one destination: who keeps it, decided once for every backend.

The API server allocates cluster IPs and node ports uniquely, but not externalIPs: any Service
may name any address there, including another Service's cluster IP (CVE-2020-8554), and a
manifest directory may hold anything. In kube-proxy's iptables mode the first matching rule
wins, in an order that depends on map iteration; in our nftables layout two map elements with
one key cannot both exist. So a destination (`ip:port/protocol`, or a node port and protocol)
claimed by several service ports is given to one of them, and the others lose just that
destination (with a warning naming both):

1. addresses the cluster allocated win over addresses a user wrote: a cluster IP over a
   load-balancer ingress IP over an externalIP, so that an externalIP can never capture the
   traffic of another Service;
2. then the first service port in name order (namespace, name, port name, protocol).

`ConflictIndex` keeps the claims up to date one changed service port at a time, so an agent's
partial sync pays O(changed), and says which other service ports a change affected; `resolve`
does the same for a whole state (`dump`, `apply`). Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterator
from dataclasses import dataclass

from kproxy_nft.model import ClusterState, ServicePort, ServicePortName, sort_key

# A destination: ("ip", address, port, protocol) or ("nodePort", port, protocol).
Destination = tuple[str | int, ...]

# Ranks: lower wins. Node ports are allocated by the API server like cluster IPs.
CLUSTER_IP, LOAD_BALANCER_IP, EXTERNAL_IP, NODE_PORT = 0, 1, 2, 0
_WHAT = {CLUSTER_IP: "cluster IP", LOAD_BALANCER_IP: "load-balancer IP", EXTERNAL_IP: "externalIP"}


def claims(port: ServicePort) -> dict[Destination, int]:
    """Every destination a service port answers on, with the rank of its best claim there."""
    proto = port.protocol.value
    out: dict[Destination, int] = {}
    for rank, ips in ((EXTERNAL_IP, port.external_ips), (LOAD_BALANCER_IP, port.load_balancer_ips),
                      (CLUSTER_IP, port.cluster_ips)):
        for ip in ips:
            out[("ip", ip, port.port, proto)] = rank  # later (better) ranks overwrite
    if port.node_port is not None:
        out[("nodePort", port.node_port, proto)] = NODE_PORT
    return out


def describe(destination: Destination) -> str:
    if destination[0] == "nodePort":
        return f"nodePort {destination[1]}/{destination[2]}"
    _, ip, port, proto = destination
    ip_text = f"[{ip}]" if ":" in str(ip) else str(ip)
    return f"{ip_text}:{port}/{proto}"


@dataclass(frozen=True)
class Conflict:
    """A destination several service ports claim, and the one that keeps it."""

    destination: Destination
    winner: tuple[ServicePortName, int]
    losers: tuple[tuple[ServicePortName, int], ...]

    def __str__(self) -> str:
        def who(claim: tuple[ServicePortName, int]) -> str:
            name, rank = claim
            what = "nodePort" if self.destination[0] == "nodePort" else _WHAT[rank]
            return f"{what} of {name}"

        lost = ", ".join(who(c) for c in self.losers)
        return (f"{describe(self.destination)} is claimed twice: {who(self.winner)} keeps it; {lost} "
                f"{'is' if len(self.losers) == 1 else 'are'} not programmed there "
                "(allocated addresses win over externalIPs, then name order)")


def _order(claim: tuple[ServicePortName, int]) -> tuple[int, tuple[str, str, str, str]]:
    name, rank = claim
    return (rank, sort_key(name))


class ConflictIndex:
    """Who claims each destination, updated per service port; O(changed) per update.

    A destination one service port claims maps to it alone; only contested ones get a set (a
    dict of claims per destination was 3 MiB at 10,000 Services). A claim's rank is not kept:
    it follows from the port (`claims`).
    """

    def __init__(self) -> None:
        self._holder: dict[Destination, ServicePortName] = {}  # claimed once
        self._holders: dict[Destination, set[ServicePortName]] = {}  # contested: claimed more than once
        self._ports: dict[ServicePortName, ServicePort] = {}

    def update(self, name: ServicePortName, port: ServicePort | None) -> set[ServicePortName]:
        """Record `name`'s new port (None: removed). Returns every service port whose
        `resolved` form may have changed: `name` and all who share a destination with it,
        before or after."""
        affected = {name}
        touched: set[Destination] = set()
        old = self._ports.pop(name, None)
        if old is not None:
            for destination in claims(old):
                self._release(destination, name)
                touched.add(destination)
        if port is not None:
            self._ports[name] = port
            for destination in claims(port):
                self._claim(destination, name)
                touched.add(destination)
        for destination in touched:
            affected.update(self._holders_of(destination))  # a lone holder left may have just won it back
        return affected

    def _claim(self, destination: Destination, name: ServicePortName) -> None:
        several = self._holders.get(destination)
        if several is not None:
            several.add(name)
            return
        one = self._holder.setdefault(destination, name)
        if one != name:
            del self._holder[destination]
            self._holders[destination] = {one, name}

    def _release(self, destination: Destination, name: ServicePortName) -> None:
        several = self._holders.get(destination)
        if several is None:
            if self._holder.get(destination) == name:
                del self._holder[destination]
            return
        several.discard(name)
        if len(several) == 1:
            del self._holders[destination]
            self._holder[destination] = several.pop()

    def _holders_of(self, destination: Destination) -> Collection[ServicePortName]:
        several = self._holders.get(destination)
        if several is not None:
            return several
        one = self._holder.get(destination)
        return () if one is None else (one,)

    @property
    def contested(self) -> int:
        """How many destinations are claimed more than once now."""
        return len(self._holders)

    def _ranked(self, destination: Destination) -> list[tuple[ServicePortName, int]]:
        """The claims on a contested destination, winner first."""
        ranked = [(name, claims(self._ports[name])[destination]) for name in self._holders[destination]]
        return sorted(ranked, key=_order)

    def resolved(self, name: ServicePortName) -> ServicePort | None:
        """The port as programmed: without the destinations another service port keeps."""
        port = self._ports.get(name)
        if port is None or not self._holders:
            return port
        lost = {d for d in claims(port) if d in self._holders and self._ranked(d)[0][0] != name}
        if not lost:
            return port
        proto = port.protocol.value

        def kept(ips: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(ip for ip in ips if ("ip", ip, port.port, proto) not in lost)

        return dataclasses.replace(
            port,
            cluster_ips=kept(port.cluster_ips),
            external_ips=kept(port.external_ips),
            load_balancer_ips=kept(port.load_balancer_ips),
            node_port=None if ("nodePort", port.node_port, proto) in lost else port.node_port,
        )

    def conflicts(self) -> Iterator[Conflict]:
        """The current conflicts, in destination order (O(conflicts))."""
        for destination in sorted(self._holders, key=str):
            ordered = self._ranked(destination)
            yield Conflict(destination, ordered[0], tuple(ordered[1:]))


def resolve(state: ClusterState) -> tuple[ClusterState, tuple[Conflict, ...]]:
    """The state as programmed (losers without their lost destinations), and the conflicts."""
    index = ConflictIndex()
    for name, port in state.services.items():
        index.update(name, port)
    found = tuple(index.conflicts())
    if not found:
        return state, ()
    losers = {name for conflict in found for name, _ in conflict.losers}
    services = dict(state.services)
    for name in losers:
        resolved = index.resolved(name)
        assert resolved is not None
        services[name] = resolved
    return ClusterState(services, state.endpoints), found
