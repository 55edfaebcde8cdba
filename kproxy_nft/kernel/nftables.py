"""Applying the nftables rulesets: one atomic transaction per sync, sending only what changed.

`NftablesBackend` owns the tables `ip kproxy-nft` and `ip6 kproxy-nft` and nothing else:

* `plan(desired)` compares the desired rulesets (from `compile.nftables`) with what this
  backend last applied, *by key*: service ports whose fragment is the same object (the compiler
  memoizes them) are skipped outright, and of the others only the elements that differ are
  sent. The chains a service port owns (external and firewall chains) are diffed with its
  fragment: created with it, rewritten (flush + rules) when their rules change, deleted with
  it in the same transaction. The result is a `Plan`: the transaction text, a summary, and
  `is_empty`.
* `apply(plan)` runs that text as one transaction, in-process through libnftables (one context
  kept for the backend's lifetime) or with `nft -f -` as the fallback. If the kernel refuses
  it, nothing changed (nft transactions are atomic) and neither does our record of the state.
* `full_sync(desired)` reads the kernel back (`nft -t -y list table` for chains and
  declarations, `nft -j list map` for elements), repairs any difference from what we had
  applied (counted in `Plan.summary.drift` and `repairs_total`), and applies the rest. The first
  sync of a backend is always a full one: until then we know nothing of the kernel.
* `cleanup()` deletes our two tables (if present), and only them.

Two deliberate exceptions to "no kernel reads on incremental syncs":

* ClientIP affinity entries live in dynamic maps the datapath fills. When an endpoint leaves an
  affinity service, the entries pointing at it must go (kube-proxy deletes that endpoint's
  affinity set), so the plan lists those maps — only then, and only the affected protocol's.
  Each entry is re-added with the value read, then deleted: `add` of an existing identical
  element is a no-op, so an entry that expired since the read does not fail the transaction.
* Shared chains (`lb-…`, `affinity-…`) that lose their last user are kept until the next full
  sync instead of being deleted in the transaction that removes the last map element pointing
  at them: with kernels before 6.2 the reference lingers briefly and the deletion fails (see
  `staleChains` in `pkg/proxy/nftables/proxier.go`). A service port's own chains, by
  contrast, are deleted at once, as a per-service chain must not outlive its service; on such
  a kernel that transaction would fail (not worked around: current kernels accept it).

Running in a network namespace (`netns`): libnftables calls are made from inside it (setns,
see `libnftables`), the `nft` command is run through `ip netns exec`.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kproxy_nft.compile.nftables import (
    BACKENDS_PREFIX,
    TABLE,
    AffinityTarget,
    Chain,
    Element,
    Ruleset,
    ServiceFragment,
    SetDecl,
    render_elements,
    render_table,
)
from kproxy_nft.kernel import libnftables
from kproxy_nft.kernel.runner import Completed, Runner, SubprocessRunner, in_netns
from kproxy_nft.model import IPFamily, ServicePortName, sort_key

NFT = "nft"
FAMILIES = {"ip": IPFamily.V4, "ip6": IPFamily.V6}


class NftablesError(RuntimeError):
    """nft refused a command; the message carries its error text."""


class StalePlanError(RuntimeError):
    """A plan computed against an older state of the backend was applied."""


# ---------------------------------------------------------------------------------------------
# running commands
# ---------------------------------------------------------------------------------------------


class Transport(Protocol):
    """Runs nft command buffers (one transaction each) and listings."""

    name: str

    def run(self, commands: str, output: libnftables.Output = libnftables.PLAIN) -> Completed: ...

    def close(self) -> None: ...


class LibnftablesTransport:
    """In-process: one libnftables context for the backend's lifetime."""

    name = "libnftables"

    def __init__(self, netns: str | None) -> None:
        self._nft = libnftables.Nftables(netns)

    def run(self, commands: str, output: libnftables.Output = libnftables.PLAIN) -> Completed:
        return self._nft.run(commands, output)

    def close(self) -> None:
        self._nft.close()


@dataclass
class CommandTransport:
    """The `nft` command (`ip netns exec NS nft …` for a namespace), fed on stdin."""

    netns: str | None = None
    runner: Runner = field(default_factory=SubprocessRunner)
    name: str = "nft"

    def run(self, commands: str, output: libnftables.Output = libnftables.PLAIN) -> Completed:
        chosen = (("-j", output.json), ("-t", output.terse), ("-y", output.numeric_priority))
        flags = [flag for flag, on in chosen if on]
        command = commands.strip()
        if "\n" not in command and any(on for _, on in chosen):
            # A listing goes on the command line: with -j, `nft -f` would parse its input as JSON.
            # Our listing commands are plain words (table, set and chain names), no quoting.
            return self.runner.run(in_netns(self.netns, [NFT, *flags, *command.split()]))
        return self.runner.run(in_netns(self.netns, [NFT, *flags, "-f", "-"]), input=commands)

    def close(self) -> None:
        pass


def make_transport(netns: str | None, use_libnftables: bool = True) -> Transport:
    """libnftables when asked for and loadable, else the `nft` command."""
    if use_libnftables and libnftables.available():
        return LibnftablesTransport(netns)
    return CommandTransport(netns)


# ---------------------------------------------------------------------------------------------
# reading the kernel
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelChain:
    name: str
    header: str | None  # `type … hook … priority …; policy …;` of a base chain
    rules: tuple[str, ...]


@dataclass(frozen=True)
class KernelTable:
    """Our table as the kernel has it: declarations and chains as listed, static elements."""

    family: str
    sets: Mapping[str, SetDecl]
    chains: Mapping[str, KernelChain]
    elements: Mapping[str, Mapping[str, str | None]]


def parse_terse_listing(text: str) -> tuple[dict[str, SetDecl], dict[str, KernelChain]]:
    """Sets/maps and chains of `nft -t -y list table` output (one table)."""
    sets, chains, _ = parse_listing(text)
    return sets, chains


def parse_listing(
    text: str,
) -> tuple[dict[str, SetDecl], dict[str, KernelChain], dict[str, dict[str, str | None]]]:
    """Sets/maps, chains and set elements of `nft -y list table` output (one table).

    Elements are printed as `elements = { k : v, k : v,` continued over lines up to `}`; keys
    and values are nft's own text, the syntax the compiler writes them in. Without elements
    (`-t`, terse) only declarations and chains are found.
    """
    sets: dict[str, SetDecl] = {}
    chains: dict[str, KernelChain] = {}
    elements: dict[str, dict[str, str | None]] = {}
    current: tuple[str, str] | None = None
    body: list[str] = []
    items: list[str] | None = None  # inside `elements = { … }`
    for raw in text.splitlines():
        line = raw.strip()
        if current is None:
            parts = line.split()
            if len(parts) == 3 and parts[0] in ("map", "set", "chain") and parts[2] == "{":
                current, body = (parts[0], parts[1]), []
            continue
        if items is not None or (current[0] != "chain" and line.startswith("elements = {")):
            if items is None:
                items, line = [], line.removeprefix("elements = {")
            done = line.endswith("}")
            items += [item.strip() for item in line.removesuffix("}").split(",") if item.strip()]
            if done:
                is_map = current[0] == "map"
                elements[current[1]] = {
                    (k := item.partition(" : "))[0]: (k[2] if is_map else None) for item in items
                }
                items = None
            continue
        if line != "}":
            if line:
                body.append(line)
            continue
        kind, name = current
        if kind == "chain":
            header = body[0] if body and body[0].startswith("type ") and " hook " in body[0] else None
            chains[name] = KernelChain(name, header, tuple(body[1:] if header else body))
        else:
            sets[name] = SetDecl(name, kind == "map", tuple(body))
            elements.setdefault(name, {})
        current = None
    return sets, chains, elements


def _atom(value: Any) -> str:
    """One element key or value of nft's JSON output in nft's text syntax."""
    if isinstance(value, dict):
        if "concat" in value:
            return " . ".join(_atom(v) for v in value["concat"])
        if "elem" in value:  # an element with attributes (timeout, comment…)
            return _atom(value["elem"]["val"])
        for verdict in ("goto", "jump"):
            if verdict in value:
                return f"{verdict} {value[verdict]['target']}"
        if len(value) == 1:  # {"drop": null}, {"accept": null}, …
            (verdict, arg), = value.items()
            if arg is None:
                return str(verdict)
        return json.dumps(value, sort_keys=True)
    return str(value)


def parse_json_elements(text: str) -> dict[str, str | None]:
    """key → value (None for a set) of one `nft -j list set|map` document."""
    out: dict[str, str | None] = {}
    for obj in json.loads(text).get("nftables", ()):
        decl = obj.get("map") or obj.get("set")
        if not decl:
            continue
        for elem in decl.get("elem", ()):
            if isinstance(elem, list) and "map" in obj:
                out[_atom(elem[0])] = _atom(elem[1])
            else:
                out[_atom(elem)] = None
    return out


def _is_dynamic(decl: SetDecl) -> bool:
    """Sets the datapath fills (affinity): their elements are kernel state, not ours."""
    return any(line.startswith("flags ") and "dynamic" in line for line in decl.body)


def _check(result: Completed, what: str) -> str:
    if result.returncode != 0:
        raise NftablesError(f"{what}: {result.stderr.strip() or 'failed'}")
    return result.stdout


def read_table(transport: Transport, family: str) -> KernelTable | None:
    """Our table of `family` as the kernel has it, None when it does not exist.

    One listing with the elements: every `nft list` fetches the whole table into nft's cache
    first (about 2 s at 10,000 services whatever is printed), so listing each map on its own
    cost that 17 times; and nft's text is parsed much faster than its JSON.
    """
    listing = transport.run(f"list table {family} {TABLE}", libnftables.Output(numeric_priority=True))
    if listing.returncode != 0:
        if "No such file or directory" in listing.stderr:
            return None
        raise NftablesError(f"list table {family} {TABLE}: {listing.stderr.strip()}")
    sets, chains, listed = parse_listing(listing.stdout)
    elements = {name: listed.get(name, {}) for name, decl in sets.items() if not _is_dynamic(decl)}
    return KernelTable(family, sets, chains, elements)


def read_dynamic_elements(transport: Transport, family: str, name: str) -> dict[str, str | None]:
    """The current entries of a dynamic map (e.g. affinity)."""
    result = transport.run(f"list map {family} {TABLE} {name}", libnftables.Output(json=True))
    return parse_json_elements(_check(result, f"list map {name}"))


# ---------------------------------------------------------------------------------------------
# what we applied
# ---------------------------------------------------------------------------------------------

ElementKey = tuple[str, str]  # (set, key)


@dataclass(frozen=True)
class Applied:
    """What one table holds after our last successful transaction.

    `counts` holds how many fragments hold each element (the hairpin pair of an endpoint shared
    by several services is one element); `values` its value. `stale` are chains of ours still in
    the kernel that nothing desires any more (deleted at the next full sync).
    """

    ruleset: Ruleset
    counts: dict[ElementKey, int]  # updated in place by `Delta.apply_to` (copying is O(cluster))
    values: dict[ElementKey, str | None]
    stale: Mapping[str, Chain] = field(default_factory=dict)

    @classmethod
    def of(cls, ruleset: Ruleset, stale: Mapping[str, Chain] | None = None) -> Applied:
        counts: dict[ElementKey, int] = {}
        values: dict[ElementKey, str | None] = {}
        for fragment in ruleset.fragments.values():
            for set_name, key, value in fragment.elements:
                k = (set_name, key)
                counts[k] = counts.get(k, 0) + 1
                values.setdefault(k, value)
        return cls(ruleset, counts, values, dict(stale or {}))

    def chains(self) -> dict[str, Chain]:
        return {**self.stale, **{c.name: c for c in self.ruleset.chains}}


@dataclass(frozen=True)
class Delta:
    """An incremental plan's effect on `Applied`: only the touched elements (count 0: gone)."""

    ruleset: Ruleset
    elements: Mapping[ElementKey, tuple[int, str | None]]
    stale: Mapping[str, Chain]

    def apply_to(self, applied: Applied) -> Applied:
        for k, (count, value) in self.elements.items():
            if count > 0:
                applied.counts[k] = count
                applied.values[k] = value
            else:
                applied.counts.pop(k, None)
                applied.values.pop(k, None)
        return Applied(self.ruleset, applied.counts, applied.values, self.stale)


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
class Plan:
    """One transaction to run, what it does, and the state it leads to."""

    text: str
    summary: PlanSummary
    desired: tuple[Ruleset, ...]
    next_state: Mapping[str, Applied | Delta] = field(repr=False, compare=False, default_factory=dict)
    base_generation: int = field(repr=False, default=0)
    followup: str = ""  # deletions run as a second transaction (see `_element_commands`)

    @property
    def is_empty(self) -> bool:
        return not self.text and not self.followup


# ---------------------------------------------------------------------------------------------
# diffing
# ---------------------------------------------------------------------------------------------


class _Transaction:
    """Commands of one transaction, kept in the order the kernel needs them."""

    def __init__(self) -> None:
        self.declare: list[str] = []  # new chains (rules may jump to each other)
        self.rules: list[str] = []  # flush + rules of new or changed chains
        self.affinity: list[str] = []
        self.deletes: list[str] = []
        self.adds: list[str] = []
        self.drop_chains: list[str] = []
        self.followup: list[str] = []  # a second transaction, see `_element_commands`

    def text(self) -> str:
        lines = [*self.declare, *self.rules, *self.affinity, *self.deletes, *self.adds, *self.drop_chains]
        return "\n".join(lines) + "\n" if lines else ""

    def followup_text(self) -> str:
        return "\n".join(self.followup) + "\n" if self.followup else ""


def _chain_commands(t: _Transaction, family: str, chain: Chain, existing: bool) -> None:
    """Make `chain` hold exactly its rules: declare it if new, else flush it first."""
    if existing:
        t.rules.append(f"flush chain {family} {TABLE} {chain.name}")
    elif chain.hook is not None:
        t.declare.append(f"add chain {family} {TABLE} {chain.name} {{ {chain.hook.header()} }}")
    else:
        t.declare.append(f"add chain {family} {TABLE} {chain.name}")
    t.rules += [f"add rule {family} {TABLE} {chain.name} {rule}" for rule in chain.rules]


def _element_commands(
    t: _Transaction,
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


def _diff_elements(
    before: Mapping[str, Mapping[str, str | None]], after: Mapping[str, Mapping[str, str | None]]
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
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
                adds.setdefault(set_name, []).append(key if value is None else f"{key} : {value}")
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


def _static_elements(ruleset: Ruleset) -> dict[str, dict[str, str | None]]:
    decls = {s.name: s for s in ruleset.sets}
    return {name: elems for name, elems in ruleset.elements().items() if not _is_dynamic(decls[name])}


# ---------------------------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------------------------


class NftablesBackend:
    """Keeps `ip kproxy-nft` / `ip6 kproxy-nft` equal to the desired rulesets.

    Not thread-safe: one caller (the CLI or the agent's sync loop) at a time.
    """

    def __init__(
        self,
        netns: str | None = None,
        use_libnftables: bool = True,
        transport: Transport | None = None,
    ) -> None:
        self.netns = netns
        self.transport = transport or make_transport(netns, use_libnftables)
        self._applied: dict[str, Applied] | None = None  # None: kernel state unknown
        self._generation = 0
        self.repairs_total = 0

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> NftablesBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def knows_kernel_state(self) -> bool:
        return self._applied is not None

    # ------------------------------------------------------------------ public API
    def plan(self, desired: Ruleset | Sequence[Ruleset], changed: Collection[ServicePortName] | None = None) -> Plan:
        """The transaction from what we applied to `desired` (a full sync plan the first time).

        `changed`, when given, promises that every other service port's fragment is the one last
        applied (as `compile.nftables.update_ruleset` makes them): only those are compared.
        """
        rulesets = _as_tuple(desired)
        if self._applied is None or any(
            r.nft_family not in self._applied or self._applied[r.nft_family].ruleset.sets != r.sets for r in rulesets
        ):
            return self.plan_full(rulesets)
        t = _Transaction()
        summary = PlanSummary()
        next_state: dict[str, Applied | Delta] = {}
        for ruleset in rulesets:
            family = ruleset.nft_family
            applied, s = self._plan_incremental(t, self._applied[family], ruleset, changed)
            next_state[family] = applied
            summary += s
        return Plan(t.text(), summary, rulesets, next_state, self._generation, t.followup_text())

    def plan_full(self, desired: Ruleset | Sequence[Ruleset]) -> Plan:
        """Read the kernel back and plan whatever makes it equal to `desired`."""
        rulesets = _as_tuple(desired)
        t = _Transaction()
        summary = PlanSummary(full=True)
        next_state: dict[str, Applied | Delta] = {}
        for ruleset in rulesets:
            family = ruleset.nft_family
            kernel = read_table(self.transport, family)
            believed = self._applied.get(family) if self._applied is not None else None
            applied, s = _plan_full_table(t, kernel, ruleset, believed)
            next_state[family] = applied
            summary += s
        return Plan(t.text(), summary, rulesets, next_state, self._generation, t.followup_text())

    def apply(self, plan: Plan) -> None:
        """Run the plan's transaction; on failure raise NftablesError and change nothing.

        Then its follow-up (deletions of unreachable backend indexes), if any; should that
        fail, the rules are in but the next plan is a full one, which reads the kernel back.
        """
        if plan.base_generation != self._generation:
            raise StalePlanError("the backend changed since this plan was made; plan again")
        if plan.text:
            result = self.transport.run(plan.text)
            if result.returncode != 0:
                raise NftablesError(f"nft transaction failed: {result.stderr.strip()}")
        if plan.summary.full or self._applied is None:
            self._applied = {}
            self.repairs_total += plan.summary.drift
        for family, state in plan.next_state.items():
            self._applied[family] = state.apply_to(self._applied[family]) if isinstance(state, Delta) else state
        self._generation += 1
        if plan.followup:
            result = self.transport.run(plan.followup)
            if result.returncode != 0:
                # The rules are in; only unreachable elements linger. Reading the kernel back
                # (the full sync that follows a failed sync) finds and deletes them.
                self._applied = None
                raise NftablesError(f"nft follow-up transaction failed: {result.stderr.strip()}")

    def sync(self, desired: Ruleset | Sequence[Ruleset], changed: Collection[ServicePortName] | None = None) -> Plan:
        """Plan and apply (incremental when possible); returns the applied plan."""
        plan = self.plan(desired, changed)
        self.apply(plan)
        return plan

    def full_sync(self, desired: Ruleset | Sequence[Ruleset]) -> Plan:
        """Read back, repair and apply; returns the applied plan (see `summary.drift`)."""
        plan = self.plan_full(desired)
        self.apply(plan)
        return plan

    def cleanup(self) -> None:
        """Delete our tables (both families) if they exist; nothing else is touched."""
        # `add` first so that `delete` cannot fail on a missing table (nft 1.0.6 has no `destroy`).
        commands = "".join(f"add table {f} {TABLE}\ndelete table {f} {TABLE}\n" for f in FAMILIES)
        _check(self.transport.run(commands), "cleanup")
        self._applied = None
        self._generation += 1

    # ------------------------------------------------------------------ incremental diff
    def _plan_incremental(
        self, t: _Transaction, applied: Applied, desired: Ruleset, hint: Collection[ServicePortName] | None = None
    ) -> tuple[Delta, PlanSummary]:
        family = desired.nft_family
        old_chains = applied.chains()
        new_chains = {c.name: c for c in desired.chains}
        added = changed = 0
        for name, chain in new_chains.items():
            old = old_chains.get(name)
            if old is None or old.rules != chain.rules or old.hook != chain.hook:
                _chain_commands(t, family, chain, existing=old is not None)
                added += old is None
                changed += old is not None
        stale = {n: c for n, c in old_chains.items() if n not in new_chains}

        touched: dict[ElementKey, tuple[int, str | None]] = {}
        new_counts: dict[ElementKey, int] = {}
        new_values: dict[ElementKey, str | None] = {}
        lost_affinity: list[tuple[str, frozenset[str], frozenset[str]]] = []
        services_changed = 0
        chains_deleted = 0

        def touch(k: ElementKey) -> None:
            if k not in touched:
                touched[k] = (applied.counts.get(k, 0), applied.values.get(k))
                new_counts[k] = touched[k][0]
                new_values[k] = touched[k][1]

        for before, after in _changed_fragments(applied.ruleset.fragments, desired.fragments, hint):
            services_changed += 1
            for set_name, key, _ in before.elements if before else ():
                k = (set_name, key)
                touch(k)
                new_counts[k] -= 1
            for set_name, key, value in after.elements if after else ():
                k = (set_name, key)
                touch(k)
                if new_counts[k] <= 0:
                    new_values[k] = value
                new_counts[k] += 1
            a, d, c = _own_chain_commands(t, family, before, after, stale)
            added, changed, chains_deleted = added + a, changed + d, chains_deleted + c
            if before is not None and before.affinity is not None:
                lost_affinity += _lost_affinity(before.affinity, after.affinity if after is not None else None)

        deletes: dict[str, list[str]] = {}
        adds: dict[str, list[str]] = {}
        elements_added = elements_deleted = 0
        for (set_name, key), (count, value) in sorted(touched.items()):
            new_count, new_value = new_counts[(set_name, key)], new_values[(set_name, key)]
            was, now = count > 0, new_count > 0
            if was and (not now or new_value != value):
                deletes.setdefault(set_name, []).append(key)
                elements_deleted += 1
            if now and (not was or new_value != value):
                adds.setdefault(set_name, []).append(key if new_value is None else f"{key} : {new_value}")
                elements_added += 1
        _element_commands(t, family, deletes, adds)
        affinity_deleted = self._affinity_cleanup(t, family, lost_affinity)

        summary = PlanSummary(
            services_changed=services_changed,
            chains_added=added,
            chains_changed=changed,
            chains_deleted=chains_deleted,
            elements_added=elements_added,
            elements_deleted=elements_deleted,
            affinity_entries_deleted=affinity_deleted,
        )
        delta = {k: (new_counts[k], new_values[k]) for k in touched}
        return Delta(desired, delta, stale), summary

    def _affinity_cleanup(
        self, t: _Transaction, family: str, lost: list[tuple[str, frozenset[str], frozenset[str]]]
    ) -> int:
        """Commands deleting affinity entries that point at endpoints a service no longer has."""
        if not lost:
            return 0
        entries = {m: read_dynamic_elements(self.transport, family, m) for m in sorted({m for m, _, _ in lost})}
        n = 0
        for map_name, suffixes, endpoints in lost:
            doomed = [
                (k, v)
                for k, v in entries[map_name].items()
                if v in endpoints and any(k.endswith(suffix) for suffix in suffixes)
            ]
            for key, value in doomed:
                t.affinity.append(f"add element {family} {TABLE} {map_name} {{ {key} timeout 1s : {value} }}")
                t.affinity.append(f"delete element {family} {TABLE} {map_name} {{ {key} }}")
            n += len(doomed)
        return n


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


def _own_chain_commands(
    t: _Transaction,
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


def _plan_full_table(
    t: _Transaction, kernel: KernelTable | None, desired: Ruleset, believed: Applied | None
) -> tuple[Applied, PlanSummary]:
    """Commands that make the kernel's table (as read) equal to `desired`."""
    family = desired.nft_family
    desired_elements = _static_elements(desired)
    drift = 0
    if believed is not None:
        drift = _drift(kernel, believed)
    if kernel is None or _needs_rebuild(kernel, desired):
        # Missing table, or declarations/base chains that cannot be changed in place: create
        # (or replace) the whole table in this same transaction.
        rebuilt = kernel is not None
        if rebuilt:
            t.declare.append(f"delete table {family} {TABLE}")
        t.declare += render_table(desired)
        n = 0
        for set_name, elements in desired_elements.items():
            t.adds += render_elements(family, set_name, (k if v is None else f"{k} : {v}" for k, v in elements.items()))
            n += len(elements)
        summary = PlanSummary(
            full=True,
            services_changed=len(desired.fragments),
            chains_added=sum(1 for _ in desired.all_chains()),
            elements_added=n,
            rebuilt_tables=int(rebuilt),
            drift=drift,
        )
        return Applied.of(desired), summary

    added = changed = deleted = 0
    for chain in desired.all_chains():
        existing = kernel.chains.get(chain.name)
        if existing is None or existing.rules != chain.expected_listing:
            _chain_commands(t, family, chain, existing=existing is not None)
            added += existing is None
            changed += existing is not None
    wanted = {c.name for c in desired.all_chains()}
    referenced = _referenced_chains(kernel)
    stale: dict[str, Chain] = {}
    for name, listed in kernel.chains.items():
        if name in wanted:
            continue
        if name in referenced:
            stale[name] = Chain(name, listed.rules)  # still pointed at: delete at a later full sync
        else:
            t.drop_chains.append(f"delete chain {family} {TABLE} {name}")
            deleted += 1
    kernel_elements = {name: dict(kernel.elements.get(name, {})) for name in desired_elements}
    deletes, adds = _diff_elements(kernel_elements, desired_elements)
    _element_commands(t, family, deletes, adds)
    summary = PlanSummary(
        full=True,
        chains_added=added,
        chains_changed=changed,
        chains_deleted=deleted,
        elements_added=sum(len(v) for v in adds.values()),
        elements_deleted=sum(len(v) for v in deletes.values()),
        drift=drift,
    )
    return Applied.of(desired, stale), summary


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
        return len(expected_chains) + len(believed.values)
    chains = kernel.chains
    n = sum(1 for name, rules in expected_chains.items() if name not in chains or chains[name].rules != rules)
    n += sum(1 for name in kernel.chains if name not in expected_chains)
    return n + _count_element_differences(dict(kernel.elements), _static_elements(believed.ruleset))


def _as_tuple(desired: Ruleset | Iterable[Ruleset]) -> tuple[Ruleset, ...]:
    return (desired,) if isinstance(desired, Ruleset) else tuple(desired)


__all__ = [
    "Applied",
    "CommandTransport",
    "Element",
    "KernelTable",
    "LibnftablesTransport",
    "NftablesBackend",
    "NftablesError",
    "Plan",
    "PlanSummary",
    "StalePlanError",
    "Transport",
    "make_transport",
    "read_table",
]
