"""Pure compiler: ClusterState → iptables rules in kube-proxy's iptables-mode layout.

The output reproduces what kube-proxy's `pkg/proxy/iptables/proxier.go` writes, chain names
included, so that `iptables-save` on a kproxy-nft node reads like one running kube-proxy:

    nat  PREROUTING/OUTPUT → KUBE-SERVICES  -d <clusterIP> --dport <port> → KUBE-SVC-<hash>
         KUBE-SVC-<hash>    masquerade off-cluster sources, then pick one endpoint at random:
                            rule i of N matches with probability 1/(N−i); the last is unconditional
         KUBE-SEP-<hash>    hairpin mark (`-s <endpoint>`), then DNAT to <endpoint ip:port>
         POSTROUTING → KUBE-POSTROUTING  MASQUERADE what KUBE-MARK-MASQ marked (0x4000)
    filter KUBE-SERVICES    REJECT for service ports with no usable endpoint

Chain names hash like kube-proxy's: `KUBE-SVC-` + base32(sha256(servicePortName + protocol))[:16].

The result is a `Ruleset`: tables of chains of rule texts (each rule is the argument text after
`-A <chain> `), plus the jumps from built-in chains that hook our chains in. `render_restore`
turns it into `iptables-restore` input. Everything here is a pure function of its arguments.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from kproxy_nft.model import (
    ClusterState,
    Endpoint,
    IPFamily,
    NodeContext,
    ServicePort,
    ServicePortName,
    TrafficPolicy,
    sort_key,
)
from kproxy_nft.selection import categorize_endpoints

# Chains shared by all services (kube-proxy's names; several are filled in by later features).
KUBE_SERVICES = "KUBE-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_FORWARD = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"

# Prefixes of the per-service chains. SVC: cluster policy; SVL: local policy; EXT: external
# traffic entry (NodePort, external and LB IPs); FW: load-balancer source ranges; SEP: endpoint.
SVC_PREFIX = "KUBE-SVC-"
SVL_PREFIX = "KUBE-SVL-"
EXT_PREFIX = "KUBE-EXT-"
FW_PREFIX = "KUBE-FW-"
SEP_PREFIX = "KUBE-SEP-"
SERVICE_CHAIN_PREFIXES = (SVC_PREFIX, SVL_PREFIX, EXT_PREFIX, FW_PREFIX, SEP_PREFIX)

_SAFE_ARGUMENT = re.compile(r"[A-Za-z0-9_./:,=-]+")

NAT_CHAINS = (KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ)
FILTER_CHAINS = (KUBE_NODEPORTS, KUBE_SERVICES, KUBE_EXTERNAL_SERVICES, KUBE_FORWARD, KUBE_PROXY_FIREWALL)


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chain:
    """One chain we own and its rules, each the text after `-A <name> `."""

    name: str
    rules: tuple[str, ...]
    owner: ServicePortName | None = None  # the service port whose chain this is, if any


@dataclass(frozen=True)
class Table:
    name: str
    chains: tuple[Chain, ...]

    def chain(self, name: str) -> Chain | None:
        return next((c for c in self.chains if c.name == name), None)


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


def _hash16(text: str) -> str:
    """kube-proxy's chain-name hash: base32(sha256(text))[:16].

    16 base32 characters carry the digest's first 80 bits, encoded here 10 bits at a time
    from two 40-bit halves (small ints, so no bignum work). Not cached: whole service ports
    are (`compile_service_port`), so an unchanged service never gets here again.
    """
    digest = hashlib.sha256(text.encode()).digest()
    a = int.from_bytes(digest[:5], "big")
    b = int.from_bytes(digest[5:10], "big")
    p = _B32_PAIRS
    return "".join(
        (p[a >> 30], p[(a >> 20) & 1023], p[(a >> 10) & 1023], p[a & 1023],
         p[b >> 30], p[(b >> 20) & 1023], p[(b >> 10) & 1023], p[b & 1023])
    )


def service_chain_name(prefix: str, name: ServicePortName) -> str:
    """KUBE-SVC-/SVL-/EXT-/FW- chain of a service port (kube-proxy's `portProtoHash`)."""
    return prefix + _hash16(str(name) + name.protocol.lowercase)


def endpoint_chain_name(name: ServicePortName, endpoint: Endpoint) -> str:
    """KUBE-SEP- chain of one endpoint of a service port."""
    return SEP_PREFIX + _hash16(str(name) + name.protocol.lowercase + endpoint.address)


def quote(text: str) -> str:
    """Quote an argument for iptables-restore's tokenizer, as iptables-save would.

    Names in comments come from the API and are validated, but quoting does not rely on it:
    anything but plain safe characters is double-quoted with `"` and `\\` escaped.
    """
    if _SAFE_ARGUMENT.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


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


@dataclass(frozen=True)
class ServiceRules:
    """Everything one service port contributes: its own chains and its lines in shared chains.

    Compiled per service port and memoized, so a sync in which one service changed compiles
    one service; the shared KUBE-SERVICES chains are assembled from these fragments.
    """

    name: ServicePortName
    chains: tuple[Chain, ...]  # nat: KUBE-SVC-/SVL-/SEP- (EXT-/FW- with the Service-types issue)
    nat_services: tuple[str, ...]  # rules in nat KUBE-SERVICES
    filter_services: tuple[str, ...]  # rules in filter KUBE-SERVICES


class _Names:
    """Per-service-port strings, computed once instead of once per rule (the hot path)."""

    def __init__(self, svc: ServicePort) -> None:
        self.name = svc.name
        self.text = str(svc.name)
        self.proto = svc.protocol.lowercase
        self.comment = f"-m comment --comment {quote(self.text)}"
        self.affinity = svc.session_affinity_seconds
        # Names are validated DNS labels, so `"ns/svc:port -> ip:port"` needs no escaping;
        # if one somehow did, every such comment is quoted in full instead.
        self._safe = _SAFE_ARGUMENT.fullmatch(self.text) is not None
        self._arrow = f'-m comment --comment "{self.text} -> '

    def arrow_comment(self, address: str) -> str:
        """The `"ns/svc:port -> ip:port"` comment of a rule that picks an endpoint."""
        if self._safe:
            return self._arrow + address + '"'
        return comment(f"{self.text} -> {address}")

    def endpoint_chain(self, address: str) -> str:
        return SEP_PREFIX + _hash16(self.text + self.proto + address)


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


def _endpoint_chains(names: _Names, endpoints: tuple[Endpoint, ...], seps: dict[str, str]) -> list[Chain]:
    """One KUBE-SEP- chain per endpoint: hairpin masquerade, then DNAT."""
    # Hairpin: a pod reaching itself through the service must be masqueraded, or its reply
    # would go straight back to itself with the wrong source address.
    hairpin = f"{names.comment} -s "
    hairpin_end = f" -j {KUBE_MARK_MASQ}"
    dnat = f" -m {names.proto} -p {names.proto} -j DNAT --to-destination "
    chains = []
    for ep in endpoints:
        address = ep.address
        chain = seps[address]
        recent = f" -m recent --name {chain} --set" if names.affinity is not None else ""
        rules = (hairpin + ep.ip + hairpin_end, names.comment + recent + dnat + address)
        chains.append(Chain(chain, rules, names.name))
    return chains


@functools.lru_cache(maxsize=1 << 16)
def compile_service_port(
    svc: ServicePort, endpoints: tuple[Endpoint, ...], node: NodeContext, family: IPFamily
) -> ServiceRules:
    """The rules of one service port for one family (endpoints of the other family are ignored)."""
    name = svc.name
    cluster_ip = svc.cluster_ip(family)
    if cluster_ip is None:
        return ServiceRules(name, (), (), ())  # no address of this family: nothing to program

    endpoints = tuple(ep for ep in endpoints if ep.family is family)
    sel = categorize_endpoints(svc, endpoints, node)
    names = _Names(svc)
    local_internal = svc.internal_traffic_policy is TrafficPolicy.LOCAL
    internal_endpoints = sel.local if local_internal else sel.cluster
    svc_chain = service_chain_name(SVC_PREFIX, name)
    svl_chain = service_chain_name(SVL_PREFIX, name)
    internal_chain = svl_chain if local_internal else svc_chain
    internal_rules: list[str] = []
    nat_services: list[str] = []
    filter_services: list[str] = []

    dest = _dest(svc, cluster_ip)
    cluster_comment = comment(f"{names.text} cluster IP")
    if internal_endpoints:
        detector = node.cluster_cidrs_of(family)
        if node.masquerade_all:
            internal_rules.append(f"{cluster_comment} {dest} -j {KUBE_MARK_MASQ}")
        elif detector:
            # Off-cluster clients may reach the VIP through a static route to any node; the
            # endpoint may sit on another node, so the reply must come back through this one.
            internal_rules.append(f"{cluster_comment} {dest} ! -s {detector[0]} -j {KUBE_MARK_MASQ}")
        nat_services.append(f"{cluster_comment} {dest} -j {internal_chain}")
    elif not sel.has_any:
        filter_services.append(f"{comment(f'{names.text} has no endpoints')} {dest} -j REJECT")
    else:
        # internalTrafficPolicy Local with endpoints only on other nodes: drop, don't reroute.
        filter_services.append(f"{comment(f'{names.text} has no local endpoints')} {dest} -j DROP")

    # Places for the externally reachable rows (NodePort → KUBE-NODEPORTS, external and LB IPs
    # → KUBE-EXT-, source ranges → KUBE-FW-) come here in the Service-types issue.

    # The SVC/SVL chains exist only when they have endpoints to jump to (as in kube-proxy).
    seps = {ep.address: names.endpoint_chain(ep.address) for ep in sel.all_reachable}
    chains = []
    if sel.cluster:
        rules = internal_rules if not local_internal else []
        jumps = _endpoint_jumps(names, [ep.address for ep in sel.cluster], seps)
        chains.append(Chain(svc_chain, (*rules, *jumps), name))
    if sel.local:
        rules = internal_rules if local_internal else []
        jumps = _endpoint_jumps(names, [ep.address for ep in sel.local], seps)
        chains.append(Chain(svl_chain, (*rules, *jumps), name))
    chains.extend(_endpoint_chains(names, sel.all_reachable, seps))
    return ServiceRules(name, tuple(chains), tuple(nat_services), tuple(filter_services))


def compile_ruleset(state: ClusterState, node: NodeContext, family: IPFamily = IPFamily.V4) -> Ruleset:
    """All rules for one IP family (iptables or ip6tables), deterministic for any input order."""
    t = _Tables()
    _static_rules(t, node)
    services, endpoints = state.services, state.endpoints
    fragments = [
        compile_service_port(services[name], endpoints.get(name, ()), node, family)
        for name in sorted(services, key=sort_key)
    ]
    for fragment in fragments:
        t.extend("nat", KUBE_SERVICES, fragment.nat_services)
        t.extend("filter", KUBE_SERVICES, fragment.filter_services)
    # Must stay the last rule of KUBE-SERVICES: node ports are matched only after every VIP.
    t.add(
        "nat",
        KUBE_SERVICES,
        f"{comment('kubernetes service nodeports; NOTE: this must be the last rule in this chain')} "
        f"-m addrtype --dst-type LOCAL -j {KUBE_NODEPORTS}",
    )
    service_chains = tuple(chain for fragment in fragments for chain in fragment.chains)
    return Ruleset(family, t.freeze(extra_nat=service_chains), builtin_jumps())


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------


def render_table(table: Table, jumps: Iterable[BuiltinJump] = ()) -> list[str]:
    """Lines of one `*table … COMMIT` block: all chain declarations first, then the rules.

    Declarations come first because a rule may only jump to a chain that already exists.
    """
    lines = [f"*{table.name}"]
    lines += [f":{c.name} - [0:0]" for c in table.chains]
    # kube-proxy prepends its jumps, so they run before rules other software appended to the
    # built-in chains; `-I CHAIN n` keeps that order when loaded with --noflush, too.
    position: dict[str, int] = {}
    for j in jumps:
        if j.table == table.name:
            position[j.chain] = position.get(j.chain, 0) + 1
            lines.append(f"-I {j.chain} {position[j.chain]} {j.rule}")
    lines += [f"-A {c.name} {rule}" for c in table.chains for rule in c.rules]
    lines.append("COMMIT")
    return lines


def render_restore(ruleset: Ruleset, with_jumps: bool = True) -> str:
    """The ruleset as `iptables-restore` input, loadable as is into an empty namespace."""
    lines: list[str] = []
    for table in ruleset.tables:
        lines += render_table(table, ruleset.jumps if with_jumps else ())
    return "\n".join(lines) + "\n"
