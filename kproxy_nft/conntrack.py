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

That diff (`stale_flow_filters`) needs the previous state, which an agent that just started
does not have: diffing against an empty state flushed every flow of every served UDP service,
which breaks QUIC and other long-lived UDP across a mere restart (kubernetes#122740). So the
first cleanup, a full sync's, and the one after a failure *reconcile* instead
(`reconcile_flows`): they compare the listed flows with the current state alone, as kube-proxy's
reconciler does since 1.32 (kubernetes#127318; pkg/proxy/conntrack/cleanup.go,
`CleanStaleEntries`). What we took from it: index the frontends (service IP:port, and NodePort by
port alone) to their endpoints once, then one lookup per listed flow; delete a flow to a
frontend whose reply source is not an endpoint of it, including when the frontend has no
endpoints at all (kubernetes#139628, fixed by kubernetes#139629: skipping those left flows
DNATed to deleted pods forever). Where we differ, and why:

* "an endpoint of it" is the `all_reachable` set with its port, the same as the diff's, so the
  two never disagree about a flow (kube-proxy takes every serving endpoint's IP, port aside);
* a flow that was not DNATed (its reply comes from the frontend itself) is deleted only when the
  frontend is served, i.e. the flow was created while nothing answered it; an unserved
  frontend's un-NATed flows are what its rules make of every new flow anyway;
* a service IP:port takes precedence over a NodePort of the same number, as in the rules
  (`@service-ips` before `@service-nodeports`, KUBE-NODEPORTS last), so another service's
  port that equals a NodePort is never judged by the NodePort's endpoints;
* an un-NATed flow matches a NodePort only when addressed to an address this node answers
  NodePorts on. kube-proxy matches the port alone, which also deletes this node's (and its
  pods') own flows to remote servers at that port number: harmless once, but the reconciler
  runs on every full sync, and a masqueraded flow re-created after a delete may get another
  source port, which is what breaks QUIC. Which addresses those are comes from the node
  (`--nodeport-addresses`) or, for "every local address", from the caller, who can read the
  interfaces; without them the node IPs are used (an un-NATed flow to another local address
  at a NodePort then times out instead of being deleted).

The reconciler cannot see a frontend that no longer exists (a service deleted, or its port
changed, while no agent ran); its flows time out once their clients stop. When the previous
state is known, the cleaner adds the diff to the reconciler, which covers those
(kubernetes#141371 adds the same for deleted services to kube-proxy).

Everything here is a pure function of states, the node and listed flows: `kernel.conntrack`
lists the kernel's flows and deletes what these functions pick.
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


def served_frontends(svc: ServicePort, endpoints: tuple[Endpoint, ...], node: NodeContext) -> dict[Frontend, bool]:
    """Each frontend of one service port (per family) → whether this node answers it, as the
    cleanup decides "newly served" (`kproxy-nft diff` reports the ones that start or stop)."""
    return {fe: backends.served for fe, backends in _service_frontends(svc, endpoints, node)}


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

    Never start an agent with `previous = ClusterState()`: every served frontend would count as
    newly served and lose all its flows, the valid ones too (kubernetes#122740). Without a
    previous state, `reconcile_flows` decides from the table itself. `candidates`, when given,
    are the only service ports that may differ (an agent's change tracker knows them): the rest
    is not compared.
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


# Frontend lookups of the reconciler, keyed by plain tuples (one or two per listed flow: no
# Frontend is built for a flow that is not stale): (family, protocol, ip, port) for service
# IPs, (family, protocol, port) for NodePorts.
_IpKey = tuple[IPFamily, Protocol, str, int]
_NodePortKey = tuple[IPFamily, Protocol, int]


@dataclass(frozen=True)
class _FrontendIndex:
    """Every UDP/SCTP frontend of one state with what stands behind it, and where NodePorts are answered."""

    by_ip: dict[_IpKey, _Backends]
    by_node_port: dict[_NodePortKey, _Backends]
    # family → the addresses an un-NATed flow must be sent to for a NodePort to have skipped it
    node_port_addresses: dict[IPFamily, frozenset[str]]


def nodeport_destinations(
    node: NodeContext, family: IPFamily, local_addresses: Collection[str] | None
) -> frozenset[str]:
    """The addresses of `family` this node answers NodePorts on, as far as the caller knows them.

    `--nodeport-addresses` lists them (`NodeContext.nodeport_ips`); otherwise it is every local
    address (loopback only for IPv4 with localhost NodePorts, as the rules do), which only the
    caller can read: `local_addresses`, or, when None, the node IPs and any interface addresses
    the node already holds.
    """
    listed = node.nodeport_ips(family)
    if listed is not None:
        return frozenset(canonical_ip(ip) for ip in listed)
    known = local_addresses if local_addresses is not None else (*node.node_ips, *node.local_addresses)
    keep_loopback = family is IPFamily.V4 and node.localhost_nodeports
    addresses = (ipaddress.ip_address(ip) for ip in known)
    return frozenset(a.compressed for a in addresses
                     if a.version == int(family) and (keep_loopback or not a.is_loopback))


def _frontend_index(state: ClusterState, node: NodeContext, local_addresses: Collection[str] | None) -> _FrontendIndex:
    names = [name for name in state.services if name.protocol is not Protocol.TCP]  # CLEANED_PROTOCOLS
    by_ip: dict[_IpKey, _Backends] = {}
    by_node_port: dict[_NodePortKey, _Backends] = {}
    for fe, backends in _frontends(state, names, node).items():
        if fe.ip is None:
            by_node_port[(fe.family, fe.protocol, fe.port)] = backends
        else:
            by_ip[(fe.family, fe.protocol, fe.ip, fe.port)] = backends
    destinations = {family: nodeport_destinations(node, family, local_addresses) for family in IPFamily}
    return _FrontendIndex(by_ip, by_node_port, destinations)


def _reconciled(flow: Flow, index: _FrontendIndex) -> FlowFilter | None:
    """Why `flow` is stale in the indexed state, as the filter the diff would have made; None: it is not."""
    node_port = False
    backends = index.by_ip.get((flow.family, flow.protocol, flow.orig_dst, flow.orig_dport))
    if backends is None:  # a service IP:port wins over a NodePort of the same number, as in the rules
        backends = index.by_node_port.get((flow.family, flow.protocol, flow.orig_dport))
        if backends is None:
            return None  # not a service's: never ours to judge
        node_port = True
    reply = (flow.reply_src, flow.reply_sport)
    if reply in backends.reachable:
        return None  # DNATed to an endpoint that is valid now: the one thing a restart must keep
    frontend = Frontend(flow.family, flow.protocol, flow.orig_dport, None if node_port else flow.orig_dst)
    if reply != (flow.orig_dst, flow.orig_dport):
        # DNATed to what is no longer an endpoint of this frontend, also when none is left
        # (kubernetes#139628: one-way senders keep such a flow alive forever).
        return FlowFilter(frontend, reply)
    # Not NATed: made while nothing answered the frontend. Stale once something does; and for a
    # NodePort only when sent to an address the NodePort is answered on (else it is not ours).
    if not backends.served:
        return None
    if node_port and flow.orig_dst not in index.node_port_addresses[flow.family]:
        return None
    return FlowFilter(frontend)


def reconcile_flows(
    state: ClusterState, node: NodeContext, flows: Iterable[Flow], local_addresses: Collection[str] | None = None
) -> dict[Flow, FlowFilter]:
    """The listed flows that are stale in `state` alone, each with the filter that says why.

    Stale: DNATed to an address:port that is not a reachable endpoint of the frontend it was
    sent to (also when the frontend has no endpoints), or not NATed although the frontend is
    served now. Flows of other protocols, or to no frontend of `state`, are never picked.
    `local_addresses`: the node's interface addresses, for un-NATed flows to a NodePort (see
    `nodeport_destinations`). O(service ports + endpoints + flows): one index, then one or two
    dict lookups per flow. The result does not depend on the order of `flows`, and deleting it
    leaves nothing for a second call to pick.
    """
    index = _frontend_index(state, node, local_addresses)
    stale = {}
    for flow in flows:
        why = _reconciled(flow, index)
        if why is not None:
            stale[flow] = why
    return stale


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
