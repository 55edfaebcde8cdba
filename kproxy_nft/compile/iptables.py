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

import base64
import hashlib
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
)
from kproxy_nft.selection import EndpointSelection, categorize_endpoints

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
SVC_PREFIX, SVL_PREFIX, EXT_PREFIX, FW_PREFIX, SEP_PREFIX = "KUBE-SVC-", "KUBE-SVL-", "KUBE-EXT-", "KUBE-FW-", "KUBE-SEP-"
SERVICE_CHAIN_PREFIXES = (SVC_PREFIX, SVL_PREFIX, EXT_PREFIX, FW_PREFIX, SEP_PREFIX)

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


def _hash16(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def service_chain_name(prefix: str, name: ServicePortName) -> str:
    """KUBE-SVC-/SVL-/EXT-/FW- chain of a service port (kube-proxy's `portProtoHash`)."""
    return prefix + _hash16(str(name) + name.protocol.lower)


def endpoint_chain_name(name: ServicePortName, endpoint: Endpoint) -> str:
    """KUBE-SEP- chain of one endpoint of a service port."""
    return SEP_PREFIX + _hash16(str(name) + name.protocol.lower + endpoint.address)


def quote(text: str) -> str:
    """Quote an argument for iptables-restore's tokenizer, as iptables-save would.

    Names in comments come from the API and are validated, but quoting does not rely on it:
    anything but plain safe characters is double-quoted with `"` and `\\` escaped.
    """
    if text and all(c.isalnum() or c in "-_./:,=" for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def comment(text: str) -> str:
    return f"-m comment --comment {quote(text)}"


def probability(n: int) -> str:
    """kube-proxy's statistic probability for the first of n remaining endpoints."""
    return f"{1.0 / n:0.10f}"


def _dest(svc: ServicePort, ip: str) -> str:
    proto = svc.protocol.lower
    return f"-m {proto} -p {proto} -d {ip} --dport {svc.port}"


# ---------------------------------------------------------------------------------------------
# the compiler
# ---------------------------------------------------------------------------------------------


class _Tables:
    """Accumulates chains in first-declared order; rules append to their chain."""

    def __init__(self) -> None:
        self._chains: dict[str, dict[str, list[str]]] = {"filter": {}, "nat": {}}
        self._owners: dict[tuple[str, str], ServicePortName] = {}

    def declare(self, table: str, chain: str, owner: ServicePortName | None = None) -> str:
        self._chains[table].setdefault(chain, [])
        if owner is not None:
            self._owners[(table, chain)] = owner
        return chain

    def add(self, table: str, chain: str, rule: str) -> None:
        self._chains[table][chain].append(rule)

    def freeze(self) -> tuple[Table, ...]:
        return tuple(
            Table(
                name,
                tuple(Chain(c, tuple(rules), self._owners.get((name, c))) for c, rules in chains.items()),
            )
            for name, chains in self._chains.items()
        )


def _static_rules(t: _Tables, node: NodeContext) -> None:
    """The chains every kube-proxy node has, whatever its services."""
    mark = node.masquerade_mark
    for chain in FILTER_CHAINS:
        t.declare("filter", chain)
    for chain in NAT_CHAINS:
        t.declare("nat", chain)

    t.add("filter", KUBE_FORWARD, "-m conntrack --ctstate INVALID -j DROP")
    t.add("filter", KUBE_FORWARD, f"{comment('kubernetes forwarding rules')} -m mark --mark {mark}/{mark} -j ACCEPT")
    t.add(
        "filter",
        KUBE_FORWARD,
        f"{comment('kubernetes forwarding conntrack rule')} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    )
    # Only packets marked by KUBE-MARK-MASQ are masqueraded; the mark is cleared first so that
    # a packet re-traversing the stack (e.g. through a tunnel device) is not masqueraded twice.
    t.add("nat", KUBE_POSTROUTING, f"-m mark ! --mark {mark}/{mark} -j RETURN")
    t.add("nat", KUBE_POSTROUTING, f"-j MARK --xor-mark {mark}")
    t.add(
        "nat",
        KUBE_POSTROUTING,
        f"{comment('kubernetes service traffic requiring SNAT')} -j MASQUERADE --random-fully",
    )
    t.add("nat", KUBE_MARK_MASQ, f"-j MARK --or-mark {mark}")


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


def _endpoint_jumps(
    t: _Tables, chain: str, svc: ServicePort, endpoints: tuple[Endpoint, ...]
) -> None:
    """Rules of a KUBE-SVC-/SVL- chain: affinity checks first, then the random choice."""
    name = svc.name
    if svc.session_affinity_seconds is not None:
        # ClientIP affinity: a client seen by an endpoint's `recent` list within the timeout
        # goes back to that endpoint; the DNAT rule of the SEP chain records the client.
        for ep in endpoints:
            sep = endpoint_chain_name(name, ep)
            t.add(
                "nat",
                chain,
                f"{comment(f'{name} -> {ep.address}')} -m recent --name {sep} --rcheck "
                f"--seconds {svc.session_affinity_seconds} --reap -j {sep}",
            )
    n = len(endpoints)
    for i, ep in enumerate(endpoints):
        # Rule i matches with probability 1/(n-i) of what reaches it, so each endpoint gets 1/n.
        statistic = f" -m statistic --mode random --probability {probability(n - i)}" if i < n - 1 else ""
        t.add("nat", chain, f"{comment(f'{name} -> {ep.address}')}{statistic} -j {endpoint_chain_name(name, ep)}")


def _endpoint_chain(t: _Tables, svc: ServicePort, ep: Endpoint) -> None:
    name = svc.name
    chain = t.declare("nat", endpoint_chain_name(name, ep), name)
    # Hairpin: a pod reaching itself through the service must be masqueraded, or its reply
    # would go straight back to itself with the wrong source address.
    t.add("nat", chain, f"{comment(str(name))} -s {ep.ip} -j {KUBE_MARK_MASQ}")
    recent = f" -m recent --name {chain} --set" if svc.session_affinity_seconds is not None else ""
    proto = svc.protocol.lower
    t.add("nat", chain, f"{comment(str(name))}{recent} -m {proto} -p {proto} -j DNAT --to-destination {ep.address}")


def _service_port(t: _Tables, svc: ServicePort, sel: EndpointSelection, node: NodeContext, family: IPFamily) -> None:
    name = svc.name
    cluster_ip = svc.cluster_ip(family)
    if cluster_ip is None:
        return  # the service has no address of this family: nothing to program here

    local_internal = svc.internal_traffic_policy is TrafficPolicy.LOCAL
    internal_endpoints = sel.local if local_internal else sel.cluster
    # The chains exist only when they have endpoints to jump to (as in kube-proxy).
    svc_chain = service_chain_name(SVC_PREFIX, name)
    svl_chain = service_chain_name(SVL_PREFIX, name)
    if sel.cluster:
        t.declare("nat", svc_chain, name)
    if sel.local:
        t.declare("nat", svl_chain, name)
    internal_chain = svl_chain if local_internal else svc_chain

    dest = _dest(svc, cluster_ip)
    cluster_comment = comment(f"{name} cluster IP")
    if internal_endpoints:
        detector = node.cluster_cidrs_of(family)
        if node.masquerade_all:
            t.add("nat", internal_chain, f"{cluster_comment} {dest} -j {KUBE_MARK_MASQ}")
        elif detector:
            # Off-cluster clients may reach the VIP through a static route to any node; the
            # endpoint may sit on another node, so the reply must come back through this one.
            t.add("nat", internal_chain, f"{cluster_comment} {dest} ! -s {detector[0]} -j {KUBE_MARK_MASQ}")
        t.add("nat", KUBE_SERVICES, f"{cluster_comment} {dest} -j {internal_chain}")
    elif not sel.has_any:
        t.add("filter", KUBE_SERVICES, f"{comment(f'{name} has no endpoints')} {dest} -j REJECT")
    else:
        # internalTrafficPolicy Local with endpoints only on other nodes: drop, don't reroute.
        t.add("filter", KUBE_SERVICES, f"{comment(f'{name} has no local endpoints')} {dest} -j DROP")

    # Places for the externally reachable rows (NodePort → KUBE-NODEPORTS, external and LB IPs
    # → KUBE-EXT-, source ranges → KUBE-FW-) come here in the Service-types issue.

    if sel.cluster:
        _endpoint_jumps(t, svc_chain, svc, sel.cluster)
    if sel.local:
        _endpoint_jumps(t, svl_chain, svc, sel.local)
    for ep in sel.all_reachable:
        _endpoint_chain(t, svc, ep)


def compile_ruleset(state: ClusterState, node: NodeContext, family: IPFamily = IPFamily.V4) -> Ruleset:
    """All rules for one IP family (iptables or ip6tables), deterministic for any input order."""
    t = _Tables()
    _static_rules(t, node)
    for name in sorted(state.services):
        svc = state.services[name]
        endpoints = tuple(ep for ep in state.endpoints_of(name) if ep.family is family)
        _service_port(t, svc, categorize_endpoints(svc, endpoints, node), node, family)
    # Must stay the last rule of KUBE-SERVICES: node ports are matched only after every VIP.
    t.add(
        "nat",
        KUBE_SERVICES,
        f"{comment('kubernetes service nodeports; NOTE: this must be the last rule in this chain')} "
        f"-m addrtype --dst-type LOCAL -j {KUBE_NODEPORTS}",
    )
    return Ruleset(family, t.freeze(), builtin_jumps())


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------


def render_table(table: Table, jumps: Iterable[BuiltinJump] = ()) -> list[str]:
    """Lines of one `*table … COMMIT` block: all chain declarations first, then the rules.

    Declarations come first because a rule may only jump to a chain that already exists.
    """
    lines = [f"*{table.name}"]
    lines += [f":{c.name} - [0:0]" for c in table.chains]
    lines += [f"-A {j.chain} {j.rule}" for j in jumps if j.table == table.name]
    lines += [f"-A {c.name} {rule}" for c in table.chains for rule in c.rules]
    lines.append("COMMIT")
    return lines


def render_restore(ruleset: Ruleset, with_jumps: bool = True) -> str:
    """The ruleset as `iptables-restore` input, loadable as is into an empty namespace."""
    lines: list[str] = []
    for table in ruleset.tables:
        lines += render_table(table, ruleset.jumps if with_jumps else ())
    return "\n".join(lines) + "\n"
