"""An in-memory nftables for tests: our tables as data, transactions all or nothing, listings as nft prints them.

In the spirit of knftables' `Fake`: `FakeNftables` holds tables (set/map declarations with their
elements, chains with their rules) and applies a transaction *text*, the subset of nft syntax
the planner and the compiler emit:

    add|create|delete|flush table F T          table F T { comment "…"; set|map … { … }; chain … { … } }
    add|create|delete|flush chain F T C [{ type … hook … priority N; policy P; }]
    add rule F T C <rule>
    add|create|delete|flush set|map F T S [{ type …; flags …; elements = { … } }]
    add|create|delete element F T S { k [timeout D] [: v], … }

Statements end at a newline or `;` outside braces. A transaction is applied to a copy and
committed only if every statement succeeds (the kernel's batches are atomic); statements run in
order, so a reference to a chain declared later in the same text fails, as with nft, except in
a `table { … }` block, which nft expands into chains, then sets, then rules.

What the kernel refuses, the fake refuses (each rule checked against nft 1.0.6 on kernel 6.18 in
`tests/kernel/test_nftables_fake.py`, the same text sent to both):

* a rule or verdict-map element that jumps/goes to a missing chain (ENOENT) or to a base chain
  (EOPNOTSUPP), a rule naming a missing `@set` (ENOENT), anything in a missing table/chain/set;
* deleting a chain a rule (of another chain) or a map element still points at, or a set a rule
  names (EBUSY); deleting a chain with rules is fine (they go with it);
* `add element` of a key that is there with another value, including twice in one command
  (EEXIST; the same value is a no-op), `create` of anything that exists (EEXIST);
* deleting an element, chain, set or table that is not there (ENOENT), including the same
  element twice in one transaction;
* `add chain` with a hook that differs from the existing chain's, or on an existing regular
  chain (EOPNOTSUPP); `add set|map` with another declaration than the existing one (EEXIST);
* an element that does not fit its declaration: a value in a set, none in a map, another
  number of ` . `-joined parts than the type, a non-verdict in a verdict map.

Element counters: a set or map declared with `counter` lists each element as
`KEY counter packets P bytes 0 : VALUE` (and its JSON element carries `"counter"`), as nft 1.0.6
does; `count` adds packets the way the datapath would, and a deleted element loses its count.

Not modelled: rule syntax and semantics (rules are opaque text, only their references are
read), element types (`10.0.0.1` in an `ipv6_addr` set is accepted), jump loops, timeouts
(entries never expire), handles, other families' hook restrictions. `refuse` makes any
statement fail on demand, the way a kernel refuses a rule no model predicts. With
`pre_6_2_kernel`, a chain cannot be deleted in the transaction that deletes the last map
element pointing at it (kernels before 6.2 release that reference only at commit; modelled
from kube-proxy's `staleChains`, not checked here: the test kernel is newer).

Listings (`listing`, and `FakeTransport` answering `list table` / `list map|set` like the
`Transport`s of `nftables_transport`) follow `nft -y list table` and `nft -j list map`, so the
backend's read path parses them; rules are listed as written except for nft's known rewrite of
what the compiler emits (see `_LISTED`), elements in insertion order, one per line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kproxy_nft.kernel import libnftables
from kproxy_nft.kernel.nftables_transport import MISSING
from kproxy_nft.kernel.runner import Completed

FAMILIES = frozenset({"ip", "ip6", "inet", "arp", "bridge", "netdev"})
VERDICTS = frozenset({"accept", "drop", "continue", "return"})

ENOENT = MISSING  # nft's words for it
EBUSY = "Device or resource busy"
EEXIST = "File exists"
EOPNOTSUPP = "Operation not supported"
EINVAL = "Invalid argument"


class FakeNftablesError(Exception):
    """A transaction the kernel would refuse: nothing of it was applied."""

    def __init__(self, line: int, statement: str, reason: str) -> None:
        super().__init__(f"line {line}: {reason}: {statement.splitlines()[0] if statement else ''}")
        self.line = line
        self.statement = statement
        self.reason = reason


class _Refused(Exception):
    """One statement refused; `reason` reads like nft's (errno text, then what the fake saw)."""


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------


@dataclass
class FakeSet:
    name: str
    is_map: bool
    body: tuple[str, ...]  # declaration lines as written (`type …`, `flags …`), no elements
    elements: dict[str, str | None] = field(default_factory=dict)
    timeouts: dict[str, str] = field(default_factory=dict)  # key → `timeout` as written
    packets: dict[str, int] = field(default_factory=dict)  # key → packets counted (`counter` sets)

    def copy(self) -> FakeSet:
        return FakeSet(self.name, self.is_map, self.body, dict(self.elements), dict(self.timeouts),
                       dict(self.packets))

    @property
    def counted(self) -> bool:
        """Declared with `counter`: the kernel keeps a counter per element, listed after the key."""
        return "counter" in self.body

    def shape(self) -> tuple[int, int | None]:
        """(parts of a key, parts of a value: 0 for a verdict, None for a set) per the declaration."""
        spec = next((line for line in self.body if line.startswith(("type ", "typeof "))), "")
        key, _, value = spec.split(" ", 1)[-1].partition(" : ")
        if not self.is_map:
            return len(key.split(" . ")), None
        return len(key.split(" . ")), 0 if value.strip() == "verdict" else len(value.split(" . "))


@dataclass
class FakeChain:
    name: str
    header: str | None  # `type … hook … priority N; policy P;` of a base chain
    rules: list[str] = field(default_factory=list)


@dataclass
class FakeTable:
    family: str
    name: str
    comment: str | None = None
    sets: dict[str, FakeSet] = field(default_factory=dict)
    chains: dict[str, FakeChain] = field(default_factory=dict)

    def copy(self) -> FakeTable:
        chains = {n: FakeChain(c.name, c.header, list(c.rules)) for n, c in self.chains.items()}
        return FakeTable(self.family, self.name, self.comment, {n: s.copy() for n, s in self.sets.items()}, chains)

    def chain(self, name: str) -> FakeChain:
        if name not in self.chains:
            raise _Refused(f"{ENOENT} (no chain {name})")
        return self.chains[name]

    def set(self, name: str) -> FakeSet:
        if name not in self.sets:
            raise _Refused(f"{ENOENT} (no set {name})")
        return self.sets[name]

    def chain_users(self, name: str) -> list[str]:
        """What points at chain `name`: rules of other chains, map elements."""
        users = [f"a rule of {c.name}" for c in self.chains.values() if c.name != name for r in c.rules
                 if name in _jump_targets(r)]  # fmt: skip
        users += [f"element {k} of {s.name}" for s in self.sets.values() for k, v in s.elements.items()
                  if v is not None and _verdict_target(v) == name]  # fmt: skip
        return users


_JUMP = re.compile(r"(?:^|\s)(?:jump|goto)\s+([^\s,{}]+)")
_SET_REF = re.compile(r"@([\w.-]+)")
_HEADER = re.compile(r"type (\w+) hook (\w+) priority (-?\d+)\s*(?:;\s*policy (\w+))?\s*;?")
# nft 1.0.6 lists some rules differently from how they were written; the fake lists what the
# compiler writes the way nft does (`Chain.listed` in compile/nftables.py): the `meta l4proto`
# an `update … ct original proto-dst` needs to parse is dropped from the listing.
_LISTED = ((re.compile(r"^meta l4proto \w+ (update @.* ct original proto-dst .*)$"), r"\1"),)
# Element attributes that are not part of the key; a loaded counter value is not kept (the
# fake's counts start at 0: only `count` adds to them).
_ATTRIBUTES = re.compile(r'\s+(?:(?:timeout|expires)\s+\S+|comment\s+"[^"]*"|counter\s+packets\s+\d+\s+bytes\s+\d+)')


def _jump_targets(rule: str) -> list[str]:
    return _JUMP.findall(rule)


def _verdict_target(value: str) -> str | None:
    verb, _, target = value.partition(" ")
    return target if verb in ("goto", "jump") else None


def _as_listed(rule: str) -> str:
    for pattern, replacement in _LISTED:
        rule = pattern.sub(replacement, rule)
    return rule


def _header(text: str) -> str:
    """A base chain's header as `nft -y` lists it."""
    m = _HEADER.fullmatch(text.strip())
    if m is None:
        raise _Refused(f"{EINVAL} (the fake understands `type T hook H priority N; policy P;` only: {text})")
    kind, hook, priority, policy = m.groups()
    return f"type {kind} hook {hook} priority {priority}; policy {policy or 'accept'};"


# ---------------------------------------------------------------------------------------------
# statements
# ---------------------------------------------------------------------------------------------


def _statements(text: str) -> Iterator[tuple[int, str]]:
    """(line number, statement): split at newlines and `;` outside braces and quotes."""
    depth, quoted, start = 0, False, 0
    current: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not current:
            start = number
        if '"' not in line and ";" not in line and depth >= line.count("}"):  # no split, no quote
            depth += line.count("{") - line.count("}")
            current.append(line)
            if depth == 0:
                if "\n".join(current).strip():
                    yield start, "\n".join(current).strip()
                current = []
            continue
        part: list[str] = []
        for ch in line:
            if ch == '"':
                quoted = not quoted
            elif not quoted and ch in "{}":
                depth += 1 if ch == "{" else -1
                if depth < 0:
                    raise FakeNftablesError(number, line, "syntax error, unexpected '}'")
            elif not quoted and ch == ";" and depth == 0:
                if "".join([*current, *part]).strip():
                    yield start, "\n".join([*current, "".join(part)]).strip()
                current, part, start = [], [], number
                continue
            part.append(ch)
        current.append("".join(part))
        if depth == 0:
            if "\n".join(current).strip():
                yield start, "\n".join(current).strip()
            current = []
    if depth:
        raise FakeNftablesError(start, "\n".join(current), "syntax error, unbalanced '{'")


def _braced(text: str) -> str:
    """The inside of `{ … }` (the whole of `text`)."""
    text = text.strip()
    if not (text.startswith("{") and text.endswith("}")):
        raise _Refused(f"{EINVAL} (expected {{ … }}: {text[:80]})")
    return text[1:-1]


def _element_items(text: str) -> list[tuple[str, str | None, str | None]]:
    """(key, value or None, timeout or None) of `{ k [timeout D] [: v], … }`."""
    out = []
    for item in _braced(text).split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition(" : ")
        timeout = re.search(r"\stimeout\s+(\S+)", key)
        out.append((_ATTRIBUTES.sub("", key).strip(), value.strip() if sep else None, timeout and timeout.group(1)))
    return out


# ---------------------------------------------------------------------------------------------
# a transaction
# ---------------------------------------------------------------------------------------------


class _Transaction:
    """The tables being edited: a table is copied the first time a statement changes it."""

    def __init__(self, tables: dict[tuple[str, str], FakeTable], pre_6_2_kernel: bool) -> None:
        self.committed = dict(tables)  # as at the start (for `pre_6_2_kernel`)
        self.tables = dict(tables)
        self.copied: set[tuple[str, str]] = set()
        self.pre_6_2_kernel = pre_6_2_kernel

    def table(self, family: str, name: str) -> FakeTable:
        key = (family, name)
        if key not in self.tables:
            raise _Refused(f"{ENOENT} (no table {family} {name})")
        if key not in self.copied:
            self.tables[key] = self.tables[key].copy()
            self.copied.add(key)
        return self.tables[key]

    def run(self, statement: str) -> None:
        words = statement.split(None, 5)
        if words[0] == "table":
            self.block(statement)
            return
        if len(words) < 4 or words[2] not in FAMILIES:
            raise _Refused(f"{EINVAL} (the fake understands `VERB OBJECT FAMILY TABLE …` only)")
        verb, obj, family, table = words[:4]
        if obj == "table":
            self.table_command(verb, family, table)
            return
        if len(words) < 5:
            raise _Refused(f"{EINVAL} (no {obj} name)")
        name, rest = words[4], words[5] if len(words) > 5 else ""
        handler = {"chain": self.chain_command, "rule": self.rule_command, "set": self.set_command,
                   "map": self.set_command, "element": self.element_command}.get(obj)  # fmt: skip
        if handler is None:
            raise _Refused(f"{EINVAL} (the fake does not know `{obj}`)")
        handler(verb, self.table(family, table), name, rest, obj)

    # ------------------------------------------------------------------ tables
    def table_command(self, verb: str, family: str, name: str, comment: str | None = None) -> None:
        key = (family, name)
        if verb in ("add", "create"):
            if key in self.tables and verb == "create":
                raise _Refused(f"{EEXIST} (table {family} {name})")
            if key not in self.tables:
                self.tables[key] = FakeTable(family, name, comment)
                self.copied.add(key)
                self.committed.pop(key, None)  # a new table: nothing of the old one lingers
        elif verb == "delete":
            self.table(family, name)
            del self.tables[key]
        elif verb == "flush":
            for chain in self.table(family, name).chains.values():
                chain.rules.clear()
        else:
            raise _Refused(f"{EINVAL} (the fake does not know `{verb} table`)")

    def block(self, statement: str) -> None:
        """`table F T { … }`, expanded as nft does: the table, its chains, its sets, then the rules."""
        head, _, rest = statement.partition("{")
        words = head.split()
        if len(words) != 3 or words[1] not in FAMILIES:
            raise _Refused(f"{EINVAL} (expected `table FAMILY NAME {{`)")
        family, name = words[1], words[2]
        comment: str | None = None
        sets: list[tuple[str, str, str]] = []
        chains: list[tuple[str, str, str]] = []
        for _, inner in _statements(_braced("{" + rest)):
            kind, _, body = inner.partition(" ")
            if kind == "comment":
                comment = body.strip().strip('"')
            elif kind in ("set", "map", "chain"):
                block_name, _, block = body.partition(" ")
                (chains if kind == "chain" else sets).append((kind, block_name, block))
            else:
                raise _Refused(f"{EINVAL} (the fake does not know `{kind}` in a table block)")
        self.table_command("add", family, name, comment)
        table = self.table(family, name)
        rules: list[tuple[FakeChain, list[str]]] = []
        for _, chain_name, block in chains:
            header, chain_rules = _chain_block(block)
            rules.append((self.declare_chain("add", table, chain_name, header), chain_rules))
        for kind, set_name, block in sets:
            self.set_command("add", table, set_name, block, kind)
        for chain, chain_rules in rules:
            for rule in chain_rules:
                self.add_rule(table, chain, rule)

    # ------------------------------------------------------------------ chains and rules
    def chain_command(self, verb: str, table: FakeTable, name: str, rest: str, _: str) -> None:
        if verb in ("add", "create"):
            header = _header(_braced(rest)) if rest.strip() else None
            self.declare_chain(verb, table, name, header)
        elif verb == "delete":
            self.delete_chain(table, name)
        elif verb == "flush":
            table.chain(name).rules.clear()
        else:
            raise _Refused(f"{EINVAL} (the fake does not know `{verb} chain`)")

    def declare_chain(self, verb: str, table: FakeTable, name: str, header: str | None) -> FakeChain:
        existing = table.chains.get(name)
        if existing is None:
            table.chains[name] = FakeChain(name, header)
            return table.chains[name]
        if verb == "create":
            raise _Refused(f"{EEXIST} (chain {name})")
        if header is not None and header != existing.header:
            raise _Refused(f"{EOPNOTSUPP} (chain {name} exists with hook {existing.header})")
        return existing

    def delete_chain(self, table: FakeTable, name: str) -> None:
        table.chain(name)
        users = table.chain_users(name)
        if not users and self.pre_6_2_kernel:
            before = self.committed.get((table.family, table.name))
            if before is not None and name in before.chains:
                users = [f"{u} (released at commit, before 6.2)" for u in before.chain_users(name) if "element" in u]
        if users:
            raise _Refused(f"{EBUSY} (chain {name} is used by {users[0]})")
        del table.chains[name]

    def rule_command(self, verb: str, table: FakeTable, name: str, rest: str, _: str) -> None:
        if verb != "add":
            raise _Refused(f"{EINVAL} (the fake does not know `{verb} rule`)")
        if not rest.strip():
            raise _Refused(f"{EINVAL} (an empty rule)")
        self.add_rule(table, table.chain(name), rest.strip())

    def add_rule(self, table: FakeTable, chain: FakeChain, rule: str) -> None:
        for target in _jump_targets(rule):
            self.check_target(table, target)
        for set_name in _SET_REF.findall(rule):
            table.set(set_name)
        chain.rules.append(rule)

    @staticmethod
    def check_target(table: FakeTable, target: str) -> None:
        if table.chain(target).header is not None:
            raise _Refused(f"{EOPNOTSUPP} (jump to base chain {target})")

    # ------------------------------------------------------------------ sets and elements
    def set_command(self, verb: str, table: FakeTable, name: str, rest: str, kind: str) -> None:
        if verb in ("add", "create"):
            self.declare_set(verb, table, name, kind == "map", rest)
        elif verb == "delete":
            table.set(name)
            users = [c.name for c in table.chains.values() for r in c.rules if name in _SET_REF.findall(r)]
            if users:
                raise _Refused(f"{EBUSY} (set {name} is used by a rule of {users[0]})")
            del table.sets[name]
        elif verb == "flush":
            table.set(name).elements.clear()
        else:
            raise _Refused(f"{EINVAL} (the fake does not know `{verb} {kind}`)")

    def declare_set(self, verb: str, table: FakeTable, name: str, is_map: bool, rest: str) -> None:
        body: list[str] = []
        elements = ""
        for _, line in _statements(_braced(rest)) if rest.strip() else ():
            if line.startswith("elements"):
                elements = line.partition("=")[2]
            else:
                body.append(" ".join(line.split()))
        existing = table.sets.get(name)
        if existing is not None and (verb == "create" or (existing.is_map, existing.body) != (is_map, tuple(body))):
            raise _Refused(f"{EEXIST} (set {name} exists as {existing.body})")
        if existing is None:
            if not body:
                raise _Refused(f"{EINVAL} (set {name} has no type)")
            table.sets[name] = FakeSet(name, is_map, tuple(body))
        if elements.strip():
            self.add_elements("add", table, table.sets[name], elements)

    def element_command(self, verb: str, table: FakeTable, name: str, rest: str, _: str) -> None:
        target = table.set(name)
        if verb in ("add", "create"):
            self.add_elements(verb, table, target, rest)
        elif verb == "delete":
            for key, _value, _timeout in _element_items(rest):
                if key not in target.elements:
                    raise _Refused(f"{ENOENT} (no element {key} in {name})")
                del target.elements[key]
                target.timeouts.pop(key, None)
                target.packets.pop(key, None)  # a re-added element starts counting from 0
        else:
            raise _Refused(f"{EINVAL} (the fake does not know `{verb} element`)")

    def add_elements(self, verb: str, table: FakeTable, target: FakeSet, items: str) -> None:
        key_parts, value_parts = target.shape()
        for key, value, timeout in _element_items(items):
            _check_shape(target, key, value, key_parts, value_parts)
            if value is not None and value_parts == 0 and (chain := _verdict_target(value)) is not None:
                self.check_target(table, chain)
            if key in target.elements and (verb == "create" or target.elements[key] != value):
                raise _Refused(f"{EEXIST} (element {key} of {target.name} is {target.elements[key]})")
            target.elements[key] = value
            if timeout is not None:
                target.timeouts[key] = timeout


def _chain_block(block: str) -> tuple[str | None, list[str]]:
    """(header, rules) of a chain's `{ … }` in a table block."""
    statements = [s for _, s in _statements(_braced(block))]
    if statements and statements[0].startswith("type ") and " hook " in statements[0]:
        policy = statements[1] if len(statements) > 1 and statements[1].startswith("policy ") else None
        header = _header(statements[0] + (f"; {policy};" if policy else ";"))
        return header, statements[2 if policy else 1:]
    return None, statements


def _check_shape(target: FakeSet, key: str, value: str | None, key_parts: int, value_parts: int | None) -> None:
    if value_parts is None and value is not None:
        raise _Refused(f"{EINVAL} (set is not a map: {target.name})")
    if value_parts is not None and value is None:
        raise _Refused(f"{EINVAL} (map element without a value: {key})")
    if len(key.split(" . ")) != key_parts:
        raise _Refused(f"{EINVAL} (datatype mismatch: {key} in {target.name})")
    if value is not None and value_parts == 0:
        if value not in VERDICTS and _verdict_target(value) is None:
            raise _Refused(f"{EINVAL} (not a verdict: {value})")
    elif value is not None and len(value.split(" . ")) != value_parts:
        raise _Refused(f"{EINVAL} (datatype mismatch: {value} in {target.name})")


# ---------------------------------------------------------------------------------------------
# the fake kernel
# ---------------------------------------------------------------------------------------------


@dataclass
class FakeNftables:
    """Tables in memory, changed only by whole transactions (see the module docstring)."""

    tables: dict[tuple[str, str], FakeTable] = field(default_factory=dict)
    refuse: Callable[[str], bool] = lambda statement: False
    pre_6_2_kernel: bool = False

    def apply(self, text: str) -> None:
        """Apply the transaction, all or nothing; FakeNftablesError names the statement refused."""
        t = _Transaction(self.tables, self.pre_6_2_kernel)
        for line, statement in _statements(text):
            try:
                if self.refuse(statement):
                    raise _Refused(f"{EINVAL} (refused by the test)")
                t.run(statement)
            except _Refused as e:
                raise FakeNftablesError(line, statement, str(e)) from None
        self.tables = t.tables

    def table(self, family: str, name: str) -> FakeTable | None:
        return self.tables.get((family, name))

    def count(self, family: str, table: str, name: str, key: str, packets: int = 1) -> None:
        """What the datapath does to a counted element a packet looks up (tests' traffic)."""
        s = self.tables[(family, table)].sets[name]
        if not s.counted or key not in s.elements:
            raise KeyError(f"{name} has no counted element {key}")
        s.packets[key] = s.packets.get(key, 0) + packets

    def listing(self, family: str, name: str, terse: bool = False) -> str:
        """`nft [-t] -y list table FAMILY NAME` (KeyError for a missing table)."""
        table = self.tables[(family, name)]
        lines = [f"table {family} {name} {{"]
        if table.comment is not None:
            lines.append(f'\tcomment "{table.comment}"')
        blocks = [_list_set(s, terse) for s in table.sets.values()]
        blocks += [_list_chain(c) for c in table.chains.values()]
        for i, block in enumerate(blocks):
            lines += ([""] if i else []) + block
        lines.append("}")
        return "\n".join(lines) + "\n"

    def set_listing(self, family: str, table: str, name: str, terse: bool = False) -> str:
        """`nft [-t] list set|map FAMILY TABLE NAME` (KeyError for a missing set)."""
        block = _list_set(self.tables[(family, table)].sets[name], terse)
        return "\n".join([f"table {family} {table} {{", *block, "}"]) + "\n"

    def json_elements(self, family: str, table: str, name: str) -> str:
        """`nft -j list set|map FAMILY TABLE NAME` (KeyError for a missing set)."""
        s = self.tables[(family, table)].sets[name]
        elem: list[Any] = []
        for key, value in s.elements.items():
            k: Any = _json_atom(key)
            if key in s.timeouts:
                k = {"elem": {"val": k, "timeout": _seconds(s.timeouts[key])}}
            elif s.counted:
                k = {"elem": {"val": k, "counter": {"packets": s.packets.get(key, 0), "bytes": 0}}}
            elem.append([k, _json_value(value)] if s.is_map and value is not None else k)
        decl: dict[str, Any] = {"family": family, "name": name, "table": table, "handle": 0}
        if elem:
            decl["elem"] = elem
        meta = {"metainfo": {"version": "1.0.6", "release_name": "fake", "json_schema_version": 1}}
        return json.dumps({"nftables": [meta, {"map" if s.is_map else "set": decl}]}) + "\n"


def _list_set(s: FakeSet, terse: bool) -> list[str]:
    lines = [f"\t{'map' if s.is_map else 'set'} {s.name} {{", *(f"\t\t{line}" for line in s.body)]
    if s.elements and not terse:
        items = []
        for key, value in s.elements.items():
            shown = f"{key} timeout {s.timeouts[key]}" if key in s.timeouts else key
            if s.counted:  # nft 1.0.6 prints the element's counter between key and value
                shown += f" counter packets {s.packets.get(key, 0)} bytes 0"
            items.append(shown if value is None else f"{shown} : {value}")
        lines.append("\t\telements = { " + ",\n\t\t\t     ".join(items) + " }")
    return [*lines, "\t}"]


def _list_chain(c: FakeChain) -> list[str]:
    header = [f"\t\t{c.header}"] if c.header else []
    return [f"\tchain {c.name} {{", *header, *(f"\t\t{_as_listed(r)}" for r in c.rules), "\t}"]


def _json_atom(text: str) -> Any:
    parts: list[Any] = [int(p) if p.isdigit() else p for p in text.split(" . ")]
    return parts[0] if len(parts) == 1 else {"concat": parts}


def _json_value(value: str | None) -> Any:
    if value is None:
        return None
    if value in VERDICTS:
        return {value: None}
    target = _verdict_target(value)
    if target is not None:
        return {value.split()[0]: {"target": target}}
    return _json_atom(value)


def _seconds(duration: str) -> int:
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([dhms])", duration))


# ---------------------------------------------------------------------------------------------
# the transport
# ---------------------------------------------------------------------------------------------

_LIST_TABLE = re.compile(r"list table (\S+) (\S+)")
_LIST_SET = re.compile(r"list (?:set|map) (\S+) (\S+) (\S+)")


@dataclass
class FakeTransport:
    """A `Transport` (see `nftables_transport`) answering from a `FakeNftables`; records every call."""

    fake: FakeNftables = field(default_factory=FakeNftables)
    name: str = "fake"
    calls: list[tuple[str, libnftables.Output]] = field(default_factory=list)

    def run(self, commands: str, output: libnftables.Output = libnftables.PLAIN) -> Completed:
        self.calls.append((commands, output))
        command = commands.strip()
        if command.startswith("list ") and "\n" not in command:
            return self._list(command, output)
        try:
            self.fake.apply(commands)
        except FakeNftablesError as e:
            return Completed(1, "", f"Error: Could not process rule: {e.reason}\n{e.statement.splitlines()[0]}\n")
        return Completed(0, "", "")

    def _list(self, command: str, output: libnftables.Output) -> Completed:
        try:
            if (m := _LIST_TABLE.fullmatch(command)) and not output.json:
                return Completed(0, self.fake.listing(m[1], m[2], terse=output.terse), "")
            if (m := _LIST_SET.fullmatch(command)) and output.json:
                return Completed(0, self.fake.json_elements(m[1], m[2], m[3]), "")
            if m := _LIST_SET.fullmatch(command):
                return Completed(0, self.fake.set_listing(m[1], m[2], m[3], terse=output.terse), "")
        except KeyError:
            return Completed(1, "", f"Error: {ENOENT}\n{command}\n")
        return Completed(1, "", f"Error: the fake does not list `{command}` with {output}\n")

    def close(self) -> None:
        pass


__all__ = ["FakeChain", "FakeNftables", "FakeNftablesError", "FakeSet", "FakeTable", "FakeTransport"]
