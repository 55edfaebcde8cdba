"""Stale conntrack flows after a sync: which UDP/SCTP flows must be deleted (pure).

NAT happens once per connection: the kernel picks a DNAT target for the first packet and
stores it in the conntrack entry, and every later packet of that flow follows the entry,
whatever the rules say now. For TCP that ends with the connection; a UDP client that keeps
sending from the same socket keeps its entry alive forever. So, as kube-proxy does
(pkg/proxy/conntrack/cleanup.go: `deleteStaleServiceConntrackEntries` and
`deleteStaleEndpointConntrackEntries` up to v1.30), after a sync we delete two kinds of flows
of UDP (and SCTP) service ports:

* a frontend that starts being served: every flow to it. While it had no endpoints its
  packets were not DNATed (rejected, dropped, or routed towards nowhere), and those entries
  would keep black-holing the client after endpoints appear;
* an endpoint leaving a service port's reachable set: the flows to the service's frontends
  that were DNATed to it (reply source = the endpoint's ip:port), so the next datagram is
  load-balanced again.

A *frontend* is where clients send: the cluster IP, each external and load-balancer IP at the
service port, and the NodePort on any destination address. Endpoints come from
`selection.categorize_endpoints`, per IP family like the compilers: "reachable" is its
`all_reachable` set; a frontend is "served" when the set that answers it is non-empty (the
internal set for the cluster IP, the external one - local endpoints under
externalTrafficPolicy Local - for the rest), so a NodePort whose first local endpoint appears
is flushed even though remote endpoints existed all along.

Everything is a pure function of (previous state, current state, node): no listing of the
table here. `kernel.conntrack` lists the kernel's flows, keeps those `FlowFilter.matches`, and
deletes them. kube-proxy 1.31+ instead lists every UDP flow on each sync and deletes what does
not point at a serving endpoint; the diff costs nothing on syncs that change no UDP endpoint.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from kproxy_nft.model import (
    ClusterState,
    Endpoint,
    IPFamily,
    NodeContext,
    Protocol,
    ServicePort,
    ServicePortName,
    TrafficPolicy,
    sort_key,
)
from kproxy_nft.selection import categorize_endpoints

# TCP is left alone, as in kube-proxy: a TCP connection to a gone endpoint is reset or times
# out and the client reconnects from a new port. SCTP associations outlive endpoints the way
# UDP flows do, so they are cleaned too (kube-proxy only cleans UDP).
CLEANED_PROTOCOLS = frozenset({Protocol.UDP, Protocol.SCTP})

# IANA protocol numbers, as conntrack reports them.
PROTOCOL_NUMBERS = {Protocol.TCP: 6, Protocol.UDP: 17, Protocol.SCTP: 132}


def canonical_ip(ip: str) -> str:
    """One spelling per address (`fd00::0:1` → `fd00::1`), so model and kernel text compare."""
    return ipaddress.ip_address(ip).compressed


@dataclass(frozen=True)
class Frontend:
    """An address:port clients send a service port's traffic to; `ip` None is a NodePort (any address)."""

    family: IPFamily
    protocol: Protocol
    port: int
    ip: str | None = None

    def sort_key(self) -> tuple[int, str, int, str]:
        return (int(self.family), self.protocol.value, self.port, self.ip or "")

    def __str__(self) -> str:
        host = self.ip if self.ip is not None else "*"
        host = f"[{host}]" if ":" in host else host
        return f"{self.protocol.lowercase} {host}:{self.port}"


class Reason(enum.StrEnum):
    """Why a filter was made (for logs; not part of what the filter matches)."""

    NEWLY_SERVED = "newly served"
    ENDPOINT_GONE = "endpoint gone"


@dataclass(frozen=True)
class Flow:
    """One conntrack entry, reduced to what filters look at and what deleting it needs.

    `orig_*` is the tuple of the client's first packet (destination: the frontend); `reply_*`
    the tuple of the answer (source: the DNAT target, or the frontend itself when not NATed).
    `zone` is the conntrack zone (None: the default one).
    """

    family: IPFamily
    protocol: Protocol
    orig_src: str
    orig_dst: str
    orig_sport: int
    orig_dport: int
    reply_src: str
    reply_sport: int
    zone: int | None = None

    def sort_key(self) -> tuple[int, str, str, int, str, int, int]:
        return (int(self.family), self.protocol.value, self.orig_dst, self.orig_dport, self.orig_src,
                self.orig_sport, self.zone or 0)


@dataclass(frozen=True)
class FlowFilter:
    """Flows to `frontend`, only those DNATed to `endpoint` (ip, port) unless it is None."""

    frontend: Frontend
    endpoint: tuple[str, int] | None = None

    def matches(self, flow: Flow) -> bool:
        fe = self.frontend
        if flow.family is not fe.family or flow.protocol is not fe.protocol or flow.orig_dport != fe.port:
            return False
        if fe.ip is not None and flow.orig_dst != fe.ip:
            return False
        return self.endpoint is None or (flow.reply_src, flow.reply_sport) == self.endpoint

    @property
    def reason(self) -> Reason:
        return Reason.NEWLY_SERVED if self.endpoint is None else Reason.ENDPOINT_GONE

    def sort_key(self) -> tuple[tuple[int, str, int, str], str, int]:
        ip, port = self.endpoint if self.endpoint is not None else ("", -1)
        return (self.frontend.sort_key(), ip, port)

    def __str__(self) -> str:
        if self.endpoint is None:
            return f"{self.frontend} (all flows: {self.reason})"
        ip, port = self.endpoint
        host = f"[{ip}]" if ":" in ip else ip
        return f"{self.frontend} DNATed to {host}:{port} ({self.reason})"


@dataclass(frozen=True)
class _Backends:
    """What stands behind one frontend in one state."""

    served: bool
    reachable: frozenset[tuple[str, int]]


_NOTHING = _Backends(False, frozenset())


def _address(ep: Endpoint) -> tuple[str, int]:
    return (canonical_ip(ep.ip), ep.port)


def _service_frontends(
    svc: ServicePort, endpoints: tuple[Endpoint, ...], node: NodeContext
) -> Iterable[tuple[Frontend, _Backends]]:
    """The frontends of one service port, per family, with what serves each."""
    proto = svc.protocol
    for family in IPFamily:
        cluster_ip = svc.cluster_ip(family)
        if cluster_ip is None:
            continue  # the compilers program nothing for a family without a cluster IP
        sel = categorize_endpoints(svc, tuple(ep for ep in endpoints if ep.family is family), node, family)
        reachable = frozenset(_address(ep) for ep in sel.all_reachable)
        internal = sel.local if svc.internal_traffic_policy is TrafficPolicy.LOCAL else sel.cluster
        external = sel.local if svc.external_traffic_policy is TrafficPolicy.LOCAL else sel.cluster
        yield Frontend(family, proto, svc.port, canonical_ip(cluster_ip)), _Backends(bool(internal), reachable)
        outside = _Backends(bool(external), reachable)
        for ip in (*svc.external_ips_of(family), *svc.load_balancer_ips_of(family)):
            yield Frontend(family, proto, svc.port, canonical_ip(ip)), outside
        if svc.node_port:
            yield Frontend(family, proto, svc.node_port), outside


def _frontends(
    state: ClusterState, names: Iterable[ServicePortName], node: NodeContext
) -> dict[Frontend, _Backends]:
    """Frontend → backends for the given service ports of `state` (missing ones contribute nothing).

    Two service ports claiming one frontend (a conflict the API server does not prevent for
    external IPs) are merged: served if either is, reachable through both.
    """
    out: dict[Frontend, _Backends] = {}
    for name in names:
        svc = state.services.get(name)
        if svc is None:
            continue
        for fe, backends in _service_frontends(svc, state.endpoints_of(name), node):
            seen = out.get(fe)
            if seen is not None:
                backends = _Backends(seen.served or backends.served, seen.reachable | backends.reachable)
            out[fe] = backends
    return out


def _changed_ports(previous: ClusterState, current: ClusterState) -> list[ServicePortName]:
    """UDP/SCTP service ports whose service or endpoints differ between the two states.

    Identity first: the change tracker reuses unchanged objects, so most ports cost one `is`;
    the protocol is checked before any lookup, so TCP ports (most of a cluster) are never hashed.
    """
    changed = []
    for name, new_svc in current.services.items():
        if name.protocol is Protocol.TCP:  # an identity test: enum hashing is slow in 3.11
            continue
        old_svc = previous.services.get(name)
        old_eps, new_eps = previous.endpoints_of(name), current.endpoints_of(name)
        if (old_svc is not new_svc and old_svc != new_svc) or (old_eps is not new_eps and old_eps != new_eps):
            changed.append(name)
    changed += [
        name for name in previous.services
        if name.protocol is not Protocol.TCP and name not in current.services
    ]
    return changed


def stale_flow_filters(
    previous: ClusterState,
    current: ClusterState,
    node: NodeContext,
    candidates: Collection[ServicePortName] | None = None,
) -> tuple[FlowFilter, ...]:
    """The flows to delete after a sync from `previous` to `current`: a sorted tuple without duplicates.

    A frontend that is served now but was not (or did not exist) gets one filter for all its
    flows, which covers its gone endpoints too; otherwise each endpoint that left its service
    port's reachable set gets a filter for the flows DNATed to it. A frontend that disappears
    (service deleted, port or external IP changed) counts as having no endpoints now, so the
    flows still DNATed through it are deleted as well.

    Start an agent with `previous = ClusterState()`: kube-proxy's first sync likewise treats
    every UDP service with endpoints as newly active, since nobody knows what happened to
    the table while no proxy was running. `candidates`, when given, are the only service ports
    that may differ (an agent's change tracker knows them): the rest is not compared.
    """
    if candidates is None:
        names = _changed_ports(previous, current)
    else:
        names = sorted((n for n in candidates if n.protocol is not Protocol.TCP), key=sort_key)
    if not names:
        return ()
    before, after = _frontends(previous, names, node), _frontends(current, names, node)
    filters: set[FlowFilter] = set()
    for fe in before.keys() | after.keys():
        old, new = before.get(fe, _NOTHING), after.get(fe, _NOTHING)
        if new.served and not old.served:
            filters.add(FlowFilter(fe))
        else:
            filters.update(FlowFilter(fe, ep) for ep in old.reachable - new.reachable)
    return tuple(sorted(filters, key=FlowFilter.sort_key))


def flows_to_delete(filters: Iterable[FlowFilter], flows: Iterable[Flow]) -> tuple[Flow, ...]:
    """The flows some filter matches, each once, sorted.

    Filters are grouped by (family, protocol, destination port) first, so a table of many
    thousand flows costs one dict lookup per flow, not one comparison per filter.
    """
    by_port: dict[tuple[IPFamily, Protocol, int], list[FlowFilter]] = {}
    for f in filters:
        fe = f.frontend
        by_port.setdefault((fe.family, fe.protocol, fe.port), []).append(f)
    hits = {
        flow
        for flow in flows
        if any(f.matches(flow) for f in by_port.get((flow.family, flow.protocol, flow.orig_dport), ()))
    }
    return tuple(sorted(hits, key=Flow.sort_key))
