"""Pure planning for nftables: desired rulesets vs. what we applied (or what the kernel holds) → one transaction.

Two plans, both functions of their arguments only (no I/O, no clock, no transport):

* `plan_incremental(applied, desired, changed, affinity_entries)` compares the desired rulesets
  (from `compile.nftables`) with `Applied`, our record of the last successful transaction,
  *by key*: service ports whose fragment is the same object (the compiler memoizes them) are
  skipped outright, and of the others only the elements that differ are sent. The chains a
  service port owns (external and firewall chains) are diffed with its fragment: created with
  it, rewritten (flush + rules) when their rules change, deleted with it (in the follow-up).
* `plan_full(kernel, desired, applied)` compares the desired rulesets with the kernel's tables
  as read (`nftables_text.KernelTable`, None for a missing table) and plans whatever makes them
  equal; the differences from `applied` are counted as drift (repairs).

Both return a `Step`: the transaction text, a follow-up transaction, a `PlanSummary`, and the
state each table is in once both have run (`Applied`, or for an incremental plan a `Delta` to
apply to the old record: copying 10,000 services' element counts would cost more than the plan).
`advance` turns the old record and a step into the new record.

Reads the planner needs are done by the caller and passed in. Incremental plans read nothing,
with one exception: ClientIP affinity entries live in dynamic maps the datapath fills. When an
endpoint leaves an affinity service, the entries pointing at it must go (kube-proxy deletes that
endpoint's affinity set): `affinity_maps_to_read` names the maps (only then, and only the
affected protocol's), the caller reads them and passes their entries to `plan_incremental`.
Each doomed entry is re-added with the value read, then deleted: `add` of an existing identical
element is a no-op, so an entry that expired since the read does not fail the transaction.

Ordering, as the kernel needs it. In one transaction: new chains are declared first (rules may
jump to each other), then changed chains are flushed and filled, then affinity entries, element
deletions, element additions, and (full syncs) deletions of unreferenced chains. Then:

* backend indexes (`@backends-*`) that are only deleted, and the chains a removed service port
  owned, go in a follow-up transaction run right after (see `_element_commands`: a packet may
  still be between two lookups, and kernels before 6.2 refuse to delete a chain in the
  transaction that drops its last reference, see `staleChains` in kube-proxy's proxier.go);
* shared chains (`lb-…`, `affinity-…`) that lose their last user are kept (`Applied.stale`) and
  deleted by the next full sync, once the kernel lists nothing pointing at them.

A table the plan creates (a node's first sync, or a table someone deleted) is loaded in parts
when it is big (`Step.loads`): libnftables holds about 1.7 KB per element while it runs a
transaction, 273 MB for the 160,000 elements of 10,000 Services × 10 endpoints, all of it in
the agent's own heap. The first transaction declares the table, its sets and chains; the
elements follow in transactions of at most `ELEMENTS_PER_LOAD`, the entry maps through which
packets reach a service's chains (`ENTRY_MAPS`) last. So a service becomes reachable only once
everything it uses (backends, firewall, hairpin, reject entries) is in, as in one transaction;
until then it is as unprogrammed as it was before the table existed. A table that already
exists is always changed in one transaction.

This module decides what to send; `kernel/nftables.py` reads the kernel, calls it and runs the
text; `nftables_text` parses listings; `nftables_fake` checks the text against a model of the
kernel's rules.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from kproxy_nft.compile.nftables import (
    BACKENDS_PREFIX,
    ELEMENTS_PER_COMMAND,
    SERVICE_IPS,
    SERVICE_NODEPORTS,
    TABLE,
    AffinityTarget,
    Chain,
    Ruleset,
    ServiceFragment,
    render_elements,
    render_table,
)
from kproxy_nft.kernel.nftables_text import Elements, KernelTable, is_dynamic
from kproxy_nft.model import ServicePortName, sort_key

ElementKey = tuple[str, str]  # (set, key)

# At most this many elements per transaction when a new table is loaded in parts (see the
# module docstring): ~35 MB of libnftables' working memory instead of 273 MB at 10k Services.
ELEMENTS_PER_LOAD = 5 * ELEMENTS_PER_COMMAND
# The maps that lead packets into a service's chains; every other set only serves rules or
# chains that these lead to.
ENTRY_MAPS = frozenset({SERVICE_IPS, SERVICE_NODEPORTS})
AffinityEntries = Mapping[tuple[str, str], Mapping[str, str | None]]  # (family, map) → key → value


# ---------------------------------------------------------------------------------------------
# what we applied
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Applied:
    """What one table holds after our last successful transaction.

    `elements` holds each set's elements (key → value); `shared` how many fragments hold an
    element that more than one does (the hairpin pair of an endpoint shared by several
    services is one element); any other element is held by one. Per set, and counts only where
    they are not 1: a flat (set, key) → count map cost 18 MB at 10k Services, this 6 MB.
    `stale` are chains of ours still in the kernel that nothing desires any more (deleted at
    the next full sync). Both maps are updated in place by `Delta.apply_to` (copying is
    O(cluster)).
    """

    ruleset: Ruleset
    elements: dict[str, dict[str, str | None]]
    shared: dict[ElementKey, int]
    stale: Mapping[str, Chain] = field(default_factory=dict)

    @classmethod
    def of(cls, ruleset: Ruleset, stale: Mapping[str, Chain] | None = None) -> Applied:
        applied = cls(ruleset, {}, {}, dict(stale or {}))
        for fragment in ruleset.fragments.values():
            for set_name, key, value in fragment.elements:
                held = applied.elements.setdefault(set_name, {})
                if key in held:
                    k = (set_name, key)
                    applied.shared[k] = applied.shared.get(k, 1) + 1
                else:
                    held[key] = value
        return applied

    def get(self, k: ElementKey) -> tuple[int, str | None]:
        """(how many fragments hold element `k`, its value); (0, None) if none does."""
        set_name, key = k
        held = self.elements.get(set_name)
        if held is None or key not in held:
            return 0, None
        return self.shared.get(k, 1), held[key]

    def put(self, k: ElementKey, count: int, value: str | None) -> None:
        """Record element `k` as held by `count` fragments (0: gone)."""
        set_name, key = k
        if count > 0:
            self.elements.setdefault(set_name, {})[key] = value
        else:
            self.elements.get(set_name, {}).pop(key, None)
        if count > 1:
            self.shared[k] = count
        else:
            self.shared.pop(k, None)

    def element_count(self) -> int:
        """How many elements the table holds."""
        return sum(len(held) for held in self.elements.values())

    def chains(self) -> dict[str, Chain]:
        """The shared chains we applied, stale ones included (not those fragments own)."""
        return {**self.stale, **{c.name: c for c in self.ruleset.chains}}


@dataclass(frozen=True)
class Delta:
    """An incremental plan's effect on `Applied`: only the touched elements (count 0: gone)."""

    ruleset: Ruleset
    elements: Mapping[ElementKey, tuple[int, str | None]]
    stale: Mapping[str, Chain]

    def apply_to(self, applied: Applied) -> Applied:
        """The record after the plan; `applied` is updated in place and must not be used again."""
        for k, (count, value) in self.elements.items():
            applied.put(k, count, value)
        return Applied(self.ruleset, applied.elements, applied.shared, self.stale)


@dataclass(frozen=True)
class PlanSummary:
    """What a plan does, in numbers (for logs, metrics and tests)."""

    full: bool = False
    services_changed: int = 0
    chains_added: int = 0
    chains_changed: int = 0
    chains_deleted: int = 0
    elements_added: int = 0
    elements_deleted: int = 0
    affinity_entries_deleted: int = 0
    rebuilt_tables: int = 0
    drift: int = 0  # full sync: kernel differences from what we had applied, repaired by this plan

    def __add__(self, other: PlanSummary) -> PlanSummary:
        return PlanSummary(
            self.full or other.full,
            *(getattr(self, f) + getattr(other, f) for f in _COUNTERS),
        )

    def __str__(self) -> str:
        kind = "full" if self.full else "incremental"
        counts = ", ".join(f"{f.replace('_', ' ')} {getattr(self, f)}" for f in _COUNTERS if getattr(self, f))
        return f"{kind} sync: {counts or 'no changes'}"


_COUNTERS = (
    "services_changed", "chains_added", "chains_changed", "chains_deleted", "elements_added",
    "elements_deleted", "affinity_entries_deleted", "rebuilt_tables", "drift",
)


@dataclass(frozen=True)
class Step:
    """One plan: the transaction, its follow-up, what they do, and the state they lead to."""

    text: str
    followup: str
    summary: PlanSummary
    next_state: Mapping[str, Applied | Delta]  # per nft family
    loads: tuple[str, ...] = ()  # transactions run after `text`: the rest of a new table's elements

    @property
    def is_empty(self) -> bool:
        return not self.text and not self.followup


def advance(applied: Mapping[str, Applied] | None, step: Step) -> dict[str, Applied]:
    """Our record once `step` has run. An incremental step updates `applied` in place."""
    out: dict[str, Applied] = {} if step.summary.full or applied is None else dict(applied)
    for family, state in step.next_state.items():
        out[family] = state.apply_to(out[family]) if isinstance(state, Delta) else state
    return out


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------


class _Commands:
    """Commands of one transaction and its follow-up, kept in the order the kernel needs them."""

    def __init__(self) -> None:
        self.declare: list[str] = []  # new chains (rules may jump to each other)
        self.rules: list[str] = []  # flush + rules of new or changed chains
        self.affinity: list[str] = []
        self.deletes: list[str] = []
        self.adds: list[str] = []
        self.drop_chains: list[str] = []
        self.followup: list[str] = []  # a second transaction, see `_element_commands`
        self.new_table_elements: list[str] = []  # may be loaded in parts (module docstring)

    def step(self, summary: PlanSummary, next_state: Mapping[str, Applied | Delta]) -> Step:
        # `add element` commands hold at most ELEMENTS_PER_COMMAND elements each.
        per_load = max(ELEMENTS_PER_LOAD // ELEMENTS_PER_COMMAND, 1)
        new, loads = self.new_table_elements, []
        if len(new) > per_load:
            new, rest = new[:per_load], new[per_load:]
            loads = ["\n".join(rest[i:i + per_load]) + "\n" for i in range(0, len(rest), per_load)]
        lines = [*self.declare, *self.rules, *self.affinity, *self.deletes, *self.adds, *new, *self.drop_chains]
        text = "\n".join([*lines, ""]) if lines else ""  # the final newline without a copy of the text
        followup = "\n".join(self.followup) + "\n" if self.followup else ""
        return Step(text, followup, summary, next_state, tuple(loads))


def _chain_commands(t: _Commands, family: str, chain: Chain, existing: bool) -> None:
    """Make `chain` hold exactly its rules: declare it if new, else flush it first."""
    if existing:
        t.rules.append(f"flush chain {family} {TABLE} {chain.name}")
    else:
        t.declare.append(_declaration(family, chain))
    t.rules += [f"add rule {family} {TABLE} {chain.name} {rule}" for rule in chain.rules]


def _declaration(family: str, chain: Chain) -> str:
    """`add chain …`: creates the chain, and is a no-op when it exists with that header."""
    if chain.hook is not None:
        return f"add chain {family} {TABLE} {chain.name} {{ {chain.hook.header()} }}"
    return f"add chain {family} {TABLE} {chain.name}"


def _element_commands(
    t: _Commands,
    family: str,
    deletes: Mapping[str, list[str]],
    adds: Mapping[str, list[str]],
) -> None:
    """Element deletions and additions; backend indexes that go away are deleted afterwards.

    A packet's set lookups each read the kernel's generation anew, so one that looked up
    `service-ips` before a commit (→ `lb-tcp-3`) can look up `backends-tcp` after it. When a
    service shrinks from 3 endpoints to 2, its index 2 must still be there for that packet, or
    it is not DNATed at all (and is then rejected as traffic to a ClusterIP port without
    rules). So indexes that are only deleted go in a follow-up transaction, run right after:
    by then no packet can still hold the old `goto`. Until then they are unreachable for new
    lookups of `service-ips`, and point at what that packet would have got a moment earlier.
    """
    for set_name, keys in deletes.items():
        if set_name.startswith(BACKENDS_PREFIX):
            readded = {item.partition(" : ")[0] for item in adds.get(set_name, ())}
            later = [key for key in keys if key not in readded]
            keys = [key for key in keys if key in readded]
            t.followup += render_elements(family, set_name, later, verb="delete")
        t.deletes += render_elements(family, set_name, keys, verb="delete")
    for set_name, items in adds.items():
        t.adds += render_elements(family, set_name, items)


def _item(key: str, value: str | None) -> str:
    return key if value is None else f"{key} : {value}"


# ---------------------------------------------------------------------------------------------
# incremental plans
# ---------------------------------------------------------------------------------------------


def can_plan_incrementally(applied: Mapping[str, Applied] | None, desired: Iterable[Ruleset]) -> bool:
    """Whether `plan_incremental` applies: we know each table, and its declarations are unchanged."""
    return applied is not None and all(
        r.nft_family in applied and applied[r.nft_family].ruleset.sets == r.sets for r in desired
    )


def affinity_maps_to_read(
    applied: Mapping[str, Applied],
    desired: Sequence[Ruleset],
    changed: Collection[ServicePortName] | None = None,
) -> list[tuple[str, str]]:
    """(family, map) of the dynamic affinity maps `plan_incremental` needs the entries of."""
    maps: set[tuple[str, str]] = set()
    for ruleset in desired:
        family = ruleset.nft_family
        for before, after in _changed_fragments(applied[family].ruleset.fragments, ruleset.fragments, changed):
            if before is not None and before.affinity is not None:
                lost = _lost_affinity(before.affinity, after.affinity if after is not None else None)
                maps.update((family, m) for m, _, _ in lost)
    return sorted(maps)


def plan_incremental(
    applied: Mapping[str, Applied],
    desired: Sequence[Ruleset],
    changed: Collection[ServicePortName] | None = None,
    affinity_entries: AffinityEntries | None = None,
) -> Step:
    """The transaction from what we applied to `desired` (see `can_plan_incrementally`).

    `changed`, when given, promises that every other service port's fragment is the one last
    applied (as `compile.nftables.update_ruleset` makes them): only those are compared.
    `affinity_entries` holds the current entries of the maps `affinity_maps_to_read` named.
    """
    t = _Commands()
    summary = PlanSummary()
    next_state: dict[str, Applied | Delta] = {}
    for ruleset in desired:
        delta, s = _plan_table(t, applied[ruleset.nft_family], ruleset, changed, affinity_entries or {})
        next_state[ruleset.nft_family] = delta
        summary += s
    return t.step(summary, next_state)


def _plan_table(
    t: _Commands,
    applied: Applied,
    desired: Ruleset,
    hint: Collection[ServicePortName] | None,
    affinity_entries: AffinityEntries,
) -> tuple[Delta, PlanSummary]:
    """One table's incremental commands: shared chains, then each changed fragment's part."""
    family = desired.nft_family
    added, changed, stale = _shared_chain_commands(t, family, applied, desired)
    tally = _Tally(applied)
    lost_affinity: list[tuple[str, frozenset[str], frozenset[str]]] = []
    services_changed = chains_deleted = 0
    for before, after in _changed_fragments(applied.ruleset.fragments, desired.fragments, hint):
        services_changed += 1
        tally.remove(before.elements if before else ())
        tally.add(after.elements if after else ())
        a, c, d = _own_chain_commands(t, family, before, after, stale)
        added, changed, chains_deleted = added + a, changed + c, chains_deleted + d
        if before is not None and before.affinity is not None:
            lost_affinity += _lost_affinity(before.affinity, after.affinity if after is not None else None)
    deletes, adds = tally.commands()
    _element_commands(t, family, deletes, adds)
    affinity_deleted = _affinity_cleanup(t, family, lost_affinity, affinity_entries)
    summary = PlanSummary(
        services_changed=services_changed,
        chains_added=added,
        chains_changed=changed,
        chains_deleted=chains_deleted,
        elements_added=sum(len(v) for v in adds.values()),
        elements_deleted=sum(len(v) for v in deletes.values()),
        affinity_entries_deleted=affinity_deleted,
    )
    return Delta(desired, tally.delta(), stale), summary


def _shared_chain_commands(
    t: _Commands, family: str, applied: Applied, desired: Ruleset
) -> tuple[int, int, dict[str, Chain]]:
    """Declare or rewrite the shared chains that differ; (added, changed, chains left stale)."""
    old_chains = applied.chains()
    new_chains = {c.name: c for c in desired.chains}
    added = changed = 0
    for name, chain in new_chains.items():
        old = old_chains.get(name)
        if old is None or old.rules != chain.rules or old.hook != chain.hook:
            _chain_commands(t, family, chain, existing=old is not None)
            added += old is None
            changed += old is not None
    return added, changed, {n: c for n, c in old_chains.items() if n not in new_chains}


class _Tally:
    """Element reference counts as the changed fragments leave them (touched keys only)."""

    def __init__(self, applied: Applied) -> None:
        self.applied = applied
        self.before: dict[ElementKey, tuple[int, str | None]] = {}
        self.counts: dict[ElementKey, int] = {}
        self.values: dict[ElementKey, str | None] = {}

    def _touch(self, k: ElementKey) -> None:
        if k not in self.before:
            self.before[k] = self.applied.get(k)
            self.counts[k], self.values[k] = self.before[k]

    def remove(self, elements: Iterable[tuple[str, str, str | None]]) -> None:
        for set_name, key, _ in elements:
            k = (set_name, key)
            self._touch(k)
            self.counts[k] -= 1

    def add(self, elements: Iterable[tuple[str, str, str | None]]) -> None:
        for set_name, key, value in elements:
            k = (set_name, key)
            self._touch(k)
            if self.counts[k] <= 0:
                self.values[k] = value
            self.counts[k] += 1

    def commands(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """Per set: keys to delete and elements to add (a changed value is both), by key order."""
        deletes: dict[str, list[str]] = {}
        adds: dict[str, list[str]] = {}
        for (set_name, key), (count, value) in sorted(self.before.items()):
            new_count, new_value = self.counts[(set_name, key)], self.values[(set_name, key)]
            was, now = count > 0, new_count > 0
            if was and (not now or new_value != value):
                deletes.setdefault(set_name, []).append(key)
            if now and (not was or new_value != value):
                adds.setdefault(set_name, []).append(_item(key, new_value))
        return deletes, adds

    def delta(self) -> dict[ElementKey, tuple[int, str | None]]:
        return {k: (self.counts[k], self.values[k]) for k in self.before}


def _own_chain_commands(
    t: _Commands,
    family: str,
    before: ServiceFragment | None,
    after: ServiceFragment | None,
    stale: dict[str, Chain],
) -> tuple[int, int, int]:
    """Create, rewrite or delete the chains a changed service port owns; (added, changed, deleted).

    A chain that a full sync left behind as stale (still referenced then) is rewritten, not
    declared again, and is no longer stale. Chains that go are deleted in the follow-up
    transaction, once the element deletes that drop the last references to them (only their
    own fragment's elements point at them) are committed: kernels before 6.2 refuse both in
    one transaction (see `staleChains` in kube-proxy's proxier.go). Should the follow-up fail
    even so, the full sync after it keeps a still-referenced chain as stale for later.
    """
    old = {c.name: c for c in before.chains} if before is not None else {}
    new = {c.name: c for c in after.chains} if after is not None else {}
    added = changed = 0
    for name, chain in new.items():
        existing = old.get(name) or stale.pop(name, None)
        if existing is None or existing.rules != chain.rules:
            _chain_commands(t, family, chain, existing=existing is not None)
            added += existing is None
            changed += existing is not None
    gone = [name for name in old if name not in new]
    t.followup += [f"delete chain {family} {TABLE} {name}" for name in gone]
    return added, changed, len(gone)


def _changed_fragments(
    old: Mapping[ServicePortName, ServiceFragment],
    new: Mapping[ServicePortName, ServiceFragment],
    hint: Collection[ServicePortName] | None = None,
) -> list[tuple[ServiceFragment | None, ServiceFragment | None]]:
    """(before, after) of every service port whose fragment changed; None where it is absent.

    With a `hint` (the only names that may differ), only those are looked at: O(changed).

    The compiler memoizes fragments and emits service ports in a fixed order, so the common case
    is walked in lockstep with identity checks (no hashing of 10,000 names per sync); any
    difference in the sequence of names falls back to lookups by name.
    """
    changed: list[tuple[ServiceFragment | None, ServiceFragment | None]] = []
    if hint is not None:
        for name in sorted(hint, key=sort_key):
            before, after = old.get(name), new.get(name)
            if before is not after and before != after:
                changed.append((before, after))
        return changed
    if len(old) == len(new):
        for (k1, f1), (k2, f2) in zip(old.items(), new.items(), strict=True):
            if k1 is not k2 and k1 != k2:
                break
            if f1 is not f2 and f1 != f2:
                changed.append((f1, f2))
        else:
            return changed
        changed = []
    for name, after in new.items():
        before = old.get(name)
        if before is not after and before != after:
            changed.append((before, after))
    changed += [(before, None) for name, before in old.items() if name not in new]
    return changed


def _lost_affinity(
    before: AffinityTarget, after: AffinityTarget | None
) -> list[tuple[str, frozenset[str], frozenset[str]]]:
    """(map, key suffixes, endpoints) of the affinity entries a fragment change invalidates.

    A destination the service port no longer has loses all its entries; one it keeps loses
    those pointing at endpoints that left.
    """
    kept_suffixes = after.suffixes if after is not None and after.map == before.map else frozenset()
    kept_endpoints = after.endpoints if after is not None else frozenset()
    out = []
    if before.suffixes - kept_suffixes:
        out.append((before.map, before.suffixes - kept_suffixes, before.endpoints))
    if (before.suffixes & kept_suffixes) and before.endpoints - kept_endpoints:
        out.append((before.map, before.suffixes & kept_suffixes, before.endpoints - kept_endpoints))
    return out


def _affinity_cleanup(
    t: _Commands,
    family: str,
    lost: list[tuple[str, frozenset[str], frozenset[str]]],
    entries: AffinityEntries,
) -> int:
    """Commands deleting affinity entries that point at endpoints a service no longer has."""
    n = 0
    for map_name, suffixes, endpoints in lost:
        if (family, map_name) not in entries:
            raise ValueError(f"affinity map {family} {map_name} was not read (see affinity_maps_to_read)")
        doomed = [
            (k, v)
            for k, v in entries[(family, map_name)].items()
            if v in endpoints and any(k.endswith(suffix) for suffix in suffixes)
        ]
        for key, value in doomed:
            t.affinity.append(f"add element {family} {TABLE} {map_name} {{ {key} timeout 1s : {value} }}")
            t.affinity.append(f"delete element {family} {TABLE} {map_name} {{ {key} }}")
        n += len(doomed)
    return n


# ---------------------------------------------------------------------------------------------
# full plans
# ---------------------------------------------------------------------------------------------


def plan_full(
    kernel: Mapping[str, KernelTable | None],
    desired: Sequence[Ruleset],
    applied: Mapping[str, Applied] | None = None,
) -> Step:
    """Whatever makes the kernel's tables as read (`kernel`, per family) equal to `desired`.

    `applied`, our record (None: unknown), only serves to count drift.
    """
    t = _Commands()
    summary = PlanSummary(full=True)
    next_state: dict[str, Applied | Delta] = {}
    for ruleset in desired:
        family = ruleset.nft_family
        believed = applied.get(family) if applied is not None else None
        state, s = _plan_full_table(t, kernel.get(family), ruleset, believed)
        next_state[family] = state
        summary += s
    return t.step(summary, next_state)


def _plan_full_table(
    t: _Commands, kernel: KernelTable | None, desired: Ruleset, believed: Applied | None
) -> tuple[Applied, PlanSummary]:
    """Commands that make the kernel's table (as read) equal to `desired`."""
    drift = _drift(kernel, believed) if believed is not None else 0
    if kernel is None or _needs_rebuild(kernel, desired):
        return _rebuild_table(t, kernel is not None, desired, drift)
    family = desired.nft_family
    added = changed = 0
    for chain in desired.all_chains():
        existing = kernel.chains.get(chain.name)
        if existing is None or existing.rules != chain.expected_listing:
            _chain_commands(t, family, chain, existing=existing is not None)
            added += existing is None
            changed += existing is not None
    stale, doomed = _unwanted_chains(kernel, desired)
    t.drop_chains += [f"delete chain {family} {TABLE} {name}" for name in doomed]
    desired_elements = _static_elements(desired)
    kernel_elements = {name: dict(kernel.elements.get(name, {})) for name in desired_elements}
    deletes, adds = _diff_elements(kernel_elements, desired_elements)
    _element_commands(t, family, deletes, adds)
    summary = PlanSummary(
        full=True,
        chains_added=added,
        chains_changed=changed,
        chains_deleted=len(doomed),
        elements_added=sum(len(v) for v in adds.values()),
        elements_deleted=sum(len(v) for v in deletes.values()),
        drift=drift,
    )
    return Applied.of(desired, stale), summary


def _rebuild_table(t: _Commands, exists: bool, desired: Ruleset, drift: int) -> tuple[Applied, PlanSummary]:
    """Create (or replace) the whole table in this same transaction.

    For a missing table, or declarations/base chains that cannot be changed in place.
    """
    family = desired.nft_family
    if exists:
        t.declare.append(f"delete table {family} {TABLE}")
    t.declare += render_table(desired)
    n = 0
    static = _static_elements(desired)
    for set_name in sorted(static, key=lambda name: name in ENTRY_MAPS):  # entry maps last
        elements = static[set_name]
        commands = render_elements(family, set_name, (_item(k, v) for k, v in elements.items()))
        if exists:
            t.adds += commands  # replacing a table is atomic: no moment without it
        else:
            t.new_table_elements += commands
        n += len(elements)
    summary = PlanSummary(
        full=True,
        services_changed=len(desired.fragments),
        chains_added=sum(1 for _ in desired.all_chains()),
        elements_added=n,
        rebuilt_tables=int(exists),
        drift=drift,
    )
    return Applied.of(desired), summary


def _unwanted_chains(kernel: KernelTable, desired: Ruleset) -> tuple[dict[str, Chain], list[str]]:
    """Kernel chains nothing desires: (still pointed at, kept as stale; to delete now)."""
    wanted = {c.name for c in desired.all_chains()}
    referenced = _referenced_chains(kernel)
    stale: dict[str, Chain] = {}
    doomed: list[str] = []
    for name, listed in kernel.chains.items():
        if name in wanted:
            continue
        if name in referenced:
            stale[name] = Chain(name, listed.rules)  # still pointed at: delete at a later full sync
        else:
            doomed.append(name)
    return stale, doomed


def _needs_rebuild(kernel: KernelTable, desired: Ruleset) -> bool:
    """Declarations or base-chain hooks differ: these cannot be changed in place."""
    if {s.name: s for s in desired.sets} != dict(kernel.sets):
        return True
    for chain in desired.chains:
        existing = kernel.chains.get(chain.name)
        header = chain.hook.header() if chain.hook else None
        if existing is not None and existing.header != header:
            return True
    return any(c.header is not None and c.name not in {d.name for d in desired.chains} for c in kernel.chains.values())


def _referenced_chains(kernel: KernelTable) -> set[str]:
    """Chains a kernel element or rule still jumps to."""
    out = set()
    for elements in kernel.elements.values():
        for value in elements.values():
            if value and value.split(" ", 1)[0] in ("goto", "jump"):
                out.add(value.split(" ", 1)[1])
    for chain in kernel.chains.values():
        for rule in chain.rules:
            words = rule.split()
            out.update(words[i + 1] for i, w in enumerate(words[:-1]) if w in ("goto", "jump"))
    return out


def _drift(kernel: KernelTable | None, believed: Applied) -> int:
    """How many chains and elements the kernel holds differently from what we applied."""
    expected_chains = {c.name: c.expected_listing for c in believed.ruleset.all_chains()}
    expected_chains.update({n: c.expected_listing for n, c in believed.stale.items()})
    if kernel is None:
        return len(expected_chains) + believed.element_count()
    chains = kernel.chains
    n = sum(1 for name, rules in expected_chains.items() if name not in chains or chains[name].rules != rules)
    n += sum(1 for name in kernel.chains if name not in expected_chains)
    return n + _count_element_differences(dict(kernel.elements), _static_elements(believed.ruleset))


def _diff_elements(before: Elements, after: Elements) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Per set: keys to delete and elements to add (a changed value is both)."""
    deletes: dict[str, list[str]] = {}
    adds: dict[str, list[str]] = {}
    for set_name in sorted(set(before) | set(after)):
        old = before.get(set_name, {})
        new = after.get(set_name, {})
        for key, value in old.items():
            if key not in new or new[key] != value:
                deletes.setdefault(set_name, []).append(key)
        for key, value in new.items():
            if key not in old or old[key] != value:
                adds.setdefault(set_name, []).append(_item(key, value))
    return deletes, adds


def _count_element_differences(
    a: Mapping[str, Mapping[str, str | None]], b: Mapping[str, Mapping[str, str | None]]
) -> int:
    """How many keys are missing from one side or hold another value."""
    n = 0
    for set_name in set(a) | set(b):
        x, y = a.get(set_name, {}), b.get(set_name, {})
        n += sum(1 for k, v in x.items() if k not in y or y[k] != v)
        n += sum(1 for k in y if k not in x)
    return n


def _static_elements(ruleset: Ruleset) -> Elements:
    decls = {s.name: s for s in ruleset.sets}
    return {name: elems for name, elems in ruleset.elements().items() if not is_dynamic(decls[name])}


# ---------------------------------------------------------------------------------------------
# repairs of named objects
# ---------------------------------------------------------------------------------------------


def plan_objects(
    listed: Mapping[str, KernelTable],
    applied: Mapping[str, Applied],
    chains: Collection[str],
) -> Step:
    """Put back only the objects a kernel notification named, as we last applied them.

    `listed`, per family: a partial table holding just the named sets and maps as the kernel
    lists them (`nft list map …`); their elements are compared with our record. `chains`: our
    chains whose rules someone else changed, rewritten from the record without being read:
    the notification already proves they changed, and `nft list chain` costs as much as the
    whole table (about 1 s at 10,000 services, nft 1.0.6 fetches every chain's rules).
    Each is declared first (a no-op when it exists) in case it was deleted, in every family
    whose record holds it. The record stays as it is: the repair restores it.
    """
    t = _Commands()
    summary = PlanSummary()
    next_state: dict[str, Applied | Delta] = {}
    for family, record in applied.items():
        summary += _repair_objects(t, family, record, listed.get(family), chains)
        next_state[family] = Delta(record.ruleset, {}, record.stale)
    return t.step(summary, next_state)


def _repair_objects(
    t: _Commands, family: str, record: Applied, listed: KernelTable | None, chains: Collection[str]
) -> PlanSummary:
    """One table's part of `plan_objects`."""
    ours = {name: chain for name, chain in record.stale.items() if name in chains}
    ours.update((c.name, c) for c in record.ruleset.all_chains() if c.name in chains)
    for chain in ours.values():
        t.declare.append(_declaration(family, chain))
        _chain_commands(t, family, chain, existing=True)
    kernel_elements: Elements = {name: dict(elements) for name, elements in (listed.elements if listed else {}).items()}
    desired: Elements = {name: dict(record.elements.get(name, {})) for name in kernel_elements}
    deletes, adds = _diff_elements(kernel_elements, desired)
    _element_commands(t, family, deletes, adds)
    return PlanSummary(
        chains_changed=len(ours),
        elements_added=sum(len(v) for v in adds.values()),
        elements_deleted=sum(len(v) for v in deletes.values()),
        drift=len(ours) + _count_element_differences(kernel_elements, desired),
    )


__all__ = [
    "AffinityEntries",
    "Applied",
    "Delta",
    "ElementKey",
    "PlanSummary",
    "Step",
    "advance",
    "affinity_maps_to_read",
    "can_plan_incrementally",
    "plan_full",
    "plan_incremental",
    "plan_objects",
]
