"""Pure compiler: ClusterState → iptables rules in kube-proxy's iptables-mode layout.

The output reproduces what kube-proxy's `pkg/proxy/iptables/proxier.go` writes, chain names
included, so that `iptables-save` on a kproxy-nft node reads like one running kube-proxy:

    nat  PREROUTING/OUTPUT → KUBE-SERVICES  -d <clusterIP> --dport <port> → KUBE-SVC-<hash>
         KUBE-SVC-<hash>    masquerade off-cluster sources, then pick one endpoint at random:
                            rule i of N matches with probability 1/(N−i); the last is unconditional
         KUBE-SEP-<hash>    hairpin mark (`-s <endpoint>`), then DNAT to <endpoint ip:port>
         KUBE-SERVICES      -d <external IP> → KUBE-EXT-<hash>; -d <LB IP> → KUBE-FW-<hash> (with
                            loadBalancerSourceRanges) or KUBE-EXT-; last rule: node-port
                            addresses → KUBE-NODEPORTS  --dport <nodePort> → KUBE-EXT-<hash>
         KUBE-EXT-<hash>    Cluster policy: masquerade, → KUBE-SVC-; Local policy: pods and the
                            node short-circuit to KUBE-SVC- (the node masqueraded), the rest → KUBE-SVL-
         KUBE-SVL-<hash>    this node's endpoints only (Local traffic policies)
         POSTROUTING → KUBE-POSTROUTING  MASQUERADE what KUBE-MARK-MASQ marked (0x4000)
    filter KUBE-SERVICES / KUBE-EXTERNAL-SERVICES  REJECT when a service has no usable endpoint,
                            DROP when a Local policy finds none on this node
           KUBE-PROXY-FIREWALL  DROP what KUBE-FW- did not let through; KUBE-NODEPORTS  ACCEPT
                            health-check node ports; KUBE-FIREWALL  localhost NodePorts' anti-martian rule

Service ports are compiled one at a time into fragments (`compile_service_port`), so an
agent's partial sync recompiles only what changed (`update_fragments`, `assemble_ruleset`), and
its full syncs reuse unchanged ones (a `compile.memo.FragmentMemo` the agent keeps).

Chain names hash like kube-proxy's: `KUBE-SVC-` + base32(sha256(servicePortName + protocol))[:16].

The result is a `Ruleset`: tables of chains of rule texts (each rule is the argument text after
`-A <chain> `), plus the jumps from built-in chains that hook our chains in. `render_restore`
turns it into `iptables-restore` input. Every name, address and CIDR in that text has passed
`compile.render` (at `compile_service_port` and `assemble_ruleset`), which refuses anything
outside its grammar. Everything here is a pure function of its arguments.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from kproxy_nft.compile import render
from kproxy_nft.compile.memo import FragmentMemo, compile_with, recompile_changed
from kproxy_nft.compile.render import quote
from kproxy_nft.model import (
    ClusterState,
    Endpoint,
    IPFamily,
    LocalDetector,
    NodeContext,
    ServicePort,
    ServicePortName,
    TrafficPolicy,
    sort_key,
)
from kproxy_nft.selection import EndpointSelection, categorize_endpoints, endpoints_of_family

# Chains shared by all services (kube-proxy's names; several are filled in by later features).
KUBE_SERVICES = "KUBE-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
# kubelet's name (before 1.27 kubelet wrote it): the anti-martian rule for localhost NodePorts.
# Written when those are on, but not owned: never deleted, since a kubelet may have it too, and
# left behind it only drops what the kernel drops anyway once route_localnet is off again.
KUBE_FIREWALL = "KUBE-FIREWALL"

# Prefixes of the per-service chains. SVC: cluster policy; SVL: local policy; EXT: external
# traffic entry (NodePort, external and LB IPs); FW: load-balancer source ranges; SEP: endpoint.
SVC_PREFIX = "KUBE-SVC-"
SVL_PREFIX = "KUBE-SVL-"
EXT_PREFIX = "KUBE-EXT-"
FW_PREFIX = "KUBE-FW-"
SEP_PREFIX = "KUBE-SEP-"
PORT_CHAIN_PREFIXES = (SVC_PREFIX, SVL_PREFIX, EXT_PREFIX, FW_PREFIX)  # named by the service port's hash
SERVICE_CHAIN_PREFIXES = (*PORT_CHAIN_PREFIXES, SEP_PREFIX)

NAT_CHAINS = (KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ)
FILTER_CHAINS = (KUBE_NODEPORTS, KUBE_SERVICES, KUBE_EXTERNAL_SERVICES, KUBE_FORWARD, KUBE_PROXY_FIREWALL)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


class Chain(NamedTuple):
    """One chain we own and its rules, each the text after `-A <name> `.

    A NamedTuple, not a frozen dataclass: a cold compile at 10k makes 110,000 of them, each at half
    the cost (a frozen dataclass sets every field through `object.__setattr__`), for 8 bytes more
    each (64, not 56) while a compile's result lives; the agent keeps none (`iptables_record`).
    """

    name: str
    rules: tuple[str, ...]
    owner: ServicePortName | None = None  # the service port whose chain this is, if any


@dataclass(frozen=True)
class Table:
    name: str
    chains: tuple[Chain, ...]

    def chain(self, name: str) -> Chain | None:
        return next((c for c in self.chains if c.name == name), None)


# (table, shared chain, rule text): one service port's line in a chain all services share.
SharedRule = tuple[str, str, str]


@dataclass(frozen=True)
class BuiltinJump:
    """A rule in a built-in chain (PREROUTING, INPUT, …) that sends traffic into our chains."""

    table: str
    chain: str
    rule: str


@dataclass(frozen=True)
class Ruleset:
    family: IPFamily
    tables: tuple[Table, ...]
    jumps: tuple[BuiltinJump, ...]

    def table(self, name: str) -> Table:
        return next(t for t in self.tables if t.name == name)


# ---------------------------------------------------------------------------------------------
# names and argument text
# ---------------------------------------------------------------------------------------------


_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
# Base32 two characters (10 bits) at a time: the stdlib's b32encode is pure Python in 3.11 and
# was 40% of a 10,000-service compile.
_B32_PAIRS = tuple(a + b for a in _B32 for b in _B32)
# The digest's first 80 bits as a 64-bit and a 16-bit int: one C call, 15% faster per hash
# than two 40-bit `int.from_bytes` of slices.
_FIRST_80_BITS = struct.Struct(">QH")


def _hash16(text: str) -> str:
    """kube-proxy's chain-name hash: base32(sha256(text))[:16].

    16 base32 characters carry the digest's first 80 bits, encoded here 10 bits at a time:
    the top 60 bits of the 64-bit word, then its last 4 bits with the 16 that follow. Not
    cached: whole service ports are (`compile_service_port`), so an unchanged service never
    gets here again.
    """
    high, low = _FIRST_80_BITS.unpack_from(hashlib.sha256(text.encode()).digest())
    rest = (high & 15) << 16 | low
    p = _B32_PAIRS
    return "".join(
        (p[high >> 54], p[(high >> 44) & 1023], p[(high >> 34) & 1023], p[(high >> 24) & 1023],
         p[(high >> 14) & 1023], p[(high >> 4) & 1023], p[rest >> 10], p[rest & 1023])
    )


def service_chain_name(prefix: str, name: ServicePortName) -> str:
    """KUBE-SVC-/SVL-/EXT-/FW- chain of a service port (kube-proxy's `portProtoHash`)."""
    return prefix + _hash16(str(name) + name.protocol.lowercase)


def endpoint_chain_name(name: ServicePortName, endpoint: Endpoint) -> str:
    """KUBE-SEP- chain of one endpoint of a service port."""
    return SEP_PREFIX + _hash16(str(name) + name.protocol.lowercase + endpoint.address)


def comment(text: str) -> str:
    return f"-m comment --comment {quote(text)}"


def probability(n: int) -> str:
    """kube-proxy's statistic probability for the first of n remaining endpoints."""
    return f"{1.0 / n:0.10f}"


def _dest(svc: ServicePort, ip: str) -> str:
    proto = svc.protocol.lowercase
    return f"-m {proto} -p {proto} -d {ip} --dport {svc.port}"


# ---------------------------------------------------------------------------------------------
# the compiler
# ---------------------------------------------------------------------------------------------


class _Tables:
    """Accumulates the shared chains in first-declared order; rules append to their chain."""

    def __init__(self) -> None:
        self._chains: dict[str, dict[str, list[str]]] = {"filter": {}, "nat": {}}

    def declare(self, table: str, chain: str) -> None:
        self._chains[table].setdefault(chain, [])

    def add(self, table: str, chain: str, rule: str) -> None:
        self._chains[table][chain].append(rule)

    def extend(self, table: str, chain: str, rules: Iterable[str]) -> None:
        self._chains[table][chain].extend(rules)

    def freeze(self, extra_nat: tuple[Chain, ...]) -> tuple[Table, ...]:
        """The tables, with the per-service chains after the shared ones in nat."""
        shared = {
            name: tuple(Chain(c, tuple(rules)) for c, rules in chains.items())
            for name, chains in self._chains.items()
        }
        return (Table("filter", shared["filter"]), Table("nat", shared["nat"] + extra_nat))


def _static_rules(t: _Tables, node: NodeContext) -> None:
    """The chains every kube-proxy node has, whatever its services, as a table of rules."""
    mark = node.masquerade_mark
    for chain in FILTER_CHAINS:
        t.declare("filter", chain)
    for chain in NAT_CHAINS:
        t.declare("nat", chain)
    rules = (
        ("filter", KUBE_FORWARD, "-m conntrack --ctstate INVALID -j DROP"),
        ("filter", KUBE_FORWARD, f"{comment('kubernetes forwarding rules')} -m mark --mark {mark}/{mark} -j ACCEPT"),
        ("filter", KUBE_FORWARD,
         f"{comment('kubernetes forwarding conntrack rule')} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"),
        # Only packets marked by KUBE-MARK-MASQ are masqueraded; the mark is cleared first so
        # a packet re-traversing the stack (e.g. through a tunnel device) is not masqueraded twice.
        ("nat", KUBE_POSTROUTING, f"-m mark ! --mark {mark}/{mark} -j RETURN"),
        ("nat", KUBE_POSTROUTING, f"-j MARK --xor-mark {mark}"),
        ("nat", KUBE_POSTROUTING,
         f"{comment('kubernetes service traffic requiring SNAT')} -j MASQUERADE --random-fully"),
        ("nat", KUBE_MARK_MASQ, f"-j MARK --or-mark {mark}"),
    )
    for table, chain, rule in rules:
        t.add(table, chain, rule)


def builtin_jumps() -> tuple[BuiltinJump, ...]:
    """kube-proxy's `iptablesJumpChains`: where the built-in chains hand over to ours."""
    new = "-m conntrack --ctstate NEW "
    portals = comment("kubernetes service portals")
    external = comment("kubernetes externally-visible service portals")
    firewall = comment("kubernetes load balancer firewall")
    return (
        BuiltinJump("filter", "INPUT", f"{new}{firewall} -j {KUBE_PROXY_FIREWALL}"),
        BuiltinJump("filter", "INPUT", f"{comment('kubernetes health check service ports')} -j {KUBE_NODEPORTS}"),
        BuiltinJump("filter", "INPUT", f"{new}{external} -j {KUBE_EXTERNAL_SERVICES}"),
        BuiltinJump("filter", "FORWARD", f"{new}{firewall} -j {KUBE_PROXY_FIREWALL}"),
        BuiltinJump("filter", "FORWARD", f"{comment('kubernetes forwarding rules')} -j {KUBE_FORWARD}"),
        BuiltinJump("filter", "FORWARD", f"{new}{portals} -j {KUBE_SERVICES}"),
        BuiltinJump("filter", "FORWARD", f"{new}{external} -j {KUBE_EXTERNAL_SERVICES}"),
        BuiltinJump("filter", "OUTPUT", f"{new}{firewall} -j {KUBE_PROXY_FIREWALL}"),
        BuiltinJump("filter", "OUTPUT", f"{new}{portals} -j {KUBE_SERVICES}"),
        BuiltinJump("nat", "PREROUTING", f"{portals} -j {KUBE_SERVICES}"),
        BuiltinJump("nat", "OUTPUT", f"{portals} -j {KUBE_SERVICES}"),
        BuiltinJump("nat", "POSTROUTING", f"{comment('kubernetes postrouting rules')} -j {KUBE_POSTROUTING}"),
    )


@dataclass(frozen=True, slots=True)
class ServiceRules:
    """Everything one service port contributes: its own chains and its lines in shared chains.

    Compiled per service port, so a sync in which one service changed compiles one service;
    the shared chains (KUBE-SERVICES, KUBE-NODEPORTS, KUBE-EXTERNAL-SERVICES,
    KUBE-PROXY-FIREWALL) are assembled from these fragments in service order.
    """

    name: ServicePortName
    chains: tuple[Chain, ...]  # nat: KUBE-EXT-/FW-/SVC-/SVL-/SEP-
    shared: tuple[SharedRule, ...] = ()  # rules in shared chains, in kube-proxy's order

    def without_chains(self) -> ServiceRules:
        """Only the lines in shared chains: what an agent keeps between syncs
        (`kernel.iptables_record`); assembled with the others, it gives the shared chains."""
        return ServiceRules(self.name, (), self.shared)


class _Names:
    """Per-service-port strings, computed once instead of once per rule (the hot path)."""

    def __init__(self, svc: ServicePort) -> None:
        self.name = svc.name
        self.text = str(svc.name)
        self.proto = svc.protocol.lowercase
        quoted = quote(self.text)
        self.comment = f"-m comment --comment {quoted}"
        self.affinity = svc.session_affinity_seconds
        # kube-proxy's portProtoHash, which the SVC-, SVL-, EXT- and FW- chains share; the
        # KUBE-SEP- hashes add the endpoint's address to the same text.
        self._hashed = self.text + self.proto
        self.port_hash = _hash16(self._hashed)
        # Names are DNS labels (render.service_port), so `"ns/svc:port -> ip:port"` needs no
        # escaping; if one somehow did, every such comment is quoted in full instead.
        self._safe = quoted == self.text
        self._arrow = f'-m comment --comment "{self.text} -> '

    def arrow_comment(self, address: str) -> str:
        """The `"ns/svc:port -> ip:port"` comment of a rule that picks an endpoint."""
        if self._safe:
            return self._arrow + address + '"'
        return comment(f"{self.text} -> {address}")

    def endpoint_chain(self, address: str) -> str:
        return SEP_PREFIX + _hash16(self._hashed + address)


@functools.lru_cache(maxsize=4096)
def _statistic(remaining: int) -> str:
    # Rule i of n matches with probability 1/(n-i) of what reaches it, so each gets 1/n.
    return f" -m statistic --mode random --probability {probability(remaining)}"


def _endpoint_jumps(names: _Names, addresses: list[str], seps: dict[str, str]) -> list[str]:
    """Rules of a KUBE-SVC-/SVL- chain: affinity checks first, then the random choice."""
    rules = []
    arrow = names.arrow_comment
    if names.affinity is not None:
        # ClientIP affinity: a client seen by an endpoint's `recent` list within the timeout
        # goes back to that endpoint; the DNAT rule of the SEP chain records the client.
        for address in addresses:
            sep = seps[address]
            check = f"-m recent --name {sep} --rcheck --seconds {names.affinity} --reap"
            rules.append(f"{arrow(address)} {check} -j {sep}")
    last = len(addresses) - 1
    for i, address in enumerate(addresses):
        statistic = _statistic(last + 1 - i) if i < last else ""
        rules.append(f"{arrow(address)}{statistic} -j {seps[address]}")
    return rules


def _endpoint_chains(
    names: _Names, endpoints: tuple[Endpoint, ...], addresses: list[str], seps: dict[str, str]
) -> list[Chain]:
    """One KUBE-SEP- chain per endpoint (`addresses`: theirs): hairpin masquerade, then DNAT."""
    # Hairpin: a pod reaching itself through the service must be masqueraded, or its reply
    # would go straight back to itself with the wrong source address.
    hairpin = f"{names.comment} -s "
    hairpin_end = f" -j {KUBE_MARK_MASQ}"
    dnat = f" -m {names.proto} -p {names.proto} -j DNAT --to-destination "
    plain_dnat = names.comment + dnat  # without affinity, all DNAT rules start alike
    chains = []
    for ep, address in zip(endpoints, addresses, strict=True):
        chain = seps[address]
        if names.affinity is None:
            dnat_rule = plain_dnat + address
        else:
            dnat_rule = f"{names.comment} -m recent --name {chain} --set{dnat}{address}"
        chains.append(Chain(chain, (hairpin + ep.ip + hairpin_end, dnat_rule), names.name))
    return chains


def local_match(detector: LocalDetector, negate: bool = False) -> str:
    """kube-proxy's `IfLocal()` / `IfNotLocal()` match arguments: a source CIDR or an input interface."""
    bang = "! " if negate else ""
    if detector.cidr is not None:
        return f"{bang}-s {detector.cidr}"
    return f"{bang}-i {detector.interface}{'+' if detector.prefix else ''}"


def _local_only_target(has_endpoints: bool, text: str) -> tuple[str, str]:
    """The filter verdict for traffic that has no endpoint to go to, and its comment.

    kube-proxy: a service without any usable endpoint REJECTs (the client learns at once); one
    whose policy is Local and whose endpoints are all on other nodes DROPs (its traffic must
    not be rerouted, and a load balancer health-checking this node already avoids it).
    """
    if not has_endpoints:
        return "REJECT", comment(f"{text} has no endpoints")
    return "DROP", comment(f"{text} has no local endpoints")


@dataclass(frozen=True)
class _Routing:
    """Which chains one service port's traffic goes through, and what happens without endpoints.

    kube-proxy's `syncProxyRules` per service: SVC (cluster policy), SVL (local policy), EXT
    (external traffic entry) and FW (source ranges) chains, and for each kind of traffic the
    chain it ends in and whether that chain has endpoints to go to.
    """

    svc: ServicePort
    sel: EndpointSelection
    names: _Names
    cluster_ip: str
    external_ips: tuple[str, ...]
    lb_ips: tuple[str, ...]
    ranges: tuple[str, ...]
    internal_local: bool
    external_local: bool
    uses_ext: bool
    uses_fw: bool

    def __post_init__(self) -> None:
        port_hash = self.names.port_hash  # `service_chain_name`, hashed once for all four
        for field_name, prefix in (("svc_chain", SVC_PREFIX), ("svl_chain", SVL_PREFIX),
                                   ("ext_chain", EXT_PREFIX), ("fw_chain", FW_PREFIX)):
            object.__setattr__(self, field_name, prefix + port_hash)
        # Traffic to the cluster IP: how its rules in KUBE-SERVICES and in SVC/SVL begin. Made
        # here, not in a cached_property, whose lock in Python 3.11 cost 3% of a cold compile.
        object.__setattr__(self, "cluster_match", f"{comment(f'{self.names.text} cluster IP')} "
                                                  f"{self.dest(self.cluster_ip)}")

    svc_chain: str = field(init=False)
    svl_chain: str = field(init=False)
    ext_chain: str = field(init=False)
    fw_chain: str = field(init=False)
    cluster_match: str = field(init=False)

    @property
    def has_internal(self) -> bool:
        return bool(self.sel.local) if self.internal_local else self.sel.has_any

    @property
    def has_external(self) -> bool:
        return bool(self.sel.local) if self.external_local else self.sel.has_any

    def dest(self, ip: str) -> str:
        proto = self.names.proto
        return f"-m {proto} -p {proto} -d {ip} --dport {self.svc.port}"


def compile_service_port(
    svc: ServicePort, endpoints: tuple[Endpoint, ...], node: NodeContext, family: IPFamily
) -> ServiceRules:
    """The rules of one service port for one family (endpoints of the other family are ignored).

    Follows kube-proxy's `syncProxyRules` per service: which of the SVC, SVL, EXT and FW chains
    exist (`_Routing`), what the shared chains send to them (`_shared_rules`), and what the
    filter table drops or rejects when a kind of traffic has no endpoint to go to.
    """
    # The rules are made of these values: refuse any outside its grammar (render.UnsafeValue),
    # whatever validation let through.
    render.service_port(svc)
    render.node(node)
    endpoints = render.endpoints(endpoints_of_family(endpoints, family))
    cluster_ip = svc.cluster_ip(family)
    if cluster_ip is None:
        return ServiceRules(svc.name, ())  # no address of this family: nothing to program
    sel = categorize_endpoints(svc, endpoints, node, family)
    # This family's view of the service (kube-proxy's per-family service info).
    lb_ips = tuple(svc.load_balancer_ips_of(family))
    ranges = tuple(svc.source_ranges_of(family))
    externally_accessible = svc.externally_accessible_in(family)
    route = _Routing(
        svc, sel, _Names(svc), cluster_ip, tuple(svc.external_ips_of(family)), lb_ips, ranges,
        internal_local=svc.internal_traffic_policy is TrafficPolicy.LOCAL,
        external_local=svc.external_traffic_policy is TrafficPolicy.LOCAL and externally_accessible,
        # The EXT chain is needed whenever there are endpoints at all: with eTP Local it also
        # short-circuits pod and node traffic, which may go to endpoints on other nodes.
        uses_ext=sel.has_any and externally_accessible,
        uses_fw=sel.has_any and bool(lb_ips) and bool(ranges),
    )
    return ServiceRules(svc.name, tuple(_own_chains(route, node, family)), tuple(_shared_rules(route)))


def _shared_rules(route: _Routing) -> list[SharedRule]:
    """The service port's lines in the shared chains, in kube-proxy's order."""
    svc, names, text, dest = route.svc, route.names, route.names.text, route.dest
    has_endpoints = route.sel.has_any
    internal_policy = route.svl_chain if route.internal_local else route.svc_chain
    verdict, verdict_comment = _local_only_target(has_endpoints, text)
    lb_target = route.fw_chain if route.uses_fw else route.ext_chain
    shared: list[SharedRule] = []

    # Cluster IP.
    if route.has_internal:
        shared.append(("nat", KUBE_SERVICES, f"{route.cluster_match} -j {internal_policy}"))
    else:
        shared.append(("filter", KUBE_SERVICES, f"{verdict_comment} {dest(route.cluster_ip)} -j {verdict}"))

    # External IPs: to EXT when there are endpoints; what EXT does not take is dropped/rejected.
    for ip in route.external_ips:
        if has_endpoints:
            shared.append(("nat", KUBE_SERVICES, f"{comment(f'{text} external IP')} {dest(ip)} -j {route.ext_chain}"))
        if not route.has_external:
            shared.append(("filter", KUBE_EXTERNAL_SERVICES, f"{verdict_comment} {dest(ip)} -j {verdict}"))

    # Load-balancer ingress IPs: through FW when source ranges restrict them.
    for ip in route.lb_ips:
        if has_endpoints:
            shared.append(("nat", KUBE_SERVICES, f"{comment(f'{text} loadbalancer IP')} {dest(ip)} -j {lb_target}"))
        if route.uses_fw:
            # What FW did not DNAT reaches the filter table still addressed to the LB IP.
            shared.append(("filter", KUBE_PROXY_FIREWALL,
                           f"{comment(f'{text} traffic not accepted by {route.fw_chain}')} {dest(ip)} -j DROP"))
    if not route.has_external:
        for ip in route.lb_ips:
            shared.append(("filter", KUBE_EXTERNAL_SERVICES, f"{verdict_comment} {dest(ip)} -j {verdict}"))

    # Node port: not subject to source ranges (kube-proxy: "for better or for worse").
    if svc.node_port:
        node_port = f"-m {names.proto} -p {names.proto} --dport {svc.node_port}"
        if has_endpoints:
            shared.append(("nat", KUBE_NODEPORTS, f"{names.comment} {node_port} -j {route.ext_chain}"))
        if not route.has_external:
            shared.append(("filter", KUBE_EXTERNAL_SERVICES,
                           f"{verdict_comment} -m addrtype --dst-type LOCAL {node_port} -j {verdict}"))

    # The health-check server answers whether or not this node has endpoints.
    if svc.health_check_node_port:
        shared.append(("filter", KUBE_NODEPORTS,
                       f"{comment(f'{text} health check node port')} -m tcp -p tcp "
                       f"--dport {svc.health_check_node_port} -j ACCEPT"))
    return shared


def _own_chains(route: _Routing, node: NodeContext, family: IPFamily) -> list[Chain]:
    """The service port's own chains: EXT, FW, SVC, SVL and one SEP per endpoint."""
    svc, sel, names, name = route.svc, route.sel, route.names, route.svc.name
    # Masquerade decision for cluster IP traffic, first rule of the internal policy chain.
    internal_rules: list[str] = []
    if route.has_internal:
        cluster_match = route.cluster_match
        detector = node.local_detector(family)
        if node.masquerade_all:
            internal_rules.append(f"{cluster_match} -j {KUBE_MARK_MASQ}")
        elif detector:
            # Off-cluster clients may reach the VIP through a static route to any node; the
            # endpoint may sit on another node, so the reply must come back through this one.
            internal_rules.append(f"{cluster_match} {local_match(detector, negate=True)} -j {KUBE_MARK_MASQ}")

    chains: list[Chain] = []
    if route.uses_ext:
        external_policy = route.svl_chain if route.external_local else route.svc_chain
        rules = _external_rules(names.text, node, family, route.external_local, route.svc_chain,
                                external_policy if route.has_external else None)
        chains.append(Chain(route.ext_chain, tuple(rules), name))
    if route.uses_fw:
        rules = _firewall_rules(names.text, svc, route.ranges, route.lb_ips, node, family, route.ext_chain)
        chains.append(Chain(route.fw_chain, tuple(rules), name))

    # Each endpoint's `ip:port` (a property that formats it) once, and its KUBE-SEP- chain.
    reachable = sel.all_reachable
    addresses = [ep.address for ep in reachable]
    seps = {address: names.endpoint_chain(address) for address in addresses}

    def addresses_of(endpoints: tuple[Endpoint, ...]) -> list[str]:
        # Unless a policy is Local, the cluster endpoints *are* the reachable ones (one tuple).
        return addresses if endpoints is reachable else [ep.address for ep in endpoints]

    # The SVC/SVL chains exist only when they have endpoints to jump to (as in kube-proxy).
    if sel.cluster:
        rules = internal_rules if not route.internal_local else []
        jumps = _endpoint_jumps(names, addresses_of(sel.cluster), seps)
        chains.append(Chain(route.svc_chain, (*rules, *jumps), name))
    if sel.local:
        rules = internal_rules if route.internal_local else []
        jumps = _endpoint_jumps(names, addresses_of(sel.local), seps)
        chains.append(Chain(route.svl_chain, (*rules, *jumps), name))
    chains.extend(_endpoint_chains(names, reachable, addresses, seps))
    return chains


def _external_rules(
    text: str, node: NodeContext, family: IPFamily, local: bool, cluster_chain: str, policy_chain: str | None
) -> list[str]:
    """The KUBE-EXT- chain: how traffic to a node port, external or LB IP enters the service.

    Cluster policy: masquerade (the endpoint may be on another node, and the reply must come
    back through this one), then the cluster endpoints. Local policy keeps the client's address
    and uses only this node's endpoints, except for traffic that cannot have come through an
    external load balancer: pods' traffic short-circuits to all endpoints, and the node's own
    traffic (whose source is a local address) is masqueraded and sent to all endpoints.
    `policy_chain` is None when the policy's endpoints are missing: the rest falls through and
    is dropped by KUBE-EXTERNAL-SERVICES.
    """
    rules = []
    if not local:
        rules.append(f"{comment(f'masquerade traffic for {text} external destinations')} -j {KUBE_MARK_MASQ}")
    else:
        detector = node.local_detector(family)
        if detector:
            rules.append(f"{comment(f'pod traffic for {text} external destinations')} {local_match(detector)} "
                         f"-j {cluster_chain}")
        rules.append(f"{comment(f'masquerade LOCAL traffic for {text} external destinations')} "
                     f"-m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}")
        rules.append(f"{comment(f'route LOCAL traffic for {text} external destinations')} "
                     f"-m addrtype --src-type LOCAL -j {cluster_chain}")
    if policy_chain is not None:
        rules.append(f"-j {policy_chain}")
    return rules


def _firewall_rules(
    text: str, svc: ServicePort, ranges: tuple[str, ...], lb_ips: tuple[str, ...], node: NodeContext,
    family: IPFamily, ext_chain: str,
) -> list[str]:
    """The KUBE-FW- chain: sources in loadBalancerSourceRanges go on to EXT, others fall off.

    Traffic that falls off the end is not DNATed and is dropped by the KUBE-PROXY-FIREWALL rule
    of the same LB IP. When the node itself is inside a range, the LB IPs are allowed as
    sources too: a node reaching a VIP-style LB IP bound locally sends with that IP as source.
    """
    lb_comment = comment(f"{text} loadbalancer IP")
    rules = [f"{lb_comment} -s {cidr} -j {ext_chain}" for cidr in ranges]
    if svc.source_ranges_admit(node.node_ips_of(family), family):
        rules += [f"{lb_comment} -s {ip} -j {ext_chain}" for ip in lb_ips]
    rules.append(comment(f"other traffic to {text} will be dropped by KUBE-PROXY-FIREWALL"))
    return rules


def _nodeports_jumps(node: NodeContext, family: IPFamily) -> list[str]:
    """The last rules of nat KUBE-SERVICES: traffic to a node-port address goes to KUBE-NODEPORTS.

    They must come after every VIP rule. With no `--nodeport-addresses` (or a /0) every local
    address qualifies, except IPv6 loopback (never) and IPv4 loopback unless localhost
    NodePorts are on; otherwise one rule per selected node address.
    """
    note = comment("kubernetes service nodeports; NOTE: this must be the last rule in this chain")
    ips = node.nodeport_ips(family)
    if ips is None:
        exclude = " ! -d ::1"  # addrtype cannot exclude IPv6 loopback, so name it
        if family is IPFamily.V4:
            exclude = "" if node.localhost_nodeports else " ! -d 127.0.0.0/8"
        return [f"{note} -m addrtype --dst-type LOCAL{exclude} -j {KUBE_NODEPORTS}"]
    return [f"{note} -d {ip} -j {KUBE_NODEPORTS}" for ip in ips]


def uses_localhost_nodeports(node: NodeContext, family: IPFamily) -> bool:
    """True when IPv4 NodePorts answer on 127.0.0.1 (then `route_localnet` must be on, too)."""
    if family is not IPFamily.V4 or not node.localhost_nodeports:
        return False
    ips = node.nodeport_ips(family)
    return ips is None or any(ip.startswith("127.") for ip in ips)


def compile_ruleset(state: ClusterState, node: NodeContext, family: IPFamily = IPFamily.V4) -> Ruleset:
    """All rules for one IP family (iptables or ip6tables), deterministic for any input order."""
    return assemble_ruleset(compile_fragments(state, node, family).values(), node, family)


Fragments = dict[ServicePortName, ServiceRules]  # in service-port order


def compile_fragments(
    state: ClusterState, node: NodeContext, family: IPFamily, memo: FragmentMemo[ServiceRules] | None = None
) -> Fragments:
    """Every service port's rules, in the order they appear in the shared chains.

    With a `memo` (an agent's, kept across syncs), unchanged service ports are not recompiled.
    """
    services, endpoints = state.services, state.endpoints
    fragments = {
        name: compile_with(memo, compile_service_port, services[name], endpoints.get(name, ()), node, family)
        for name in sorted(services, key=sort_key)
    }
    if memo is not None:
        memo.retain(fragments, family)
    return fragments


def update_fragments(
    previous: Fragments,
    state: ClusterState,
    node: NodeContext,
    family: IPFamily,
    changed: Collection[ServicePortName],
    memo: FragmentMemo[ServiceRules] | None = None,
) -> Fragments:
    """`compile_fragments(state, node, family)` in O(changed), for an agent's partial sync.

    `previous` must be the fragments of a state that differs from `state` only in the `changed`
    service ports, for the same node. Only a new service port costs a re-sort (its place in the
    shared chains); changed ones keep theirs.
    """
    fragments = previous.copy()
    if recompile_changed(fragments, state, node, family, changed, compile_service_port, memo):
        fragments = {name: fragments[name] for name in sorted(fragments, key=sort_key)}
    return fragments


def assemble_ruleset(fragments: Iterable[ServiceRules], node: NodeContext, family: IPFamily) -> Ruleset:
    """The ruleset from the service ports' fragments (in service-port order) and the node's chains."""
    fragments = list(fragments)
    render.node(node)  # its addresses and CIDRs reach the node-port and static rules
    t = _Tables()
    _static_rules(t, node)
    localhost = uses_localhost_nodeports(node, family)
    if localhost:
        # kube-proxy's mitigation of CVE-2020-8558: with route_localnet on, refuse packets to
        # 127/8 that did not come from 127/8 (martians from neighbours), unless NATed by us.
        t.declare("filter", KUBE_FIREWALL)
        t.add("filter", KUBE_FIREWALL,
              f"{comment('block incoming localnet connections')} -d 127.0.0.0/8 ! -s 127.0.0.0/8 "
              "-m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP")
    for fragment in fragments:
        for table, chain, rule in fragment.shared:
            t.add(table, chain, rule)
    for rule in _nodeports_jumps(node, family):
        t.add("nat", KUBE_SERVICES, rule)
    service_chains = tuple(chain for fragment in fragments for chain in fragment.chains)
    jumps = builtin_jumps() + (kubelet_firewall_jumps() if localhost else ())
    return Ruleset(family, t.freeze(extra_nat=service_chains), jumps)


def kubelet_firewall_jumps() -> tuple[BuiltinJump, ...]:
    """Where KUBE-FIREWALL is hooked in (kube-proxy's `iptablesKubeletJumpChains`)."""
    return (
        BuiltinJump("filter", "INPUT", f"-j {KUBE_FIREWALL}"),
        BuiltinJump("filter", "OUTPUT", f"-j {KUBE_FIREWALL}"),
    )


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------


def render_table(table: Table, jumps: Iterable[BuiltinJump] = ()) -> str:
    """One `*table … COMMIT` block, each line ended: all chain declarations first, then the rules.

    Declarations come first because a rule may only jump to a chain that already exists. Each
    chain's rules are joined with their `-A CHAIN ` prefix in one call: a 10k-Service table has
    330,000 rules, and a string per line was a third of the text's cost (issue 14).
    """
    parts = [f"*{table.name}\n"]
    parts += [f":{c.name} - [0:0]\n" for c in table.chains]
    # kube-proxy prepends its jumps, so they run before rules other software appended to the
    # built-in chains; `-I CHAIN n` keeps that order when loaded with --noflush, too.
    position: dict[str, int] = {}
    for j in jumps:
        if j.table == table.name:
            position[j.chain] = position.get(j.chain, 0) + 1
            parts.append(f"-I {j.chain} {position[j.chain]} {j.rule}\n")
    for c in table.chains:
        if c.rules:
            prefix = f"-A {c.name} "
            parts += (prefix, f"\n{prefix}".join(c.rules), "\n")
    parts.append("COMMIT\n")
    return "".join(parts)


def render_restore(ruleset: Ruleset, with_jumps: bool = True) -> str:
    """The ruleset as `iptables-restore` input, loadable as is into an empty namespace."""
    return "".join(render_table(table, ruleset.jumps if with_jumps else ()) for table in ruleset.tables)
