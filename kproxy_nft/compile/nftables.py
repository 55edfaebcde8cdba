"""Pure compiler: ClusterState → desired nftables state, in a flat layout whose cost follows the change.

kube-proxy's nftables mode gives every service port a chain and every endpoint a chain; the
kernel's transaction cost grows with the number of chains. Here the per-service data lives in
*map elements* (`@service-ips`, `@service-nodeports`, `@backends-<proto>`, …) and the chains are
shared (`lb-<proto>-<N>`), so a sync that changes one service touches only that service's
elements; only externally reachable service ports (`external-…`) and source ranges
(`firewall-…`) own chains. Behaviour is kube-proxy's: the same `categorize_endpoints`,
masquerade mark and names for the shared chains and maps. docs/ARCHITECTURE.md ("The nftables
layout") draws the packet path and gives the reason for each choice, including the nft quirks
worked around (one map per protocol, no named interval sets, `meta l4proto` before a DNAT to
`addr . port`, no IPv6 affinity map updates).

The result is data (`Ruleset`: declarations, shared chains, per-service-port fragments holding
elements and the service port's own chains) that `render_script` turns into `nft -f` input
loading into an empty namespace, and that `kernel/nftables_plan.py` diffs key by key (and chain
by chain for a changed fragment) against what was applied. Every name, address and CIDR in it
has passed `compile.render` (at `compile_service_port`, `fixed_chains` and `generated_chain`),
which refuses anything outside its grammar. Pure: no I/O, no clock.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
import itertools
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

from kproxy_nft.compile import render
from kproxy_nft.compile.memo import FragmentMemo, compile_with, recompile_changed
from kproxy_nft.model import (
    ClusterState,
    Endpoint,
    IPFamily,
    LocalDetector,
    NodeContext,
    Protocol,
    ServicePort,
    ServicePortName,
    TrafficPolicy,
    ip_family,
    sort_key,
)
from kproxy_nft.selection import EndpointSelection, categorize_endpoints, endpoints_of_family

TABLE = "kproxy-nft"
TABLE_COMMENT = "kproxy-nft: Kubernetes service rules"

# Shared chains (kube-proxy's names where it has the same chain).
SERVICES = "services"
ENDPOINTS_CHECK = "service-endpoints-check"
NODEPORT_ENDPOINTS_CHECK = "nodeport-endpoints-check"
FIREWALL_CHECK = "firewall-check"
CLUSTER_IPS_CHECK = "cluster-ips-check"
REJECT_CHAIN = "reject-chain"
MARK_MASQ = "mark-for-masquerade"
MASQUERADING = "masquerading"

# Maps and sets.
SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"
FIREWALL_IPS = "firewall-ips"
CLUSTER_IPS = "cluster-ips"
HAIRPIN = "hairpin"

# Prefixes of the chains a service port owns (kube-proxy's).
EXTERNAL_PREFIX = "external-"
FIREWALL_PREFIX = "firewall-"

PROTOCOLS = (Protocol.TCP, Protocol.UDP, Protocol.SCTP)

# Priorities as numbers: nft refuses `dstnat + 10` style names on some hooks (filter/output),
# and `nft -y` lists numbers, so what we write is what we read back. Filter chains run before
# DNAT (-100) so that they see the service address, as kube-proxy's do; the cluster-IP check
# runs after it (-90) in output, where only traffic that no service port DNATed is left.
PRIORITY_FILTER = -110
PRIORITY_DSTNAT = -100
PRIORITY_FILTER_POST_DNAT = -90
PRIORITY_SRCNAT = 100

# Dynamic affinity maps are sized generously: an entry is one client of one service port.
AFFINITY_MAP_SIZE = 1 << 20

# Per-endpoint connection counters (`kproxy-nft top`, docs/TOP.md): `counter` in the declaration
# of the `@backends-<proto>` maps gives every element its own counter, bumped by the kernel's
# lookup in `lb-…`'s DNAT, which only the first packet of a connection makes (NAT rules see
# only new connections). A module setting, not a flag, so that the connection-rate bench can
# measure their cost (bench/bench_connrate.py --compare counters); nothing else turns them off.
COUNT_CONNECTIONS = True

# Keys of the backend maps carry the endpoint's index, from `numgen random mod N`; 65536 bounds
# the endpoints of one service port far above what an EndpointSlice set can hold.
NUMGEN_BOUND = 65536


BACKENDS_PREFIX = "backends-"


def backends_map(proto: Protocol) -> str:
    return _BACKENDS_MAPS[proto]


# One string per protocol, shared by every element that names the map (100,000 at 10k Services).
_BACKENDS_MAPS = {proto: f"{BACKENDS_PREFIX}{proto.lower()}" for proto in Protocol}


def affinity_map(proto: Protocol) -> str:
    return f"affinity-{proto.lower()}"


def affinity_services_map(proto: Protocol) -> str:
    return f"affinity-services-{proto.lower()}"


def affinity_nodeports_map(proto: Protocol) -> str:
    return f"affinity-nodeports-{proto.lower()}"


def lb_chain(proto: Protocol, count: int, affinity: bool = False) -> str:
    """The shared chain that load-balances over `count` endpoints (optionally with affinity)."""
    return f"lb-{proto.lower()}-{count}" + ("-affinity" if affinity else "")


def affinity_record_chain(proto: Protocol, seconds: int) -> str:
    return f"affinity-{proto.lower()}-{seconds}"


def service_chain_base(name: ServicePortName) -> str:
    """kube-proxy's `servicePortChainNameBase`: `HASH8-<ns>/<name>/<proto>/<port>`.

    Namespace, service and port names are DNS labels / IANA service names ([a-z0-9-], as
    `render.service_port` makes sure), so they are safe in an nft identifier; `/` separates
    them (allowed in nft names, never in theirs).
    At most 8+1+63+1+63+1+4+1+15 characters, far below nft's 256: never truncated.
    """
    text = f"{name.namespace}/{name.name}/{name.protocol.lower()}/{name.port}"
    digest = base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:8]
    return f"{digest}-{text}"


def external_chain(name: ServicePortName) -> str:
    return EXTERNAL_PREFIX + service_chain_base(name)


def firewall_chain(name: ServicePortName) -> str:
    return FIREWALL_PREFIX + service_chain_base(name)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hook:
    """What makes a chain a base chain: `type <kind> hook <hook> priority <n>`."""

    kind: str  # filter | nat
    hook: str  # prerouting | input | forward | output | postrouting
    priority: int

    def header(self) -> str:
        return f"type {self.kind} hook {self.hook} priority {self.priority}; policy accept;"


@dataclass(frozen=True)
class Chain:
    """One chain of our table and its rules, in order.

    `listed` is how `nft -t -y list` prints the rules when that differs from what we write:
    nft 1.0.6 drops the `meta l4proto` that an `update … ct original proto-dst` needs to parse,
    so its listing of that rule cannot be fed back; comparisons use `listed or rules`.
    """

    name: str
    rules: tuple[str, ...]
    hook: Hook | None = None
    listed: tuple[str, ...] | None = None

    @property
    def expected_listing(self) -> tuple[str, ...]:
        return self.listed if self.listed is not None else self.rules


@dataclass(frozen=True)
class SetDecl:
    """A named set or map: `body` is its declaration as `nft -t list` prints it, one line each."""

    name: str
    is_map: bool
    body: tuple[str, ...]

    @property
    def keyword(self) -> str:
        return "map" if self.is_map else "set"


# One element: (set or map name, key, value or None for a set), in nft's syntax (`a . b . c`,
# `goto x`). A plain tuple: a NamedTuple's Python-level __new__ was a third of a 10,000-service
# compile.
Element = tuple[str, str, str | None]


@dataclass(frozen=True)
class AffinityTarget:
    """What an affinity service's entries in `@affinity-<proto>` may point at.

    Entries are keyed `client . ip . port`; when an endpoint leaves the service, the entries of
    clients stuck to it must go (kube-proxy deletes that endpoint's affinity set), which the
    backend does by reading the dynamic map: `suffixes` are the ` . ip . port` ends of the keys
    of this service port's destinations (` . port` alone for a node port, reached on any local
    address).
    """

    map: str
    suffixes: frozenset[str]
    endpoints: frozenset[str]  # values `ip . port`


@dataclass(frozen=True, slots=True)  # slots: one per service port an agent keeps
class ServiceFragment:
    """Everything one service port contributes, for one family.

    `elements` are its map and set elements, `shared_chains` the names of the shared chains it
    points at (`lb-…`, `affinity-…`: generated once for all users), `chains` the chains it owns
    (external and firewall chains, created and deleted with it). An agent's compiles keep
    fragments in a `FragmentMemo`, so the fragment of an unchanged service is the *same object*
    from sync to sync and the planner skips it by identity.
    """

    name: ServicePortName
    # The elements flat, `(set, key, value, set, key, …)` (see `elements`): a tuple per element,
    # one per endpoint and more, was 13 MiB of an agent's 166 at 10,000 Services x 10 endpoints.
    element_data: tuple[str | None, ...] = ()
    shared_chains: frozenset[str] = frozenset()
    affinity: AffinityTarget | None = None
    chains: tuple[Chain, ...] = ()

    @classmethod
    def of(
        cls, name: ServicePortName, elements: Iterable[Element] = (), shared_chains: frozenset[str] = frozenset(),
        affinity: AffinityTarget | None = None, chains: tuple[Chain, ...] = (),
    ) -> ServiceFragment:
        return cls(name, tuple(itertools.chain.from_iterable(elements)), shared_chains, affinity, chains)

    @property
    def element_count(self) -> int:
        return len(self.element_data) // 3

    @property
    def elements(self) -> Iterator[Element]:
        """Each element as `(set, key, value)`, made as it is read (one pass per call)."""
        data = iter(self.element_data)
        return zip(data, data, data, strict=True)  # type: ignore[arg-type]  # three at a time: set, key, value


@dataclass(frozen=True)
class Ruleset:
    """The desired content of one table (`ip kproxy-nft` or `ip6 kproxy-nft`).

    `chains` are the shared ones (fixed and generated); the chains service ports own are in
    their fragments (`all_chains` gives both).
    """

    family: IPFamily
    sets: tuple[SetDecl, ...]
    chains: tuple[Chain, ...]
    fragments: Mapping[ServicePortName, ServiceFragment] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fragments", MappingProxyType(dict(self.fragments)))

    @property
    def nft_family(self) -> str:
        return nft_family(self.family)

    def all_chains(self) -> Iterator[Chain]:
        """Shared chains, then the chains of each service port in name order."""
        yield from self.chains
        for fragment in self.fragments.values():
            yield from fragment.chains

    def chain(self, name: str) -> Chain | None:
        return next((c for c in self.all_chains() if c.name == name), None)

    def elements(self) -> dict[str, dict[str, str | None]]:
        """All elements, per set: key → value (first fragment in name order wins a shared key)."""
        out: dict[str, dict[str, str | None]] = {s.name: {} for s in self.sets}
        for fragment in self.fragments.values():
            for set_name, key, value in fragment.elements:
                out[set_name].setdefault(key, value)
        return out


def nft_family(family: IPFamily) -> str:
    return "ip" if family is IPFamily.V4 else "ip6"


# ---------------------------------------------------------------------------------------------
# fixed declarations and chains
# ---------------------------------------------------------------------------------------------


class _Words(NamedTuple):
    """Family-specific spellings."""

    ip: str  # ip | ip6
    addr: str  # ipv4_addr | ipv6_addr
    loopback: str  # what node ports never answer on (kube-proxy's `noLocalhost`)


def _words(family: IPFamily) -> _Words:
    if family is IPFamily.V4:
        return _Words("ip", "ipv4_addr", "127.0.0.0/8")
    return _Words("ip6", "ipv6_addr", "::1")


@functools.lru_cache(maxsize=8)
def declarations(family: IPFamily, counters: bool = True) -> tuple[SetDecl, ...]:
    """The sets and maps of the table (the same for every cluster); `counters`: per-endpoint
    counters on the backend maps (nft lists a set's `counter` statement as its own line)."""
    w = _words(family)
    counted = ("counter",) if counters else ()
    service_key = f"type {w.addr} . inet_proto . inet_service : verdict"
    nodeport_key = "type inet_proto . inet_service : verdict"
    decls = [
        SetDecl(SERVICE_IPS, True, (service_key,)),
        SetDecl(SERVICE_NODEPORTS, True, (nodeport_key,)),
        SetDecl(NO_ENDPOINT_SERVICES, True, (service_key,)),
        SetDecl(NO_ENDPOINT_NODEPORTS, True, (nodeport_key,)),
        SetDecl(FIREWALL_IPS, True, (service_key,)),
        SetDecl(CLUSTER_IPS, False, (f"type {w.addr}",)),
        SetDecl(HAIRPIN, False, (f"type {w.addr} . {w.addr}",)),
    ]
    for proto in PROTOCOLS:
        p = proto.lower()
        endpoint = f"{w.ip} daddr . {p} dport"
        decls += [
            SetDecl(backends_map(proto), True,
                    (f"typeof {endpoint} . numgen random mod {NUMGEN_BOUND} : {endpoint}", *counted)),
            SetDecl(
                affinity_map(proto),
                True,
                (
                    f"typeof {w.ip} saddr . {endpoint} : {endpoint}",
                    f"size {AFFINITY_MAP_SIZE}",
                    "flags dynamic,timeout",
                ),
            ),
            SetDecl(affinity_services_map(proto), True, (f"type {w.addr} . inet_service : verdict",)),
            SetDecl(affinity_nodeports_map(proto), True, ("type inet_service : verdict",)),
        ]
    return tuple(decls)


def _masquerade_rules(family: IPFamily, node: NodeContext) -> tuple[str, ...]:
    """The masquerade decision for cluster-IP traffic, the same for every service.

    kube-proxy: masquerade_all marks everything; otherwise, with a local-traffic detector,
    traffic that is not from this node's pods (clients routed to the VIP through any node, whose
    reply must come back through this node), as in the iptables compiler.
    """
    if node.masquerade_all:
        return (f"jump {MARK_MASQ}",)
    detector = node.local_detector(family)
    if detector is None:
        return ()
    return (f"{local_match(family, detector, negate=True)} jump {MARK_MASQ}",)


def local_match(family: IPFamily, detector: LocalDetector, negate: bool = False) -> str:
    """kube-proxy's nftables `IfLocal()` / `IfNotLocal()`: a source CIDR or an input interface."""
    op = "!= " if negate else ""
    if detector.cidr is not None:
        return f"{_words(family).ip} saddr {op}{_nft_prefix(detector.cidr)}"
    return f'iifname {op}"{detector.interface}{"*" if detector.prefix else ""}"'



def _nft_duration(seconds: int) -> str:
    """A duration as nft prints it (`3h`, `1m30s`, `1d2h`), so the listing compares equal."""
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts) or "0s"


def generated_chain(name: str, family: IPFamily, node: NodeContext) -> Chain:
    """The content of a shared chain named by `lb_chain` / `affinity_record_chain`."""
    render.node(node)  # its cluster CIDR reaches the masquerade rule
    w = _words(family)
    kind, proto_text, rest = name.split("-", 2)
    proto = Protocol(proto_text.upper())
    p = proto.lower()
    endpoint = f"{w.ip} daddr . {p} dport"
    if kind == "affinity":  # affinity-<proto>-<seconds>: record the endpoint chosen
        update = (
            f"update @{affinity_map(proto)} {{ ct original {w.ip} saddr . ct original {w.ip} daddr . "
            f"ct original proto-dst timeout {_nft_duration(int(rest))} : {endpoint} }}"
        )
        return Chain(name, (f"meta l4proto {p} {update}",), listed=(update,))
    count_text, _, suffix = rest.partition("-")
    count = int(count_text)
    rules = list(_masquerade_rules(family, node))
    if suffix == "affinity":
        rules.append(_affinity_dnat(family, proto))
    rules.append(f"dnat {w.ip} to {endpoint} . numgen random mod {count} map @{backends_map(proto)}")
    return Chain(name, tuple(rules))


def _affinity_dnat(family: IPFamily, proto: Protocol) -> str:
    """DNAT to the endpoint this client was last sent to at this destination (no-op on a miss)."""
    w = _words(family)
    return f"dnat {w.ip} to {w.ip} saddr . {w.ip} daddr . {proto.lower()} dport map @{affinity_map(proto)}"


def _nft_ip(ip: str) -> str:
    """The address as nft prints it: IPv6 compressed (API text may not be); IPv4 is already."""
    return str(ipaddress.ip_address(ip)) if ":" in ip else ip


def _nft_prefix(cidr: str) -> str:
    """A CIDR as nft prints a prefix match: host bits cleared, a full-length prefix as an address."""
    net = ipaddress.ip_network(cidr, strict=False)
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def _addresses(ips: Iterable[str]) -> str:
    """A match on some addresses as nft lists it: one bare, several as a sorted anonymous set."""
    ordered = sorted({ipaddress.ip_address(ip) for ip in ips})
    if len(ordered) == 1:
        return str(ordered[0])
    return "{ " + ", ".join(str(ip) for ip in ordered) + " }"


def _nodeport_match(family: IPFamily, node: NodeContext) -> str | None:
    """What selects node-port destinations, or None when node ports are reached nowhere.

    kube-proxy's nftables mode: every local address but loopback when `nodeport_addresses`
    selects all, otherwise the node's matching addresses; never localhost.
    """
    w = _words(family)
    ips = node.nodeport_ips(family, allow_localhost=False)
    if ips is None:
        return f"fib daddr type local {w.ip} daddr != {w.loopback}"
    if not ips:
        return None
    return f"{w.ip} daddr {_addresses(ips)}"


@dataclass(frozen=True)
class _BaseChain:
    """A base chain: where it hooks in, and the shared chains it sends packets to, in order."""

    name: str
    hook: Hook
    sends_to: tuple[str, ...]
    new_connections_only: bool = True  # the filter checks look at a connection's first packet


# Every base chain but nat-postrouting, as data (kube-proxy's nftables mode keeps such a table).
BASE_CHAINS = (
    _BaseChain("filter-prerouting", Hook("filter", "prerouting", PRIORITY_FILTER), (FIREWALL_CHECK,)),
    _BaseChain("filter-input", Hook("filter", "input", PRIORITY_FILTER), (NODEPORT_ENDPOINTS_CHECK, ENDPOINTS_CHECK)),
    _BaseChain("filter-forward", Hook("filter", "forward", PRIORITY_FILTER), (ENDPOINTS_CHECK, CLUSTER_IPS_CHECK)),
    _BaseChain("filter-output", Hook("filter", "output", PRIORITY_FILTER), (ENDPOINTS_CHECK, FIREWALL_CHECK)),
    _BaseChain("filter-output-post-dnat", Hook("filter", "output", PRIORITY_FILTER_POST_DNAT), (CLUSTER_IPS_CHECK,)),
    _BaseChain("nat-prerouting", Hook("nat", "prerouting", PRIORITY_DSTNAT), (SERVICES,), False),
    _BaseChain("nat-output", Hook("nat", "output", PRIORITY_DSTNAT), (SERVICES,), False),
)


def _base_chain(base: _BaseChain) -> Chain:
    when = "ct state new " if base.new_connections_only else ""
    return Chain(base.name, tuple(f"{when}jump {target}" for target in base.sends_to), base.hook)


def _nat_postrouting(w: _Words) -> Chain:
    """Affinity records, hairpin, then masquerading of what was marked."""
    record_affinity = tuple(
        f"ct status dnat meta l4proto {proto.lower()} ct original proto-dst vmap @{affinity_nodeports_map(proto)}"
        for proto in PROTOCOLS
    ) + tuple(
        f"ct status dnat meta l4proto {proto.lower()} ct original {w.ip} daddr . ct original proto-dst "
        f"vmap @{affinity_services_map(proto)}"
        for proto in PROTOCOLS
    )
    rules = (
        # Node ports first: the records by exact destination below come later and win.
        *record_affinity,
        # Hairpin: a pod that reached itself through a service must be masqueraded, or it
        # would answer itself directly with the wrong source address.
        f"ct status dnat {w.ip} saddr . {w.ip} daddr @{HAIRPIN} masquerade fully-random",
        f"jump {MASQUERADING}",
    )
    return Chain("nat-postrouting", rules, Hook("nat", "postrouting", PRIORITY_SRCNAT))


def _dispatch_chains(family: IPFamily, node: NodeContext) -> tuple[Chain, ...]:
    """The chains that look a packet's destination up in the per-service maps."""
    w = _words(family)
    nodeports = _nodeport_match(family, node)
    dispatch = f"{w.ip} daddr . meta l4proto . th dport"
    # In input, the destination is local already: kube-proxy leaves out the fib test there.
    nodeport_check = nodeports.removeprefix("fib daddr type local ") if nodeports else None
    return (
        Chain(
            SERVICES,
            (
                f"{dispatch} vmap @{SERVICE_IPS}",
                *((f"{nodeports} meta l4proto . th dport vmap @{SERVICE_NODEPORTS}",) if nodeports else ()),
            ),
        ),
        Chain(ENDPOINTS_CHECK, (f"{dispatch} vmap @{NO_ENDPOINT_SERVICES}",)),
        Chain(
            NODEPORT_ENDPOINTS_CHECK,
            (f"{nodeport_check} meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}",) if nodeport_check else (),
        ),
        Chain(FIREWALL_CHECK, (f"{dispatch} vmap @{FIREWALL_IPS}",)),
        Chain(
            CLUSTER_IPS_CHECK,
            (
                # Still addressed to a cluster IP after DNAT: no service port matched.
                f"{w.ip} daddr @{CLUSTER_IPS} reject",
                # Service addresses no service holds: nothing will ever answer.
                *(f"{w.ip} daddr {_nft_prefix(cidr)} drop" for cidr in node.service_cidrs_of(family)),
            ),
        ),
    )


def _verdict_chains(node: NodeContext) -> tuple[Chain, ...]:
    mark = f"{1 << node.masquerade_bit:#010x}"
    return (
        # Refuse at once, as a closed port would: a reset for TCP, port unreachable otherwise.
        Chain(REJECT_CHAIN, ("reject with tcp reset", "reject")),
        Chain(MARK_MASQ, (f"meta mark set meta mark | {mark}",)),
        # As kube-proxy: clear the mark first, so that a packet that re-traverses the stack
        # (e.g. through a tunnel device) is not masqueraded twice.
        Chain(
            MASQUERADING,
            (
                f"meta mark & {mark} == 0x00000000 return",
                f"meta mark set meta mark ^ {mark}",
                "masquerade fully-random",
            ),
        ),
    )


@functools.lru_cache(maxsize=8)
def fixed_chains(family: IPFamily, node: NodeContext) -> tuple[Chain, ...]:
    """The chains every node has, whatever its services (base chains first)."""
    render.node(node)  # its addresses and CIDRs reach the node-port and cluster-IP rules
    return (
        *(_base_chain(base) for base in BASE_CHAINS),
        _nat_postrouting(_words(family)),
        *_dispatch_chains(family, node),
        *_verdict_chains(node),
    )


# ---------------------------------------------------------------------------------------------
# per service port
# ---------------------------------------------------------------------------------------------


def _targets(endpoints: Iterable[Endpoint]) -> list[str]:
    return [f"{_nft_ip(ep.ip)} . {ep.port}" for ep in endpoints]


def _dnat_rules(
    family: IPFamily, proto: Protocol, endpoints: tuple[Endpoint, ...], affinity: bool, condition: str = ""
) -> list[str]:
    """DNAT (under `condition`) to one of `endpoints`: the client's sticky one, else at random."""
    w = _words(family)
    when = f"{condition} " if condition else ""
    rules = [when + _affinity_dnat(family, proto)] if affinity else []
    choices = ", ".join(f"{i} : {target}" for i, target in enumerate(_targets(endpoints)))
    rules.append(
        f"{when}meta l4proto {proto.lower()} dnat {w.ip} to numgen random mod {len(endpoints)} map {{ {choices} }}"
    )
    return rules


def _external_rules(
    svc: ServicePort, sel: EndpointSelection, node: NodeContext, family: IPFamily
) -> tuple[str, ...]:
    """kube-proxy's `external-…` chain: the external traffic policy, then the DNAT."""
    affinity = svc.session_affinity_seconds is not None
    proto = svc.protocol
    if svc.external_traffic_policy is TrafficPolicy.CLUSTER:
        # Endpoints may be on other nodes: the reply must come back through this one.
        return (f"jump {MARK_MASQ}", *_dnat_rules(family, proto, sel.cluster, affinity))
    rules: list[str] = []
    detector = node.local_detector(family)
    if sel.cluster:
        if detector:
            # Pods reach external destinations as if from outside and back: no policy applies.
            rules += _dnat_rules(family, proto, sel.cluster, affinity, local_match(family, detector))
        # The host itself: its source address would be the (local) destination, so masquerade.
        rules.append(f"fib saddr type local jump {MARK_MASQ}")
        rules += _dnat_rules(family, proto, sel.cluster, affinity, "fib saddr type local")
    if sel.local:
        # Everyone else: this node's endpoints, the client's address kept. With none, the
        # traffic was dropped before DNAT (`no-endpoint-*` maps, verdict drop).
        rules += _dnat_rules(family, proto, sel.local, affinity)
    return tuple(rules)


def _firewall_rules(
    family: IPFamily, svc: ServicePort, ranges: Sequence[str], lb_ips: list[str], node: NodeContext
) -> tuple[str, ...]:
    """kube-proxy's `firewall-…` chain: let the source ranges through, drop the rest.

    When a node IP is inside a range, so are the LB IPs (`ServicePort.source_ranges_admit`).
    """
    w = _words(family)
    allowed = [_nft_prefix(r) for r in ranges]
    if svc.source_ranges_admit(node.node_ips_of(family), family):
        allowed += lb_ips
    return (*(f"{w.ip} saddr {source} return" for source in dict.fromkeys(allowed)), "drop")


def _of_family(ips: Iterable[str], family: IPFamily) -> list[str]:
    return [_nft_ip(ip) for ip in dict.fromkeys(ips) if ip_family(ip) is family]


@dataclass
class _Parts:
    """What one service port's fragment collects, section by section (`compile_service_port`)."""

    svc: ServicePort
    family: IPFamily
    sel: EndpointSelection
    affinity: int | None
    elements: list[Element] = field(default_factory=list)
    shared: set[str] = field(default_factory=set)  # shared chains it points at
    chains: list[Chain] = field(default_factory=list)  # chains it owns
    sticky: set[str] = field(default_factory=set)  # endpoints affinity entries may point at
    destinations: list[str] = field(default_factory=list)  # `ip . port` that affinity is recorded for

    @property
    def proto(self) -> str:
        return self.svc.protocol.lower()


def compile_service_port(
    svc: ServicePort, endpoints: tuple[Endpoint, ...], node: NodeContext, family: IPFamily
) -> ServiceFragment:
    """The elements and chains of one service port for one family (other-family endpoints ignored)."""
    # The rules are made of these values: refuse any outside its grammar (render.UnsafeValue),
    # whatever validation let through.
    render.service_port(svc)
    render.node(node)
    endpoints = render.endpoints(endpoints_of_family(endpoints, family))
    cluster_ip = svc.cluster_ip(family)
    if cluster_ip is None:
        return ServiceFragment(svc.name)  # no address of this family: nothing to program
    # IPv6 ClientIP affinity is not programmed: nft 1.0.6 aborts (netlink_linearize.c:799,
    # `dreg < ctx->reg_low`) on any dynamic *map* update whose key holds an IPv6 address in a
    # concatenation, which `@affinity-<proto>` needs; through libnftables that abort would take
    # the agent down. Such a service is balanced at random in IPv6 (`ipv6_affinity_skipped`).
    affinity = svc.session_affinity_seconds if family is IPFamily.V4 else None
    parts = _Parts(svc, family, categorize_endpoints(svc, endpoints, node, family), affinity)
    vip = _nft_ip(cluster_ip)
    parts.elements.append((CLUSTER_IPS, vip, None))
    _internal_traffic(parts, vip)
    # Destinations of this family: kube-proxy's per-family service info drops the others.
    external_ips = _of_family((*svc.external_ips, *svc.load_balancer_ips), family)
    reached_externally = _external_traffic(parts, external_ips, node)
    _source_ranges(parts, node)
    # Hairpin pairs: a pod DNATed back to itself, which only its own node sees (a pod's packets
    # to a service are DNATed by the node it runs on). kube-proxy masquerades in every endpoint
    # chain; an element per endpoint of the cluster was most of a 10,000-service load, so only
    # endpoints that can be here get one: this node's, or those whose node is not known. The
    # set is keyed, so endpoints shared between service ports cost one element.
    here = {_nft_ip(ep.ip) for ep in parts.sel.all_reachable if ep.node_name in (None, node.hostname)}
    parts.elements += [(HAIRPIN, f"{ip} . {ip}", None) for ip in sorted(here)]
    target = _affinity_records(parts, reached_externally and svc.node_port is not None)
    return ServiceFragment.of(svc.name, parts.elements, frozenset(parts.shared), target, tuple(parts.chains))


def _internal_traffic(parts: _Parts, vip: str) -> None:
    """The cluster IP: to the shared `lb-…` chain, or rejected / dropped when nothing serves it."""
    svc, sel, proto = parts.svc, parts.sel, parts.svc.protocol
    internal = sel.local if svc.internal_traffic_policy is TrafficPolicy.LOCAL else sel.cluster
    service_key = f"{vip} . {parts.proto} . {svc.port}"
    if not internal:
        # kube-proxy: no endpoints anywhere → reject; internalTrafficPolicy Local with endpoints
        # only on other nodes → drop (the traffic must not be rerouted to them).
        parts.elements.append((NO_ENDPOINT_SERVICES, service_key, "drop" if sel.has_any else f"goto {REJECT_CHAIN}"))
        return
    lb = lb_chain(proto, len(internal), parts.affinity is not None)
    parts.shared.add(lb)
    targets = _targets(internal)
    parts.elements.append((SERVICE_IPS, service_key, f"goto {lb}"))
    prefix = f"{vip} . {svc.port} . "
    parts.elements += [(backends_map(proto), f"{prefix}{i}", target) for i, target in enumerate(targets)]
    parts.sticky.update(targets)
    parts.destinations.append(f"{vip} . {svc.port}")


def _external_traffic(parts: _Parts, external_ips: list[str], node: NodeContext) -> bool:
    """External and LB IPs and the node port: kube-proxy's EXT chain; True if it exists.

    It exists whenever there are endpoints at all, for its short-circuit rules, even if none is
    local; what it cannot serve is rejected or dropped before DNAT.
    """
    svc, sel = parts.svc, parts.sel
    external_keys = [f"{ip} . {parts.proto} . {svc.port}" for ip in external_ips]
    nodeport_key = f"{parts.proto} . {svc.node_port}" if svc.node_port else None
    reached_externally = sel.has_any and bool(external_keys or nodeport_key)
    if reached_externally:
        ext = external_chain(svc.name)
        parts.chains.append(Chain(ext, _external_rules(svc, sel, node, parts.family)))
        parts.elements += [(SERVICE_IPS, key, f"goto {ext}") for key in external_keys]
        if nodeport_key:
            parts.elements.append((SERVICE_NODEPORTS, nodeport_key, f"goto {ext}"))
        parts.sticky.update(_targets(sel.cluster))
        parts.sticky.update(_targets(sel.local))
        parts.destinations += [f"{ip} . {svc.port}" for ip in external_ips]
    local_policy = svc.external_traffic_policy is TrafficPolicy.LOCAL
    if not sel.has_any or (local_policy and not sel.local):
        # Nothing to reach (reject), or nothing here for traffic from outside (drop: what the
        # EXT chain short-circuits for pods and the host was DNATed before this check).
        verdict = "drop" if sel.has_any else f"goto {REJECT_CHAIN}"
        parts.elements += [(NO_ENDPOINT_SERVICES, key, verdict) for key in external_keys]
        if nodeport_key:
            parts.elements.append((NO_ENDPOINT_NODEPORTS, nodeport_key, verdict))
    return reached_externally


def _source_ranges(parts: _Parts, node: NodeContext) -> None:
    """loadBalancerSourceRanges: LB IPs only (node ports and external IPs are not filtered)."""
    svc, family = parts.svc, parts.family
    lb_ips = _of_family(svc.load_balancer_ips, family)
    ranges = svc.source_ranges_of(family)
    if lb_ips and ranges:
        fw = firewall_chain(svc.name)
        parts.chains.append(Chain(fw, _firewall_rules(family, svc, ranges, lb_ips, node)))
        parts.elements += [(FIREWALL_IPS, f"{ip} . {parts.proto} . {svc.port}", f"goto {fw}") for ip in lb_ips]


def _affinity_records(parts: _Parts, sticky_nodeport: bool) -> AffinityTarget | None:
    """ClientIP affinity: where the choice is recorded, and what its entries may point at."""
    if parts.affinity is None or not (parts.destinations or sticky_nodeport):
        return None
    proto = parts.svc.protocol
    record = affinity_record_chain(proto, parts.affinity)
    parts.shared.add(record)
    jump = f"jump {record}"
    parts.elements += [(affinity_services_map(proto), dest, jump) for dest in parts.destinations]
    suffixes = {f" . {dest}" for dest in parts.destinations}
    if sticky_nodeport:
        parts.elements.append((affinity_nodeports_map(proto), str(parts.svc.node_port), jump))
        suffixes.add(f" . {parts.svc.node_port}")  # reached on any local address
    return AffinityTarget(affinity_map(proto), frozenset(suffixes), frozenset(parts.sticky))


def ipv6_affinity_skipped(state: ClusterState) -> list[ServicePortName]:
    """The service ports whose ClientIP affinity the ip6 table does not keep (see above)."""
    return sorted(
        (name for name, svc in state.services.items()
         if svc.session_affinity_seconds is not None and svc.cluster_ip(IPFamily.V6) is not None),
        key=sort_key,
    )


def compile_ruleset(
    state: ClusterState,
    node: NodeContext,
    family: IPFamily = IPFamily.V4,
    memo: FragmentMemo[ServiceFragment] | None = None,
) -> Ruleset:
    """The desired table of one family, deterministic for any input order.

    With a `memo` (an agent's, kept across syncs), unchanged service ports are not recompiled.
    """
    fragments: dict[ServicePortName, ServiceFragment] = {}
    needed: set[str] = set()
    for name in sorted(state.services, key=sort_key):
        svc, endpoints = state.services[name], state.endpoints_of(name)
        fragment = compile_with(memo, compile_service_port, svc, endpoints, node, family)
        fragments[name] = fragment
        needed.update(fragment.shared_chains)
    if memo is not None:
        memo.retain(fragments, family)
    chains = fixed_chains(family, node) + _generated_chains(needed, family, node)
    return Ruleset(family, declarations(family, COUNT_CONNECTIONS), chains, fragments)


def _generated_chains(needed: Iterable[str], family: IPFamily, node: NodeContext) -> tuple[Chain, ...]:
    return tuple(generated_chain(chain, family, node) for chain in sorted(needed, key=_chain_order))


def update_ruleset(
    previous: Ruleset,
    state: ClusterState,
    node: NodeContext,
    changed: Collection[ServicePortName],
    memo: FragmentMemo[ServiceFragment] | None = None,
) -> Ruleset:
    """`compile_ruleset(state, node, previous.family)` in O(changed), for an agent's partial sync.

    `previous` must have been compiled for the same node, from a state that differs from `state`
    only in the `changed` service ports (added, modified or removed). Fragments keep their
    previous order, new ones come last: the backend diffs by key, so order is irrelevant there
    (dumps use `compile_ruleset`). Shared chains that lost their last user are still listed,
    until the next full compile: the backend keeps those until its next full sync anyway.
    """
    family = previous.family
    # The proxy's copy() is its dict's copy(): no re-hashing of 10,000 names (dict() of a
    # mappingproxy would call every key's __hash__).
    fragments: dict[ServicePortName, ServiceFragment] = previous.fragments.copy()  # type: ignore[attr-defined]
    fixed = fixed_chains(family, node)
    needed = {chain.name for chain in previous.chains[len(fixed):]}  # compile_ruleset: fixed, then generated
    recompile_changed(fragments, state, node, family, changed, compile_service_port, memo)
    for name in changed:
        if name in fragments:
            needed.update(fragments[name].shared_chains)
    return Ruleset(family, previous.sets, fixed + _generated_chains(needed, family, node), fragments)


def compile_all(
    state: ClusterState,
    node: NodeContext,
    families: Iterable[IPFamily] = (IPFamily.V4, IPFamily.V6),
    memo: FragmentMemo[ServiceFragment] | None = None,
) -> tuple[Ruleset, ...]:
    """One ruleset per family (both by default: kube-proxy programs both in dual-stack)."""
    return tuple(compile_ruleset(state, node, family, memo) for family in families)


def _chain_order(name: str) -> tuple[str, int, str]:
    """lb-tcp-2 before lb-tcp-10: by kind/protocol, then by number."""
    kind, proto, rest = name.split("-", 2)
    number, _, suffix = rest.partition("-")
    return (f"{kind}-{proto}", int(number), suffix)


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------

# Elements per `add element` command: keeps each netlink message batch and nft's parser
# working set small; the whole script is still one transaction.
ELEMENTS_PER_COMMAND = 4096


def render_chain(chain: Chain, indent: str = "\t") -> list[str]:
    lines = [f"{indent}chain {chain.name} {{"]
    if chain.hook is not None:
        lines.append(f"{indent}\t{chain.hook.header()}")
    lines += [f"{indent}\t{rule}" for rule in chain.rules]
    lines.append(f"{indent}}}")
    return lines


def render_set(decl: SetDecl, indent: str = "\t") -> list[str]:
    return [f"{indent}{decl.keyword} {decl.name} {{", *(f"{indent}\t{line}" for line in decl.body), f"{indent}}}"]


def render_elements(family: str, set_name: str, items: Iterable[str], verb: str = "add") -> list[str]:
    """`add element` (or `delete element`) commands for already rendered elements."""
    lines = []
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == ELEMENTS_PER_COMMAND:
            lines.append(f"{verb} element {family} {TABLE} {set_name} {{ {', '.join(batch)} }}")
            batch = []
    if batch:
        lines.append(f"{verb} element {family} {TABLE} {set_name} {{ {', '.join(batch)} }}")
    return lines


def render_table(ruleset: Ruleset) -> list[str]:
    """The `table … { … }` block (declarations and chains, no elements)."""
    lines = [f"table {ruleset.nft_family} {TABLE} {{", f'\tcomment "{TABLE_COMMENT}"']
    for decl in ruleset.sets:
        lines += render_set(decl)
    for chain in ruleset.all_chains():
        lines += render_chain(chain)
    lines.append("}")
    return lines


def render_script(rulesets: Ruleset | Iterable[Ruleset]) -> str:
    """`nft -f` input that creates the tables with all their elements in an empty namespace.

    This is what `kproxy-nft dump --proxy-mode nftables` prints. It only ever names our own
    tables, so loading it touches nothing else.
    """
    if isinstance(rulesets, Ruleset):
        rulesets = (rulesets,)
    lines: list[str] = []
    for ruleset in rulesets:
        lines += render_table(ruleset)
        for set_name, elements in ruleset.elements().items():
            items = (k if v is None else f"{k} : {v}" for k, v in elements.items())
            lines += render_elements(ruleset.nft_family, set_name, items)
    return "\n".join(lines) + "\n"
