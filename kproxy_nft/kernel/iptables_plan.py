"""Pure reconcile for iptables: desired `Ruleset` vs `KernelState` → one `iptables-restore --noflush` payload.

What we own, and so may change: in the filter and nat tables, the chains the compiler generates
(its fixed chains and every `KUBE-SVC-/SVL-/EXT-/FW-/SEP-` chain), plus the rules of built-in
chains that jump to one of them. Everything else (other chains, other rules in built-in chains,
kubelet's KUBE-FIREWALL or KUBE-KUBELET-CANARY, other tables) is never touched, and built-in
chains are never flushed.

A plan per table, in the order the lines must run under `--noflush`:

1. `:CHAIN - [0:0]` for each chain to add (creates it), to change, or to delete (both flush it);
2. the full rules of each added or changed chain (our text, as the compiler wrote it);
3. fixes to built-in chains: `-D CHAIN <rule>` for jumps we no longer want and for every copy of
   a duplicated one, `-I CHAIN 1 <rule>` for missing (or de-duplicated) ones, in reverse so
   they end up on top in the compiler's order;
4. `-X CHAIN` for stale chains, last, once nothing of ours refers to them any more.

A chain is "changed" when its rules differ in canonical form (`iptables_rule.canonical`), so a
state read back from `iptables-save` compares equal to what we wrote. A stale chain that a rule
we do not own still jumps to cannot be deleted: it is emptied instead and left in place.

`plan` also computes the state the kernel will be in after the payload (`Plan.after`), so a
caller can keep it and plan the next sync without reading `iptables-save` again; `revert_plan`
computes the payload that takes our parts of a table back to an earlier state (used to undo a
table that committed before a later table of the same payload failed).
"""

from __future__ import annotations

import enum
import functools
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from types import MappingProxyType

from kproxy_nft.compile.iptables import (
    FILTER_CHAINS,
    NAT_CHAINS,
    SERVICE_CHAIN_PREFIXES,
    BuiltinJump,
    Chain,
    Ruleset,
    ServiceRules,
    Table,
)
from kproxy_nft.kernel.iptables_rule import canonical, jump_target
from kproxy_nft.kernel.iptables_text import BUILTIN_CHAINS, KernelChain, KernelState, KernelTable
from kproxy_nft.model import IPFamily, Protocol, ServicePortName

# The tables we write to, in payload order: nat first, because it holds nearly all the rules and
# the first table of a payload needs no `--test` pass (see `iptables.apply`).
MANAGED_TABLES = ("nat", "filter")
_FIXED_CHAINS: Mapping[str, frozenset[str]] = {"filter": frozenset(FILTER_CHAINS), "nat": frozenset(NAT_CHAINS)}


def is_owned(table: str, chain: str) -> bool:
    """A chain name the compiler generates in this table (see the module docstring)."""
    return chain in _FIXED_CHAINS.get(table, frozenset()) or chain.startswith(SERVICE_CHAIN_PREFIXES)


def _ownership(table: str) -> Callable[[str], bool]:
    """`is_owned` for one table. Every chain the compiler makes passes it (a test checks that)."""
    return functools.partial(is_owned, table)


class PlanError(ValueError):
    """The desired rules and the kernel state cannot be reconciled (e.g. families differ)."""


# ---------------------------------------------------------------------------------------------
# the plan as data
# ---------------------------------------------------------------------------------------------


class ChainChangeKind(enum.StrEnum):
    ADDED = "added"
    CHANGED = "changed"
    DELETED = "deleted"


@dataclass(frozen=True, order=True, slots=True)  # slots: a first sync at 10k makes 110,000
class ChainChange:
    table: str
    chain: str
    kind: ChainChangeKind
    owner: ServicePortName | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.table}/{self.chain}"


class JumpChangeKind(enum.StrEnum):
    INSERTED = "inserted"
    DELETED = "deleted"


@dataclass(frozen=True)
class JumpChange:
    """A rule of a built-in chain that jumps to one of ours, inserted or deleted."""

    table: str
    chain: str
    rule: str
    kind: JumpChangeKind


@dataclass(frozen=True)
class ServiceChanges:
    """The chains one service port (or, with owner None, the shared chains) gains, changes, loses."""

    owner: ServicePortName | None
    added: tuple[ChainChange, ...] = ()
    changed: tuple[ChainChange, ...] = ()
    deleted: tuple[ChainChange, ...] = ()


@dataclass(frozen=True, slots=True)
class ChainRules:
    """A chain's rules written whole, standing for one `-A CHAIN rule` line each in a
    `TableEdit`. The lines are made only as they are sent: at 10,000 services a first sync
    writes 330,000 of them, 65 MiB if made all at once."""

    chain: str
    rules: tuple[str, ...]

    def lines(self) -> Iterator[str]:
        for rule in self.rules:
            yield f"-A {self.chain} {rule}" if rule else f"-A {self.chain}"


@dataclass(frozen=True)
class TableEdit:
    """The payload lines of one table, between `*table` and `COMMIT` (`ChainRules` stand for
    their `-A` lines)."""

    table: str
    lines: tuple[str | ChainRules, ...]

    def text_lines(self) -> Iterator[str]:
        """Every line, `ChainRules` made into theirs."""
        for line in self.lines:
            if isinstance(line, str):
                yield line
            else:
                yield from line.lines()

    @property
    def line_count(self) -> int:
        return sum(1 if isinstance(line, str) else len(line.rules) for line in self.lines)

    def rules_written(self) -> int:
        """How many `-A` and `-I` lines (rules written) it has."""
        return sum(len(line.rules) if isinstance(line, ChainRules) else line.startswith(("-A ", "-I "))
                   for line in self.lines)

    def chunks(self) -> Iterator[str]:
        """The lines as text, each followed by a newline, some at a time (for writing)."""
        batch: list[str] = []
        for line in self.text_lines():
            batch.append(line)
            if len(batch) >= 4096:
                yield "\n".join(batch) + "\n"
                batch.clear()
        if batch:
            yield "\n".join(batch) + "\n"

    def render(self) -> list[str]:
        return [f"*{self.table}", *self.text_lines(), "COMMIT"]


@dataclass(frozen=True)
class Plan:
    """What to send to `iptables-restore --noflush` to go from `before` to `after`."""

    family: IPFamily
    edits: tuple[TableEdit, ...]
    chains: tuple[ChainChange, ...]
    jumps: tuple[JumpChange, ...]
    before: KernelState
    after: KernelState

    @property
    def is_empty(self) -> bool:
        """Nothing to change: applying sends no transaction at all."""
        return not self.edits

    @property
    def payload(self) -> str:
        """The `iptables-restore --noflush` input (empty when there is nothing to do). Made
        whole here, for showing and for errors; `kernel.iptables.apply` writes it in pieces."""
        lines = [line for edit in self.edits for line in edit.render()]
        return "\n".join([*lines, ""]) if lines else ""  # the final newline without a copy of the text

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(edit.table for edit in self.edits)

    def touched(self, table: str) -> frozenset[str]:
        """The chains of `table` this plan adds, changes or deletes."""
        return frozenset(c.chain for c in self.chains if c.table == table)

    def payload_line(self, number: int) -> str | None:
        """Line `number` (1-based, as iptables-restore counts) of the payload."""
        lines = self.payload.splitlines()
        return lines[number - 1] if 0 < number <= len(lines) else None

    @property
    def services(self) -> tuple[ServiceChanges, ...]:
        """Chain changes grouped by owning service port; the shared chains (owner None) first."""
        groups: dict[ServicePortName | None, list[ChainChange]] = {}
        for change in self.chains:
            groups.setdefault(change.owner, []).append(change)

        def of(changes: list[ChainChange], kind: ChainChangeKind) -> tuple[ChainChange, ...]:
            return tuple(sorted(c for c in changes if c.kind is kind))

        return tuple(
            ServiceChanges(owner, *(of(changes, kind) for kind in ChainChangeKind))
            for owner, changes in sorted(groups.items(), key=lambda kv: (kv[0] is not None, kv[0] or _NOBODY))
        )


_NOBODY = ServicePortName("", "", "")


# ---------------------------------------------------------------------------------------------
# comparing rules
# ---------------------------------------------------------------------------------------------


def same_rules(desired: Sequence[str], current: Sequence[str], family: IPFamily) -> bool:
    """Whether two rule lists are the same in the kernel's eyes.

    Cheapest test first. Equal text: a state kept from our own apply holds our text, so
    unchanged chains never pay for canonicalization. Then `canonical(desired) == current`: text
    read from iptables-save is already canonical (a fixpoint of `canonical`, checked against
    the kernel in the tests), so it need not be canonicalized again; were it not, this could
    only report a difference, never hide one. Last, both canonicalized.
    """
    if len(desired) != len(current):
        return False
    for ours, theirs in zip(desired, current, strict=True):
        if ours == theirs:
            continue
        canon = canonical(ours, family)
        if canon != theirs and canon != canonical(theirs, family):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# building one table's edit
# ---------------------------------------------------------------------------------------------


class _TableEditor:
    """Collects one table's changes and the resulting table (see the module docstring for order)."""

    def __init__(self, current: KernelTable, family: IPFamily, owned: Callable[[str], bool]) -> None:
        self.current = current
        self.family = family
        self.owned = owned
        # Becomes the table after; a copy of the mappingproxy's dict (C speed, unlike dict(proxy)).
        self.chains: dict[str, KernelChain] = current.chains.copy()  # type: ignore[attr-defined]
        self.declare: list[str] = []
        self.rules: list[ChainRules] = []
        self.builtin: list[str] = []
        self.delete: list[str] = []
        self.chain_changes: list[ChainChange] = []
        self.jump_changes: list[JumpChange] = []

    def sync_chains(self, target: Sequence[Chain], removed: Collection[str] | None = None) -> None:
        """Make our chains exactly `target`: add, rewrite, delete.

        With `removed` (a partial plan, see `Focus`), `target` is only part of our chains and
        only the chains named in `removed` are candidates for deletion.

        This loop sees every chain on every sync (110,000 at 10,000 services), hence the inline
        identity/equality test before `same_rules`: the compiler memoizes unchanged services, so
        their rules are the very tuples the previous plan stored in `after`.
        """
        table = self.current.name
        chains = self.chains  # still the current chains, as a plain dict (faster than the proxy)
        family = self.family
        seen = []
        for chain in target:
            name, rules = chain.name, chain.rules
            seen.append(name)
            existing = chains.get(name)
            if existing is not None:
                now = existing.rules
                if now is rules or now == rules:
                    continue
                if same_rules(rules, now, family):
                    # The kernel holds these rules; remember them in our spelling, so that the
                    # next plan against `after` finds them equal by text, at no cost.
                    self.chains[name] = KernelChain(name, rules)
                    continue
            kind = ChainChangeKind.ADDED if existing is None else ChainChangeKind.CHANGED
            self.declare.append(name)
            self.rules.append(ChainRules(name, rules))
            self.chains[name] = KernelChain(name, rules)
            self.chain_changes.append(ChainChange(table, name, kind, chain.owner))
        current = self.current.chains
        # Set operations (C speed over every chain): what is not wanted is stale if it is ours,
        # else built-in or someone else's.
        if removed is None:
            gone = current.keys() - set(seen)
        else:
            gone = {name for name in removed if name in current} - set(seen)
        stale = [current[n] for n in sorted(gone) if not current[n].builtin and self.owned(n)]
        if not stale:
            return
        pinned = self._referenced_by_others(gone)
        # Chains of a service that still exists belong to it; only those changed can be involved.
        guess = _owner_guesser(stale, {c.owner for c in self.chain_changes if c.owner is not None})
        for old in stale:
            if old.name not in pinned:
                self.declare.append(old.name)
                self.delete.append(old.name)
                del self.chains[old.name]
                self.chain_changes.append(ChainChange(table, old.name, ChainChangeKind.DELETED, guess(old)))
            elif old.rules:
                # Someone else's rule jumps here: deleting is impossible, emptying is the most we may do.
                self.declare.append(old.name)
                self.chains[old.name] = KernelChain(old.name)
                self.chain_changes.append(ChainChange(table, old.name, ChainChangeKind.CHANGED, guess(old)))

    def _referenced_by_others(self, unwanted: Iterable[str]) -> set[str]:
        """Chains that rules outside our chains (and outside our jumps) refer to.

        Only `unwanted` chains (those not in the desired rules) can be other than ours.
        """
        refs = set()
        for name in unwanted:
            chain = self.current.chains[name]
            if self.owned(name):
                continue
            for rule in chain.rules:
                target = jump_target(rule)
                if target is not None and not (chain.builtin and self.owned(target)):
                    refs.add(target)
        return refs

    def sync_jumps(self, wanted: Sequence[BuiltinJump]) -> None:
        """Each wanted jump exactly once per built-in chain; other jumps into our chains removed.

        A jump present once stays where it is. Duplicates are all deleted and the jump inserted
        again at the top, where kube-proxy puts it: deleting by rule text (`-D CHAIN rule`)
        removes the first copy, and positions are not to be trusted (a cached state may be
        older than other software's edits), so keeping a particular copy is not an option.
        """
        table = self.current.name
        names = _builtin_chains(self.current)
        names += [j.chain for j in wanted if j.chain not in names]
        for name in dict.fromkeys(names):
            want = {canonical(j.rule, self.family): j.rule for j in wanted if j.chain == name}
            current = self.current.rules(name)
            # A wanted jump to a chain we don't own (KUBE-FIREWALL) counts as ours while wanted.
            canons = [canonical(rule, self.family) for rule in current]
            ours = [c if self._ours(rule) or c in want else None for rule, c in zip(current, canons, strict=True)]
            counts = Counter(c for c in ours if c is not None)
            keep = {c for c, n in counts.items() if n == 1 and c in want}
            remaining = []
            for rule, canon in zip(current, ours, strict=True):
                if canon is None or canon in keep:
                    remaining.append(rule)
                    continue
                self.builtin.append(f"-D {name} {rule}")
                self.jump_changes.append(JumpChange(table, name, rule, JumpChangeKind.DELETED))
            missing = [rule for canon, rule in want.items() if canon not in keep]
            for rule in reversed(missing):
                self.builtin.append(f"-I {name} 1 {rule}")
                self.jump_changes.append(JumpChange(table, name, rule, JumpChangeKind.INSERTED))
            if missing or len(remaining) != len(current):
                self.chains[name] = KernelChain(name, (*missing, *remaining), self._policy(name))

    def restore_jumps(self, target: KernelTable) -> None:
        """Put our jumps in built-in chains back where `target` had them, by position (to revert).

        Positions matter here: the point is to leave the chain as it was, not just equivalent.
        Only rules that jump to our chains are deleted or inserted; other rules stay put.
        """
        table = self.current.name
        names = _builtin_chains(self.current) + _builtin_chains(target)
        for name in dict.fromkeys(names):
            now, then = self.current.rules(name), target.rules(name)
            if same_rules(now, then, self.family):
                continue
            result = list(now)
            matcher = SequenceMatcher(
                a=[canonical(r, self.family) for r in now], b=[canonical(r, self.family) for r in then], autojunk=False
            )
            # Back to front, so that the positions of earlier regions stay valid.
            for tag, i1, i2, j1, j2 in reversed(matcher.get_opcodes()):
                if tag == "equal":
                    continue
                for position in range(i2, i1, -1):
                    if self._ours(now[position - 1]):
                        self.builtin.append(f"-D {name} {position}")
                        self.jump_changes.append(JumpChange(table, name, now[position - 1], JumpChangeKind.DELETED))
                        del result[position - 1]
                ours = [rule for rule in then[j1:j2] if self._ours(rule)]
                for offset, rule in enumerate(ours):
                    self.builtin.append(f"-I {name} {i1 + 1 + offset} {rule}")
                    self.jump_changes.append(JumpChange(table, name, rule, JumpChangeKind.INSERTED))
                    result.insert(i1 + offset, rule)
            self.chains[name] = KernelChain(name, tuple(result), self._policy(name, target))

    def _ours(self, rule: str) -> bool:
        target = jump_target(rule)
        return target is not None and self.owned(target)

    def _policy(self, name: str, other: KernelTable | None = None) -> str:
        for table in (self.current, other):
            found = table.chains.get(name) if table else None
            if found is not None and found.policy:
                return found.policy
        return "ACCEPT"

    def result(self) -> tuple[TableEdit | None, KernelTable]:
        after = KernelTable(self.current.name, MappingProxyType(self.chains))  # handed over, not copied
        lines: list[str | ChainRules] = [f":{name} - [0:0]" for name in self.declare]
        lines += self.rules
        lines += self.builtin
        lines += [f"-X {name}" for name in self.delete]
        return (TableEdit(self.current.name, tuple(lines)) if lines else None), after


def _builtin_chains(table: KernelTable) -> list[str]:
    """The built-in chains a table has, without looking at all its (possibly 110,000) chains."""
    return [name for name in BUILTIN_CHAINS.get(table.name, ()) if name in table.chains]


_COMMENT = re.compile(r'--comment\s+(?:"((?:[^"\\]|\\.)*)"|(\S+))')
_PROTO = re.compile(r"(?:^|\s)-p\s+(\w+)")
_PORT_NAME = re.compile(r"([^/\s]+)/([^:\s]+)(?::(\S+))?")


def _owner_guesser(
    stale: Iterable[KernelChain], owners: Iterable[ServicePortName]
) -> Callable[[KernelChain], ServicePortName | None]:
    """Who a chain found in the kernel belonged to, for the summary only.

    The kernel does not know; kube-proxy's comments do: every rule of a service chain starts its
    comment with `ns/name:port`. The protocol comes from any `-p` among all stale chains of that
    name, and a name that is still wanted maps to the wanted owner itself.
    """
    known = {str(o): o for o in owners}
    protocols: dict[str, Protocol] = {}
    names: dict[str, str | None] = {}
    for chain in stale:
        name = None
        for rule in chain.rules:
            m = _COMMENT.search(rule)
            if m and name is None:
                name = (m.group(1) or m.group(2) or "").split(" ")[0]
            p = _PROTO.search(rule)
            if name and p and p.group(1).upper() in Protocol.__members__:
                protocols.setdefault(name, Protocol[p.group(1).upper()])
        names[chain.name] = name

    def guess(chain: KernelChain) -> ServicePortName | None:
        name = names.get(chain.name)
        if not name:
            return None
        if name in known:
            return known[name]
        m = _PORT_NAME.fullmatch(name)
        if not m:
            return None
        return ServicePortName(m.group(1), m.group(2), m.group(3) or "", protocols.get(name, Protocol.TCP))

    return guess


# ---------------------------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------------------------


def _finish(family: IPFamily, before: KernelState, editors: Iterable[_TableEditor]) -> Plan:
    edits: list[TableEdit] = []
    chains: list[ChainChange] = []
    jumps: list[JumpChange] = []
    after = before
    for editor in editors:
        edit, table = editor.result()
        if edit is not None:
            edits.append(edit)
        after = after.replace_table(table)  # also when only our spelling of equal rules changed
        chains += editor.chain_changes
        jumps += editor.jump_changes
    return Plan(family, tuple(edits), tuple(chains), tuple(jumps), before, after)


@dataclass(frozen=True)
class Focus:
    """What a partial plan compares: the shared chains, these service chains, these removals.

    For an agent's partial sync: `current` is the state the previous plan left, and the
    desired rules differ from it only in the chains of the changed service ports (`chains`,
    their names before and after) and in the shared chains; `removed` are chains those
    services no longer have. Everything else is taken as equal, unread: O(changed).
    """

    chains: frozenset[str]
    removed: frozenset[str]


def focus_of(
    old: Mapping[ServicePortName, ServiceRules], new: Mapping[ServicePortName, ServiceRules],
    changed: Collection[ServicePortName],
) -> Focus:
    """The focus of a partial plan from the fragments before and after the `changed` ports."""
    before = {c.name for name in changed if name in old for c in old[name].chains}
    after = {c.name for name in changed if name in new for c in new[name].chains}
    return Focus(frozenset(before | after), frozenset(before - after))


def plan(desired: Ruleset, current: KernelState, focus: Focus | None = None) -> Plan:
    """The changes that make our chains and jumps in `current` equal to `desired`. Pure."""
    if desired.family is not current.family:
        raise PlanError(f"desired rules are IPv{desired.family.value}, the kernel state IPv{current.family.value}")
    editors = []
    for name in MANAGED_TABLES:
        table = next((t for t in desired.tables if t.name == name), Table(name, ()))
        editor = _TableEditor(current.table(name), current.family, _ownership(name))
        if focus is None:
            editor.sync_chains(table.chains)
        else:
            wanted = focus.chains
            editor.sync_chains([c for c in table.chains if c.owner is None or c.name in wanted], focus.removed)
        editor.sync_jumps([j for j in desired.jumps if j.table == name])
        editors.append(editor)
    return _finish(current.family, current, editors)


def nothing_wanted(family: IPFamily) -> Ruleset:
    """A ruleset with none of our chains and no jumps: planning towards it removes everything of ours."""
    return Ruleset(family, tuple(Table(name, ()) for name in MANAGED_TABLES), ())


def cleanup_plan(current: KernelState) -> Plan:
    """Remove everything we own: jumps from built-in chains, then flush and delete our chains."""
    return plan(nothing_wanted(current.family), current)


def revert_plan(
    before: KernelState, current: KernelState, touched: Callable[[str], Collection[str]] | None = None
) -> Plan:
    """Take our chains and the built-in chains of `current` back to exactly what `before` had.

    Only tables present in `before` are considered; other chains are left alone as always.
    With `touched` (a plan's `Plan.touched`), only the chains it names per table are taken
    back, which is what undoing that plan needs. It is required when `before` holds only part
    of our chains (an agent's partial plan): every chain of ours not in `before` would
    otherwise be deleted.
    """
    editors = []
    for name in MANAGED_TABLES:
        if name not in before.tables:
            continue
        then = before.table(name)
        editor = _TableEditor(current.table(name), current.family, _ownership(name))
        scope = None if touched is None else touched(name)
        editor.sync_chains(
            [Chain(c.name, c.rules) for c in then.chains.values()
             if not c.builtin and is_owned(name, c.name) and (scope is None or c.name in scope)],
            scope,
        )
        editor.restore_jumps(then)
        editors.append(editor)
    return _finish(current.family, current, editors)

