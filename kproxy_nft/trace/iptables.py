"""kube-proxy's iptables layout, walked: the rules of `iptables-save` (or of our compiler) as a `Program`.

The rules are read with the same parser that reconciles the kernel (`kernel.iptables_rule`), so
the text may be either spelling: the compiler's (`-m tcp -p tcp -d 10.0.0.1 --dport 80`) or
`iptables-save`'s (`-d 10.0.0.1/32 -p tcp -m tcp --dport 80`), including a node that runs
kube-proxy itself. Only the nat and filter tables take part, as in kube-proxy's layout.

Understood: `-s/-d/-p`, `-m tcp|udp|sctp --dport`, `multiport --dports`, `comment`, `statistic
--mode random` (a branch), `mark`, `conntrack --ctstate` (the packet is NEW, and DNAT once
translated), `addrtype --src-type/--dst-type LOCAL`, `recent` (`--rcheck`: a client without
affinity yet; `--set` matches); targets DNAT, MARK, MASQUERADE/SNAT, ACCEPT, DROP, REJECT,
RETURN, user chains (`-j`, `-g`). A rule with anything else does not match, and says so in the
trace's reasons. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
from collections.abc import Sequence

from kproxy_nft.compile.iptables import Ruleset
from kproxy_nft.kernel.iptables_rule import Module, Rule, parse_rule
from kproxy_nft.kernel.iptables_text import BUILTIN_CHAINS, KernelChain, KernelState, KernelTable
from kproxy_nft.model import IPFamily
from kproxy_nft.trace.packet import Flow, Step, is_local
from kproxy_nft.trace.walk import CONTINUE, RETURN, Action, Branch, Jump

TABLES = ("nat", "filter")
# The tables kube-proxy uses on each hook, in the kernel's priority order (nat -100 before filter 0).
_HOOK_TABLES = {
    "prerouting": ("nat",),
    "input": ("filter",),
    "forward": ("filter",),
    "output": ("nat", "filter"),
    "postrouting": ("nat",),
}
_TERMINAL = {"ACCEPT": "accept", "DROP": "drop", "REJECT": "reject"}


def state_from_ruleset(ruleset: Ruleset) -> KernelState:
    """The kernel state loading the compiled `ruleset` into empty tables would give (policies ACCEPT)."""
    tables = {}
    for table in ruleset.tables:
        def jumps(chain: str, table_name: str = table.name) -> tuple[str, ...]:
            return tuple(j.rule for j in ruleset.jumps if (j.table, j.chain) == (table_name, chain))

        builtin = [KernelChain(name, jumps(name), "ACCEPT") for name in BUILTIN_CHAINS[table.name]]
        ours = [KernelChain(chain.name, chain.rules) for chain in table.chains]
        tables[table.name] = KernelTable.of(table.name, [*builtin, *ours])
    return KernelState(ruleset.family, tables)


@functools.lru_cache(maxsize=1 << 14)
def _parsed(rule: str) -> Rule:
    return parse_rule(rule)


class IptablesProgram:
    """One family's nat and filter tables, as a `walk.Program`."""

    def __init__(self, state: KernelState, local: frozenset[str]) -> None:
        self.state = state
        self.local = local
        self.family: IPFamily = state.family

    def base_chains(self, hook: str) -> Sequence[tuple[str, str]]:
        return tuple((table, hook.upper()) for table in _HOOK_TABLES[hook])

    def rules(self, table: str, chain: str) -> Sequence[str]:
        return self.state.table(table).rules(chain)

    def has_chain(self, table: str, chain: str) -> bool:
        return chain in self.state.table(table).chains

    def policy(self, table: str, chain: str) -> str:
        found = self.state.table(table).chains.get(chain)
        return (found.policy if found else None) or "ACCEPT"

    def evaluate(self, table: str, chain: str, rule: str, flow: Flow) -> list[Branch]:
        parsed = _parsed(rule)
        chance, flow = self._match(parsed, flow)
        if chance == 0:
            return [(1.0, flow, CONTINUE)]
        matched, action = self._target(table, chain, parsed, flow.through(Step(table, chain, rule)))
        if chance == 1:
            return [(1.0, matched, action)]
        return [(chance, matched, action), (1.0 - chance, flow, CONTINUE)]

    # -------------------------------------------------------------------------------- matches

    def _match(self, rule: Rule, flow: Flow) -> tuple[float, Flow]:
        """The probability that `rule` matches `flow` (0, 1, or a statistic's), and the flow with
        a note when the rule holds something not understood (it then does not match)."""
        chance = 1.0
        for key, negated, value in rule.base:
            holds = self._base(key, value, flow)
            if holds is None:
                return 0.0, flow.noting(f"iptables: -{key} {value} is not evaluated; the rule is taken not to match")
            if holds == negated:
                return 0.0, flow
        for module in rule.matches:
            module_chance = self._module(module, flow)
            if module_chance is None:
                return 0.0, flow.noting(f"iptables: -m {module.name} is not evaluated; the rule is taken not to match")
            chance *= module_chance
            if chance == 0:
                return 0.0, flow
        return chance, flow

    def _base(self, key: str, value: str, flow: Flow) -> bool | None:
        """Whether a base option (`-s`, `-d`, `-p`) holds, None if not known for a traced packet."""
        if key in ("s", "d"):
            return _in_network(flow.src if key == "s" else flow.dst, value)
        if key == "p":
            return value.lower() in ("all", "0", flow.protocol)
        return None  # -i/-o/-f: not known for a traced packet

    def _module(self, module: Module, flow: Flow) -> float | None:
        """The chance a match module matches (1.0 / 0.0, a probability), None if not understood."""
        chance = 1.0
        for option in module.options:
            result = self._option(module.name, option.name, option.args, flow)
            if result is None:
                return None
            if option.negated:
                result = 1.0 - result
            chance *= result
        return chance

    def _option(self, module: str, name: str, args: tuple[str, ...], flow: Flow) -> float | None:
        value = args[0] if args else ""
        if module in ("tcp", "udp", "sctp") and name in ("dport", "destination-port"):
            return float(module == flow.protocol and _port_in(flow.port, value))
        if module == "multiport" and name in ("dports", "destination-ports"):
            return float(any(_port_in(flow.port, p) for p in value.split(",")))
        if module == "comment":
            return 1.0
        if module == "statistic":
            return {"mode": 1.0 if value == "random" else None, "probability": _probability(value)}.get(name)
        if module == "mark" and name == "mark":
            mark, _, mask = value.partition("/")
            return float(flow.mark & int(mask or "0xffffffff", 0) == int(mark, 0))
        if module == "conntrack" and name == "ctstate":
            states = {"NEW", "DNAT"} if flow.endpoint else {"NEW"}
            return float(bool(states & set(value.upper().split(","))))
        if module == "addrtype" and name in ("src-type", "dst-type"):
            address = flow.src if name == "src-type" else flow.dst
            kind = "LOCAL" if is_local(address, self.local) else "UNICAST"
            return float(kind in value.upper().split(","))
        if module == "recent":
            # A new connection of a client no endpoint has seen yet: `--rcheck` finds nothing,
            # `--set` records it (and matches); name, mask, seconds only qualify those.
            return {"rcheck": 0.0, "update": 0.0, "set": 1.0}.get(name, 1.0)
        return None

    # -------------------------------------------------------------------------------- targets

    def _target(self, table: str, chain: str, rule: Rule, flow: Flow) -> tuple[Flow, Action]:
        target = rule.target
        if target is None:
            return flow, CONTINUE
        options = {o.name: o.args[0] if o.args else "" for o in target.options}
        name = target.name
        if self.has_chain(table, name):
            return flow, Jump(name, goto=rule.goto)
        if name in _TERMINAL:
            accepted = name == "ACCEPT" and chain.startswith("KUBE-")  # ours: an explicit accept
            return (dataclasses.replace(flow, accepted=True) if accepted else flow), _TERMINAL[name]
        if name == "RETURN":
            return flow, RETURN
        if name == "DNAT" and "to-destination" in options:
            ip, port = _split_nat_address(options["to-destination"], flow.port)
            return flow.translated(ip, port), "dnat"
        if name == "MARK":
            return dataclasses.replace(flow, mark=_marked(flow.mark, options)), CONTINUE
        if name in ("MASQUERADE", "SNAT"):
            return dataclasses.replace(flow, masquerade=True), "accept"
        return flow, CONTINUE  # LOG and other non-terminating targets


def _in_network(ip: str, cidr: str) -> bool | None:
    try:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return None  # a host name, a family mismatch: iptables would not have loaded it


def _port_in(port: int, spec: str) -> bool:
    low, _, high = spec.partition(":")
    if not low.isdigit() or (high and not high.isdigit()):
        return False  # a service name (`http`): iptables-save prints numbers
    return int(low) <= port <= int(high or low)


def _probability(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _marked(mark: int, options: dict[str, str]) -> int:
    """The fwmark after `-j MARK` (every spelling: --set-xmark, --or-mark, --xor-mark, …)."""
    for name, value in options.items():
        number, _, mask_text = value.partition("/")
        bits = int(number, 0)
        mask = int(mask_text, 0) if mask_text else 0xFFFFFFFF
        if name == "set-xmark":
            return (mark & ~mask & 0xFFFFFFFF) ^ bits
        if name == "set-mark":
            return (mark & ~mask & 0xFFFFFFFF) | bits
        if name == "or-mark":
            return mark | bits
        if name == "xor-mark":
            return mark ^ bits
        if name == "and-mark":
            return mark & bits
    return mark


def _split_nat_address(value: str, port: int) -> tuple[str, int]:
    """`ip[:port]` or `[v6][:port]` of a DNAT target (no port: the packet's own)."""
    if value.startswith("["):
        ip, _, rest = value[1:].partition("]")
        return ip, int(rest[1:]) if rest.startswith(":") else port
    if value.count(":") == 1:
        ip, _, port_text = value.partition(":")
        return ip, int(port_text)
    return value, port
