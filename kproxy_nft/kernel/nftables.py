"""The nftables backend: read the kernel, plan one atomic transaction, run it, remember what was applied.

`NftablesBackend` owns the tables `ip kproxy-nft` and `ip6 kproxy-nft` and nothing else:

* `plan(desired)` diffs the desired rulesets (from `compile.nftables`) against what this
  backend last applied, sending only what changed (`nftables_plan.plan_incremental`). It reads
  the kernel only for ClientIP affinity cleanup (the dynamic maps `affinity_maps_to_read`
  names). The result is a `Plan`: the transaction text, its follow-up, a summary, `is_empty`.
* `apply(plan)` runs that text as one transaction (and then its follow-up, if any), in-process
  through libnftables or with `nft -f -` (`nftables_transport`). If the kernel refuses it,
  nothing changed (nft transactions are atomic) and neither does our record of the state.
* `full_sync(desired)` reads the kernel back (`nft -y list table`, parsed by `nftables_text`),
  repairs any difference from what we had applied (`nftables_plan.plan_full`; counted in
  `Plan.summary.drift` and `repairs_total`), and applies the rest. The first sync of a backend
  is always a full one: until then we know nothing of the kernel.
* `check(reader, named)` is the drift check (another thread, its own connection): the tables
  read back and compared with what we applied, or, when a kernel notification named the
  objects someone changed, only those (`nft list map …` for sets; chains are rewritten
  unread), planned by `nftables_plan.plan_objects`.
* `cleanup()` deletes our two tables (if present), and only them.

This is the imperative shell: every decision is made by the pure planner from what this module
read and what it recorded (`nftables_plan.Applied`), so the diffing is tested without a kernel
against `nftables_fake`.

Running in a network namespace (`netns`): libnftables calls are made from inside it (setns,
see `libnftables`), the `nft` command is run through `ip netns exec`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from kproxy_nft.compile.nftables import TABLE, Element, Ruleset, SetDecl
from kproxy_nft.kernel import libnftables
from kproxy_nft.kernel.nftables_plan import (
    Applied,
    Delta,
    PlanSummary,
    Step,
    advance,
    affinity_maps_to_read,
    can_plan_incrementally,
    plan_full,
    plan_incremental,
    plan_objects,
)
from kproxy_nft.kernel.nftables_text import (
    KernelTable,
    is_dynamic,
    parse_json_elements,
    parse_listing,
    parse_terse_listing,
    table_from_listing,
)
from kproxy_nft.kernel.nftables_transport import (
    CommandTransport,
    LibnftablesTransport,
    NftablesError,
    Transport,
    check,
    listing,
    make_transport,
)
from kproxy_nft.model import IPFamily, ServicePortName

FAMILIES = {"ip": IPFamily.V4, "ip6": IPFamily.V6}


class FollowupFailed(NftablesError):
    """The second transaction of a sync (deletions of what nothing reaches any more) failed:
    the rules are in, leftovers linger until the next full sync (kube-proxy counts these in
    sync_proxy_rules_nftables_cleanup_failures_total)."""


# A drift check reads named sets one `nft list map` each (about 0.1-0.2 s at 10,000 services)
# and reads no chain (`plan_objects` rewrites them): past these, one read of the table is cheaper.
MAX_NAMED_SETS = 4
MAX_NAMED_CHAINS = 1000


class StalePlanError(RuntimeError):
    """A plan computed against an older state of the backend was applied."""


# ---------------------------------------------------------------------------------------------
# reading the kernel
# ---------------------------------------------------------------------------------------------


def read_table(transport: Transport, family: str) -> KernelTable | None:
    """Our table of `family` as the kernel has it, None when it does not exist.

    One listing with the elements: every `nft list` fetches the whole table into nft's cache
    first (about 2 s at 10,000 services whatever is printed), so listing each map on its own
    cost that 17 times; and nft's text is parsed much faster than its JSON.
    """
    text = listing(transport, f"list table {family} {TABLE}", libnftables.Output(numeric_priority=True))
    return None if text is None else table_from_listing(family, text)


def read_sets(transport: Transport, family: str, decls: Iterable[SetDecl]) -> KernelTable | None:
    """Only these sets and maps of our table of `family`, with their elements (`nft list map …`:
    nft fetches just that set, about 0.1 s at 10,000 services against 1 s for the table); None
    when one of them, or the table, does not exist."""
    texts = []
    for decl in decls:
        text = listing(transport, f"list {decl.keyword} {family} {TABLE} {decl.name}")
        if text is None:
            return None
        texts.append(text)
    return table_from_listing(family, "".join(texts))


def read_dynamic_elements(transport: Transport, family: str, name: str) -> dict[str, str | None]:
    """The current entries of a dynamic map (e.g. affinity)."""
    result = transport.run(f"list map {family} {TABLE} {name}", libnftables.Output(json=True))
    return parse_json_elements(check(result, f"list map {name}"))


# ---------------------------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """One transaction to run, what it does, and the state it leads to."""

    text: str
    summary: PlanSummary
    desired: tuple[Ruleset, ...]
    next_state: Mapping[str, Applied | Delta] = field(repr=False, compare=False, default_factory=dict)
    base_generation: int = field(repr=False, default=0)
    followup: str = ""  # deletions run as a second transaction (see `nftables_plan`)
    loads: tuple[str, ...] = ()  # the rest of a new table's elements, run after `text`

    @property
    def is_empty(self) -> bool:
        return not self.text and not self.followup

    @property
    def transactions(self) -> str:
        """Every command of the plan, in the order they run (one text, for reading)."""
        return self.text + "".join(self.loads) + self.followup


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
        applied = self._applied
        if applied is None or not can_plan_incrementally(applied, rulesets):
            return self.plan_full(rulesets)
        entries = {
            (family, name): read_dynamic_elements(self.transport, family, name)
            for family, name in affinity_maps_to_read(applied, rulesets, changed)
        }
        return self._plan(plan_incremental(applied, rulesets, changed, entries), rulesets)

    def plan_full(self, desired: Ruleset | Sequence[Ruleset]) -> Plan:
        """Read the kernel back and plan whatever makes it equal to `desired`."""
        rulesets = _as_tuple(desired)
        kernel = {r.nft_family: read_table(self.transport, r.nft_family) for r in rulesets}
        return self._plan(plan_full(kernel, rulesets, self._applied), rulesets)

    def check(self, reader: Transport, named: Collection[str] | None = None) -> Plan | None:
        """Read the kernel back through `reader` and plan what makes it equal to what we last
        applied (empty: nothing drifted); None when we know of nothing applied.

        `named`: the only objects a kernel notification said were changed, chains by name and
        sets as `@name`; then only those are read and put back (`_check_named`), unless that
        cannot do (see there) and the tables are read whole.

        Made for another thread than the syncing one: `reader` is its own connection, and the
        record is taken once, before the read, with its generation. A sync that commits during
        the read raises StalePlanError (the read may show our own change as a difference); one
        that commits after it makes the plan stale (`apply` refuses it).
        """
        generation, applied = self._generation, self._applied
        if applied is None:
            return None
        rulesets = tuple(a.ruleset for a in applied.values())
        step = self._check_named(reader, applied, named) if named else None
        kernel = {r.nft_family: read_table(reader, r.nft_family) for r in rulesets} if step is None else {}
        if self._generation != generation:
            raise StalePlanError("a sync committed while the kernel was read")  # not worth planning
        if step is None:
            step = plan_full(kernel, rulesets, applied)
        return Plan(step.text, step.summary, rulesets, step.next_state, generation, step.followup, step.loads)

    @staticmethod
    def _check_named(reader: Transport, applied: Mapping[str, Applied], named: Collection[str]) -> Step | None:
        """Read only the named sets and plan the repair of them and of the named chains; None
        when the whole tables must be read: too many named, a name we never applied (someone
        else's chain in our table, to be deleted), or a set or table gone or redeclared."""
        sets = {name[1:] for name in named if name.startswith("@")}
        chains = {name for name in named if not name.startswith("@")}
        if len(sets) > MAX_NAMED_SETS or len(chains) > MAX_NAMED_CHAINS:
            return None
        known_chains: set[str] = set()
        known_sets: set[str] = set()
        listed = {}
        for family, record in applied.items():
            known_chains.update(record.stale)
            known_chains.update(c.name for c in record.ruleset.all_chains())
            # Dynamic maps are the datapath's (affinity entries): not ours to put back.
            decls = [d for d in record.ruleset.sets if d.name in sets and not is_dynamic(d)]
            known_sets.update(d.name for d in record.ruleset.sets if d.name in sets)
            table = read_sets(reader, family, decls) if decls else None
            if decls and (table is None or any(table.sets.get(d.name) != d for d in decls)):
                return None
            if table is not None:
                listed[family] = table
        if not (chains <= known_chains and sets <= known_sets):
            return None
        return plan_objects(listed, applied, chains)

    def apply(self, plan: Plan) -> None:
        """Run the plan's transaction; on failure raise NftablesError and change nothing.

        Then its follow-up (deletions of unreachable backend indexes and of chains removed
        service ports owned), if any; should that fail, the rules are in but the next plan is
        a full one, which reads the kernel back.
        """
        if plan.base_generation != self._generation:
            raise StalePlanError("the backend changed since this plan was made; plan again")
        if plan.text:
            result = self.transport.run(plan.text)
            if result.returncode != 0:
                raise NftablesError(f"nft transaction failed: {result.stderr.strip()}")
        for part in plan.loads:
            result = self.transport.run(part)
            if result.returncode != 0:
                # A new table, partly loaded: services whose entry elements are not in are
                # unreachable, as before. The failed sync is retried as a full one, which reads
                # the table back and adds the rest.
                self._applied = None
                self._generation += 1
                raise NftablesError(f"nft transaction failed loading a new table: {result.stderr.strip()}")
        self.repairs_total += plan.summary.drift  # full plans, and repairs of named objects
        self._applied = advance(self._applied, Step(plan.text, plan.followup, plan.summary, plan.next_state,
                                                    plan.loads))
        self._generation += 1
        if plan.followup:
            result = self.transport.run(plan.followup)
            if result.returncode != 0:
                # The rules are in; only unreachable elements linger. Reading the kernel back
                # (the full sync that follows a failed sync) finds and deletes them.
                self._applied = None
                raise FollowupFailed(f"nft follow-up transaction failed: {result.stderr.strip()}")

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
        check(self.transport.run(commands), "cleanup")
        self._applied = None
        self._generation += 1

    def _plan(self, step: Step, rulesets: tuple[Ruleset, ...]) -> Plan:
        return Plan(step.text, step.summary, rulesets, step.next_state, self._generation, step.followup,
                    step.loads)


def _as_tuple(desired: Ruleset | Iterable[Ruleset]) -> tuple[Ruleset, ...]:
    return (desired,) if isinstance(desired, Ruleset) else tuple(desired)


# The names this module exported before the split (some now live in nftables_plan/_text/_transport),
# and the parsers tests import from here.
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
    "parse_json_elements",
    "parse_listing",
    "parse_terse_listing",
    "read_dynamic_elements",
    "read_table",
]
