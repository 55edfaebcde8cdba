"""Our nftables layout, walked: the `kproxy-nft` table (compiled, or as `nft list` prints it) as a `Program`.

A small reader of the rule language the compiler writes and nft lists back, no more:

    rule       := condition* statement?
    condition  := key (value | != value | & mask == value | @set)
    key        := selector (. selector)*      ip daddr, meta l4proto, th dport, ct original …,
                                              fib saddr type, ct state, meta mark, numgen random mod N
    statement  := key vmap (@map | { … })  |  dnat ip to key map (@map | { … })
                | jump X | goto X | return | accept | drop | reject … | masquerade …
                | meta mark set meta mark (| or ^) V  |  update @map { … }  |  counter …

A `numgen random mod N` key splits the flow into N branches of 1/N. A map element that is
missing (an affinity map, which the datapath fills) is a miss: the rule does nothing. A rule
outside this grammar does not match, and says so in the trace's reasons. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kproxy_nft.compile.nftables import TABLE, Ruleset, nft_family
from kproxy_nft.kernel.nftables_text import KernelTable, parse_listing
from kproxy_nft.model import IPFamily
from kproxy_nft.trace.packet import Flow, Step, is_local
from kproxy_nft.trace.walk import CONTINUE, RETURN, Action, Branch, Jump


@dataclass(frozen=True)
class NftChain:
    name: str
    rules: tuple[str, ...]
    hook: str | None = None  # a base chain's hook, and its priority
    priority: int = 0


@dataclass(frozen=True)
class NftTable:
    """One `kproxy-nft` table: chains, and the elements of its sets and maps (key → value)."""

    family: IPFamily
    chains: Mapping[str, NftChain]
    elements: Mapping[str, Mapping[str, str | None]]

    @property
    def name(self) -> str:
        return f"{nft_family(self.family)} {TABLE}"


def table_from_ruleset(ruleset: Ruleset) -> NftTable:
    """The table that loading the compiled `ruleset` (`render_script`) gives."""
    chains = {
        c.name: NftChain(c.name, c.rules, c.hook.hook if c.hook else None, c.hook.priority if c.hook else 0)
        for c in ruleset.all_chains()
    }
    return NftTable(ruleset.family, chains, ruleset.elements())


# Named priorities as `nft list` (without -y) prints them, for the ip/ip6 families.
_PRIORITIES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100}
_HEADER = re.compile(r"type \w+ hook (\w+)(?: device \S+)? priority ([^;]+);")
_TABLE_START = re.compile(r"^table (ip6?) (\S+) \{", re.MULTILINE)


def _priority(text: str) -> int:
    m = re.fullmatch(r"\s*([a-z]+)?\s*(?:([+-])?\s*(\d+))?\s*", text)
    if not m:
        return 0
    base = _PRIORITIES.get(m.group(1) or "", 0)
    offset = int(m.group(3) or 0)
    return base - offset if m.group(2) == "-" else base + offset


def tables_from_listing(text: str) -> dict[IPFamily, NftTable]:
    """Our tables in `nft list ruleset` / `nft list table …` output (other tables are left out)."""
    found: dict[IPFamily, NftTable] = {}
    starts = list(_TABLE_START.finditer(text))
    for i, start in enumerate(starts):
        if start.group(2) != TABLE:
            continue
        end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
        _, chains, elements = parse_listing(text[start.start():end])
        family = IPFamily.V4 if start.group(1) == "ip" else IPFamily.V6
        found[family] = table_from_kernel(KernelTable(start.group(1), {}, chains, elements))
    return found


def table_from_kernel(table: KernelTable) -> NftTable:
    """Our table as `kernel.nftables.read_table` read it from the kernel."""
    chains = {}
    for chain in table.chains.values():
        m = _HEADER.match(chain.header or "")
        hook, priority = (m.group(1), _priority(m.group(2))) if m else (None, 0)
        chains[chain.name] = NftChain(chain.name, chain.rules, hook, priority)
    family = IPFamily.V4 if table.family == "ip" else IPFamily.V6
    return NftTable(family, chains, table.elements)


# ---------------------------------------------------------------------------------------------
# the rule language
# ---------------------------------------------------------------------------------------------


class NotUnderstood(ValueError):
    """A rule outside the grammar of the module docstring."""


_SELECTORS = (
    ("ct", "original", "ip", "daddr"), ("ct", "original", "ip6", "daddr"),
    ("ct", "original", "ip", "saddr"), ("ct", "original", "ip6", "saddr"), ("ct", "original", "proto-dst"),
    ("fib", "daddr", "type"), ("fib", "saddr", "type"),
    ("ip", "daddr"), ("ip", "saddr"), ("ip6", "daddr"), ("ip6", "saddr"),
    ("meta", "l4proto"), ("meta", "mark"), ("ct", "state"), ("ct", "status"),
    ("th", "dport"), ("tcp", "dport"), ("udp", "dport"), ("sctp", "dport"),
)  # fmt: skip
_WORDS = re.compile(r'\{[^}]*\}|"[^"]*"|\S+')


@dataclass(frozen=True)
class Condition:
    key: tuple[str, ...]  # selectors, e.g. ("ip daddr", "meta l4proto")
    operator: str  # "==", "!=", "in" (a named set)
    value: str
    mask: int | None = None


@dataclass(frozen=True)
class NftRule:
    conditions: tuple[Condition, ...]
    statement: tuple[str, ...]  # ("jump", "x"), ("vmap", map), ("dnat", map), ("mark", op, value), …
    key: tuple[str, ...] = ()  # of a vmap or dnat statement


def _key(words: list[str], i: int) -> tuple[tuple[str, ...], int]:
    """The selectors joined by `.` starting at `words[i]`, and the index after them."""
    key: list[str] = []
    while True:
        if words[i:i + 3] == ["numgen", "random", "mod"] and i + 3 < len(words):
            key.append(f"numgen {words[i + 3]}")
            i += 4
        else:
            selector = next((s for s in _SELECTORS if tuple(words[i:i + len(s)]) == s), None)
            if selector is None:
                raise NotUnderstood(" ".join(words[i:i + 3]))
            key.append(" ".join(selector))
            i += len(selector)
        if i < len(words) and words[i] == ".":
            i += 1
            continue
        return tuple(key), i


@functools.lru_cache(maxsize=1 << 14)
def parse_nft_rule(text: str) -> NftRule:
    """One rule in the grammar of the module docstring (raises NotUnderstood)."""
    words = _WORDS.findall(text)
    conditions: list[Condition] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word in ("jump", "goto") and i + 1 < len(words):
            return NftRule(tuple(conditions), (word, words[i + 1]))
        if word in ("return", "accept", "drop", "reject", "masquerade"):
            return NftRule(tuple(conditions), (word,))  # options (`with tcp reset`, `fully-random`) do not matter
        if word == "update":
            return NftRule(tuple(conditions), ("update",))
        if word == "counter":
            i += 5 if words[i + 1:i + 2] == ["packets"] else 1
            continue
        if word == "dnat":
            key, j = _key(words, i + 3)  # dnat ip to …
            if words[j:j + 1] != ["map"] or j + 1 >= len(words):
                raise NotUnderstood(text)
            return NftRule(tuple(conditions), ("dnat", words[j + 1]), key)
        if words[i:i + 4] == ["meta", "mark", "set", "meta"] and i + 6 < len(words):
            return NftRule(tuple(conditions), ("mark", words[i + 5], words[i + 6]))
        key, i = _key(words, i)
        if i >= len(words):
            raise NotUnderstood(text)
        op = words[i]
        if op == "vmap" and i + 1 < len(words):
            return NftRule(tuple(conditions), ("vmap", words[i + 1]), key)
        if op.startswith("@"):
            conditions.append(Condition(key, "in", op[1:]))
            i += 1
        elif op == "&" and i + 3 < len(words):
            conditions.append(Condition(key, words[i + 2], words[i + 3], int(words[i + 1], 0)))
            i += 4
        elif op in ("!=", "==") and i + 1 < len(words):
            conditions.append(Condition(key, op, words[i + 1]))
            i += 2
        else:
            conditions.append(Condition(key, "==", op))
            i += 1
    return NftRule(tuple(conditions), ())


def _anonymous(text: str) -> dict[str, str | None]:
    """`{ k : v, k2 : v2 }` (or a set `{ a, b }`) as elements."""
    items = [item.strip() for item in text.strip("{} ").split(",") if item.strip()]
    return {(kv := item.partition(" : "))[0]: (kv[2] or None) for item in items}


class NftablesProgram:
    """One family's `kproxy-nft` table, as a `walk.Program`."""

    def __init__(self, table: NftTable, local: frozenset[str]) -> None:
        self.table = table
        self.local = local

    def base_chains(self, hook: str) -> Sequence[tuple[str, str]]:
        chains = sorted((c for c in self.table.chains.values() if c.hook == hook), key=lambda c: c.priority)
        return tuple((self.table.name, c.name) for c in chains)

    def rules(self, table: str, chain: str) -> Sequence[str]:
        found = self.table.chains.get(chain)
        return found.rules if found else ()

    def policy(self, table: str, chain: str) -> str:
        return "ACCEPT"  # ours are all `policy accept`

    def evaluate(self, table: str, chain: str, rule: str, flow: Flow) -> list[Branch]:
        try:
            parsed = parse_nft_rule(rule)
        except NotUnderstood:
            return [(1.0, flow.noting(f"nft: {rule!r} is not evaluated; the rule is taken not to match"), CONTINUE)]
        if not all(self._holds(c, flow) for c in parsed.conditions):
            return [(1.0, flow, CONTINUE)]
        if not parsed.statement:
            return [(1.0, flow, CONTINUE)]  # conditions alone change nothing
        step = Step(table, chain, rule)
        kind = parsed.statement[0]
        if kind in ("vmap", "dnat"):
            return self._lookup(parsed, flow, step)
        flow = flow.through(step)
        if kind in ("jump", "goto"):
            return [(1.0, flow, Jump(parsed.statement[1], goto=kind == "goto"))]
        return [(1.0, *self._act(parsed.statement, flow))]

    def _act(self, statement: tuple[str, ...], flow: Flow) -> tuple[Flow, Action]:
        kind = statement[0]
        if kind == "return":
            return flow, RETURN
        if kind in ("drop", "reject"):
            return flow, kind
        if kind == "accept":
            return dataclasses.replace(flow, accepted=True), "accept"
        if kind == "masquerade":
            return dataclasses.replace(flow, masquerade=True), "accept"
        if kind == "mark":
            _, op, value = statement
            bits = int(value, 0)
            mark = flow.mark | bits if op == "|" else flow.mark ^ bits if op == "^" else bits
            return dataclasses.replace(flow, mark=mark), CONTINUE
        return flow, CONTINUE  # update: records affinity, which a new client has none of yet

    # ------------------------------------------------------------------------ keys and maps

    def _values(self, selector: str, flow: Flow) -> str:
        """A selector's value for `flow`, in nft's text."""
        if selector.endswith("daddr") and not selector.startswith("fib"):
            return flow.original_dst if selector.startswith("ct original") else flow.dst
        if selector.endswith("saddr") and not selector.startswith("fib"):
            return flow.src
        if selector.endswith("dport"):
            return str(flow.port)
        if selector == "ct original proto-dst":
            return str(flow.original_port)
        if selector == "meta l4proto":
            return flow.protocol
        if selector.startswith("fib"):
            return "local" if is_local(flow.src if "saddr" in selector else flow.dst, self.local) else "unicast"
        if selector == "ct state":
            return "new"
        if selector == "ct status":
            return "dnat" if flow.endpoint else "none"
        if selector == "meta mark":
            return str(flow.mark)
        raise NotUnderstood(selector)

    def _holds(self, condition: Condition, flow: Flow) -> bool:
        values = [self._values(s, flow) for s in condition.key]
        if condition.operator == "in":
            return " . ".join(values) in self.table.elements.get(condition.value, {})
        (value,) = values
        if condition.mask is not None:
            found = int(value) & condition.mask == int(condition.value, 0)
        else:
            candidates = _anonymous(condition.value) if condition.value.startswith("{") else {condition.value: None}
            found = any(_equal(value, c) for c in candidates)
        return found == (condition.operator == "==")

    def _lookup(self, rule: NftRule, flow: Flow, step: Step) -> list[Branch]:
        """A vmap or a dnat map: one branch per `numgen` value, a miss does nothing."""
        name = rule.statement[1]
        elements = _anonymous(name) if name.startswith("{") else self.table.elements.get(name.lstrip("@"), {})
        label = "anonymous map" if name.startswith("{") else name.lstrip("@")
        numgen = next((int(s.split()[1]) for s in rule.key if s.startswith("numgen")), 1)
        branches: list[Branch] = []
        for index in range(numgen):
            key = " . ".join(str(index) if s.startswith("numgen") else self._values(s, flow) for s in rule.key)
            value = elements.get(key)
            if value is None:
                branches.append((1.0 / numgen, flow, CONTINUE))
                continue
            taken = flow.through(step).through(Step(map=label, element=f"{key} : {value}"))
            if rule.statement[0] == "dnat":
                ip, _, port = value.partition(" . ")
                branches.append((1.0 / numgen, taken.translated(ip, int(port or flow.port)), "dnat"))
            else:
                verdict = value.split()
                action: Action = Jump(verdict[1], goto=verdict[0] == "goto") if len(verdict) == 2 else verdict[0]
                branches.append((1.0 / numgen, *self._verdict_of(taken, action)))
        return branches

    def _verdict_of(self, flow: Flow, action: Action) -> tuple[Flow, Action]:
        if isinstance(action, Jump) or action not in ("return", "accept", "drop", "reject"):
            return flow, action
        return self._act((action,), flow)


def _equal(value: str, expected: str) -> bool:
    """`value` equals `expected` or lies in it (a prefix), nft's comparison of one element."""
    if "/" in expected or ":" in value or "." in value:
        try:
            return ipaddress.ip_address(value) in ipaddress.ip_network(expected, strict=False)
        except ValueError:
            return value == expected
    return value == expected
