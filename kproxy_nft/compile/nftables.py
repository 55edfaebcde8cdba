"""Pure compiler: ClusterState → desired nftables state, in a flat layout whose cost follows the change.

kube-proxy's nftables mode (`pkg/proxy/nftables/proxier.go`) gives every service port a chain
and every endpoint a chain, picked with `numgen random mod N vmap { i : goto endpoint-… }`.
The kernel's transaction cost grows with the number of chains, so a 10,000-service cluster
takes tens of seconds to load and every later sync ~0.5 s. Here the per-service data lives in
*map elements* and the chains are shared, so a sync that changes one service touches only that
service's elements:

    services            ip daddr . meta l4proto . th dport vmap @service-ips
    @service-ips        10.96.0.10 . tcp . 80 : goto lb-tcp-3          (one element per service port)
    lb-tcp-3            [masquerade check]; dnat ip to ip daddr . tcp dport . numgen random mod 3
                        map @backends-tcp                              (one chain per protocol and N)
    @backends-tcp       10.96.0.10 . 80 . 0 : 10.1.0.47 . 80, … . 1 : …, … . 2 : …
                                                                       (one element per endpoint)

Behaviour is kube-proxy's (the same `categorize_endpoints`, masquerade mark, chain names for the
shared chains), with these flat counterparts of its per-service chains:

* masquerade of off-cluster sources (or of all with masquerade_all): a rule in each shared
  `lb-…` chain, since the condition is the node's, not the service's; the mark is acted on in
  `masquerading` as in kube-proxy;
* hairpin (an endpoint reaching its own service): in postrouting, `ct status dnat` traffic whose
  source equals its (translated) destination, looked up in the `@hairpin` set of `ep . ep`
  pairs (nft cannot compare two packet fields directly), for this node's endpoints;
* no endpoints: `@no-endpoint-services` → `goto reject-chain` (tcp reset, else icmp port
  unreachable), or `drop` when internalTrafficPolicy Local finds endpoints only elsewhere,
  evaluated in filter chains at priority -110 (before DNAT) like kube-proxy's;
* ClientIP affinity: `lb-<proto>-<N>-affinity` first looks the client up in the dynamic
  `@affinity-<proto>` map (client . service ip . port → endpoint); a miss falls through to the
  random pick. The choice is recorded in nat postrouting, where the translated destination is
  the chosen endpoint and `ct original` still names the service: `@affinity-services-<proto>`
  sends affinity services to `affinity-<proto>-<seconds>`, whose `update` refreshes the entry
  with the service's timeout (the `recent --set` of the iptables layout).

One map per protocol because a map typed with `tcp dport` cannot be used in a rule that also
matches udp ("conflicting protocols specified", nft 1.0.6). No interval sets: they corrupt
elements when one command carries more than 962 of them, and a delete costs O(set).

Externally reachable services (NodePort, external and LB IPs, source ranges, external traffic
policy) come in a later issue; they get their own maps keyed the same way (`service-nodeports`,
`firewall-ips`), their own `backends` keys (an external IP is just another key) and, where a
service needs logic the maps cannot express, a chain of its own.

The result is data (`Ruleset`: declarations, chains, per-service-port element fragments) that
`render_script` turns into `nft -f` input loading into an empty namespace, and that
`kernel/nftables.py` diffs key by key against what it applied. Pure: no I/O, no clock.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

from kproxy_nft.model import (
    ClusterState,
    Endpoint,
    IPFamily,
    NodeContext,
    Protocol,
    ServicePort,
    ServicePortName,
    TrafficPolicy,
)
from kproxy_nft.selection import categorize_endpoints

TABLE = "kproxy-nft"
TABLE_COMMENT = "kproxy-nft: Kubernetes service rules"

# Shared chains (kube-proxy's names where it has the same chain).
SERVICES = "services"
ENDPOINTS_CHECK = "service-endpoints-check"
REJECT_CHAIN = "reject-chain"
MARK_MASQ = "mark-for-masquerade"
MASQUERADING = "masquerading"

# Maps and sets.
SERVICE_IPS = "service-ips"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
HAIRPIN = "hairpin"

PROTOCOLS = (Protocol.TCP, Protocol.UDP, Protocol.SCTP)

# Priorities as numbers: nft refuses `dstnat + 10` style names on some hooks (filter/output),
# and `nft -y` lists numbers, so what we write is what we read back. Filter chains run before
# DNAT (-100) so that they see the service address, as kube-proxy's do.
PRIORITY_FILTER = -110
PRIORITY_DSTNAT = -100
PRIORITY_SRCNAT = 100

# Dynamic affinity maps are sized generously: an entry is one client of one service port.
AFFINITY_MAP_SIZE = 1 << 20

# Keys of the backend maps carry the endpoint's index, from `numgen random mod N`; 65536 bounds
# the endpoints of one service port far above what an EndpointSlice set can hold.
NUMGEN_BOUND = 65536


def backends_map(proto: Protocol) -> str:
    return f"backends-{proto.lower()}"


def affinity_map(proto: Protocol) -> str:
    return f"affinity-{proto.lower()}"


def affinity_services_map(proto: Protocol) -> str:
    return f"affinity-services-{proto.lower()}"


def lb_chain(proto: Protocol, count: int, affinity: bool = False) -> str:
    """The shared chain that load-balances over `count` endpoints (optionally with affinity)."""
    return f"lb-{proto.lower()}-{count}" + ("-affinity" if affinity else "")


def affinity_record_chain(proto: Protocol, seconds: int) -> str:
    return f"affinity-{proto.lower()}-{seconds}"


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
    backend does by reading the dynamic map: `prefix` is the ` . ip . port` part of the key.
    """

    map: str
    prefix: str
    endpoints: frozenset[str]  # values `ip . port`


@dataclass(frozen=True)
class ServiceFragment:
    """Everything one service port contributes, for one family: its elements and shared chains.

    Memoized per service port (`compile_service_port`), so the fragment of an unchanged service
    is the *same object* from sync to sync and the backend can skip it by identity.
    """

    name: ServicePortName
    elements: tuple[Element, ...] = ()
    chains: frozenset[str] = frozenset()
    affinity: AffinityTarget | None = None


@dataclass(frozen=True)
class Ruleset:
    """The desired content of one table (`ip kproxy-nft` or `ip6 kproxy-nft`)."""

    family: IPFamily
    sets: tuple[SetDecl, ...]
    chains: tuple[Chain, ...]
    fragments: Mapping[ServicePortName, ServiceFragment] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fragments", MappingProxyType(dict(self.fragments)))

    @property
    def nft_family(self) -> str:
        return nft_family(self.family)

    def chain(self, name: str) -> Chain | None:
        return next((c for c in self.chains if c.name == name), None)

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


def _words(family: IPFamily) -> _Words:
    return _Words("ip", "ipv4_addr") if family is IPFamily.V4 else _Words("ip6", "ipv6_addr")


@functools.lru_cache(maxsize=8)
def declarations(family: IPFamily) -> tuple[SetDecl, ...]:
    """The sets and maps of the table (the same for every cluster)."""
    w = _words(family)
    service_key = f"type {w.addr} . inet_proto . inet_service : verdict"
    decls = [
        SetDecl(SERVICE_IPS, True, (service_key,)),
        SetDecl(NO_ENDPOINT_SERVICES, True, (service_key,)),
        SetDecl(HAIRPIN, False, (f"type {w.addr} . {w.addr}",)),
    ]
    for proto in PROTOCOLS:
        p = proto.lower()
        endpoint = f"{w.ip} daddr . {p} dport"
        decls += [
            SetDecl(backends_map(proto), True, (f"typeof {endpoint} . numgen random mod {NUMGEN_BOUND} : {endpoint}",)),
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
        ]
    return tuple(decls)


def _masquerade_rules(family: IPFamily, node: NodeContext) -> tuple[str, ...]:
    """The masquerade decision for service traffic, the same for every ClusterIP service.

    kube-proxy: masquerade_all marks everything; otherwise, with a cluster CIDR, traffic from
    outside it (clients routed to the VIP through any node, whose reply must come back through
    this node), as in the iptables compiler (its first CIDR of the family).
    """
    if node.masquerade_all:
        return (f"jump {MARK_MASQ}",)
    cidrs = node.cluster_cidrs_of(family)
    if not cidrs:
        return ()
    return (f"{_words(family).ip} saddr != {cidrs[0]} jump {MARK_MASQ}",)


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
        rules.append(f"dnat {w.ip} to {w.ip} saddr . {endpoint} map @{affinity_map(proto)}")
    rules.append(f"dnat {w.ip} to {endpoint} . numgen random mod {count} map @{backends_map(proto)}")
    return Chain(name, tuple(rules))


@functools.lru_cache(maxsize=8)
def fixed_chains(family: IPFamily, node: NodeContext) -> tuple[Chain, ...]:
    """The chains every node has, whatever its services (base chains first)."""
    w = _words(family)
    mark = f"{1 << node.masquerade_bit:#010x}"
    check_endpoints = (f"ct state new jump {ENDPOINTS_CHECK}",)
    record_affinity = tuple(
        f"ct status dnat meta l4proto {proto.lower()} ct original {w.ip} daddr . ct original proto-dst "
        f"vmap @{affinity_services_map(proto)}"
        for proto in PROTOCOLS
    )
    return (
        Chain("filter-input", check_endpoints, Hook("filter", "input", PRIORITY_FILTER)),
        Chain("filter-forward", check_endpoints, Hook("filter", "forward", PRIORITY_FILTER)),
        Chain("filter-output", check_endpoints, Hook("filter", "output", PRIORITY_FILTER)),
        Chain("nat-prerouting", (f"jump {SERVICES}",), Hook("nat", "prerouting", PRIORITY_DSTNAT)),
        Chain("nat-output", (f"jump {SERVICES}",), Hook("nat", "output", PRIORITY_DSTNAT)),
        Chain(
            "nat-postrouting",
            (
                *record_affinity,
                # Hairpin: a pod that reached itself through a service must be masqueraded, or
                # it would answer itself directly with the wrong source address.
                f"ct status dnat {w.ip} saddr . {w.ip} daddr @{HAIRPIN} masquerade fully-random",
                f"jump {MASQUERADING}",
            ),
            Hook("nat", "postrouting", PRIORITY_SRCNAT),
        ),
        Chain(SERVICES, (f"{w.ip} daddr . meta l4proto . th dport vmap @{SERVICE_IPS}",)),
        Chain(ENDPOINTS_CHECK, (f"{w.ip} daddr . meta l4proto . th dport vmap @{NO_ENDPOINT_SERVICES}",)),
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


# ---------------------------------------------------------------------------------------------
# per service port
# ---------------------------------------------------------------------------------------------


def _nft_ip(ip: str) -> str:
    """The address as nft prints it: IPv6 compressed (API text may not be); IPv4 is already."""
    return str(ipaddress.ip_address(ip)) if ":" in ip else ip


@functools.lru_cache(maxsize=1 << 18)
def compile_service_port(
    svc: ServicePort, endpoints: tuple[Endpoint, ...], node: NodeContext, family: IPFamily
) -> ServiceFragment:
    """The elements and shared chains of one service port (`endpoints` already of `family`)."""
    name = svc.name
    cluster_ip = svc.cluster_ip(family)
    if cluster_ip is None:
        return ServiceFragment(name)  # no address of this family: nothing to program

    sel = categorize_endpoints(svc, endpoints, node)
    proto = svc.protocol
    vip = _nft_ip(cluster_ip)
    port = svc.port
    service_key = f"{vip} . {proto.lower()} . {port}"
    internal = sel.local if svc.internal_traffic_policy is TrafficPolicy.LOCAL else sel.cluster

    if not internal:
        # kube-proxy: no endpoints anywhere → reject; internalTrafficPolicy Local with endpoints
        # only on other nodes → drop (the traffic must not be rerouted to them).
        verdict = "drop" if sel.has_any else f"goto {REJECT_CHAIN}"
        return ServiceFragment(name, ((NO_ENDPOINT_SERVICES, service_key, verdict),))

    affinity = svc.session_affinity_seconds
    lb = lb_chain(proto, len(internal), affinity is not None)
    backends = backends_map(proto)
    prefix = f"{vip} . {port} . "
    targets = [f"{_nft_ip(ep.ip)} . {ep.port}" for ep in internal]
    elements: list[Element] = [(SERVICE_IPS, service_key, f"goto {lb}")]
    elements += [(backends, f"{prefix}{i}", target) for i, target in enumerate(targets)]
    # Hairpin pairs for every reachable endpoint, as kube-proxy marks in every endpoint chain:
    # nodeName is only a hint (a manifest may name no node, or another one for a pod that is
    # in fact routed through here), and the set is keyed, so shared endpoints cost one element.
    reachable = {_nft_ip(ep.ip) for ep in sel.all_reachable}
    elements += [(HAIRPIN, f"{ip} . {ip}", None) for ip in sorted(reachable)]
    chains = {lb}
    target = None
    if affinity is not None:
        record = affinity_record_chain(proto, affinity)
        chains.add(record)
        elements.append((affinity_services_map(proto), f"{vip} . {port}", f"jump {record}"))
        target = AffinityTarget(affinity_map(proto), f" . {vip} . {port}", frozenset(targets))
    return ServiceFragment(name, tuple(elements), frozenset(chains), target)


# Identity memo in front of `compile_service_port` (see `compile_ruleset`).
_SAME_INPUTS: dict[
    tuple[int, int, int, bool], tuple[ServicePort, tuple[Endpoint, ...], NodeContext, ServiceFragment]
] = {}
_SAME_INPUTS_MAX = 1 << 18


def compile_ruleset(state: ClusterState, node: NodeContext, family: IPFamily = IPFamily.V4) -> Ruleset:
    """The desired table of one family, deterministic for any input order."""
    fragments: dict[ServicePortName, ServiceFragment] = {}
    needed: set[str] = set()
    v6 = family is IPFamily.V6
    memo = _SAME_INPUTS
    if len(memo) > _SAME_INPUTS_MAX:
        memo.clear()
    # Sorted by plain fields: Protocol is a StrEnum, so it compares as text without the (slow,
    # in 3.11) enum `.value` lookup that `model.sort_key` makes.
    for name in sorted(state.services, key=lambda n: (n.namespace, n.name, n.port, n.protocol)):
        svc = state.services[name]
        raw = state.endpoints_of(name)
        # The same objects as last sync (an agent keeps unchanged ones): skip filtering and the
        # lru_cache's hashing of every endpoint. The entry holds the objects, so ids stay valid.
        key = (id(svc), id(raw), id(node), v6)
        hit = memo.get(key)
        if hit is not None and hit[0] is svc and hit[1] is raw and hit[2] is node:
            fragment = hit[3]
        else:
            endpoints = tuple(ep for ep in raw if (":" in ep.ip) is v6)
            fragment = compile_service_port(svc, endpoints, node, family)
            memo[key] = (svc, raw, node, fragment)
        fragments[name] = fragment
        needed.update(fragment.chains)
    generated = tuple(generated_chain(chain, family, node) for chain in sorted(needed, key=_chain_order))
    return Ruleset(family, declarations(family), fixed_chains(family, node) + generated, fragments)


def compile_all(
    state: ClusterState, node: NodeContext, families: Iterable[IPFamily] = (IPFamily.V4, IPFamily.V6)
) -> tuple[Ruleset, ...]:
    """One ruleset per family (both by default: kube-proxy programs both in dual-stack)."""
    return tuple(compile_ruleset(state, node, family) for family in families)


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
    for chain in ruleset.chains:
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
