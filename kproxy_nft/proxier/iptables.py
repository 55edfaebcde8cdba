"""iptables mode: kube-proxy's chains, one `iptables-restore --noflush` per IP family.

Between syncs it keeps a `kernel.iptables_record.Record`: the cluster state the last sync
applied and, per family, the kernel's state without the per-service chains. Their text (80 MiB
at 10,000 services) is compiled again when needed instead of kept. A partial sync neither reads
`iptables-save` nor compiles unchanged service ports: it compiles the changed ones as they were
and as they are, and plans those chains and the shared ones (`iptables_plan.Focus`): O(changed)
up to the restore itself. A full sync compiles everything, reads the kernel back and plans once
against it.
`check_drift` reads and plans against what was last applied off the sync thread (iptables-save
is a process of its own); `repair` sends that plan unless a sync overtook it. The canary chains
(`kernel.iptables.CANARY`) are how iptables-legacy, which sends no notifications, is watched.

`plan`/`apply` (the CLI's `apply`) plan every family first, then apply them all or nothing:
IPv4 is reverted when IPv6 then fails (`kernel.iptables.apply_families`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, cast

from kproxy_nft.compile import iptables as compiler
from kproxy_nft.kernel import iptables as kernel
from kproxy_nft.kernel import iptables_record
from kproxy_nft.kernel.iptables_plan import MANAGED_TABLES, Focus, Plan, is_owned
from kproxy_nft.kernel.iptables_record import FamilyRecord, Record
from kproxy_nft.kernel.iptables_text import KernelState, KernelTable, SaveFormatError, parse_save, render_save
from kproxy_nft.kernel.nftables_events import Interest
from kproxy_nft.model import ClusterState, IPFamily, NodeContext, ServicePortName
from kproxy_nft.proxier import DriftCheck, KernelSides, Proxier, ProxierBase, ProxierPlan
from kproxy_nft.top import Sample, from_iptables
from kproxy_nft.trace import Program
from kproxy_nft.trace.iptables import IptablesProgram, state_from_ruleset

if TYPE_CHECKING:
    from kproxy_nft.compile.iptables import Ruleset


# A notification naming more chains than this (a table flushed) is checked by reading it whole.
TARGETED_READ_LIMIT = 64


class IptablesProxier(ProxierBase):
    """The iptables mode for one node (see the module docstring)."""

    mode = "iptables"
    counts_partial_failures = True
    counters_kept = "KUBE-SEP- DNAT rule counters"

    def __init__(self, node: NodeContext, *, netns: str | None = None, iptables_backend: str | None = None,
                 families: tuple[IPFamily, ...] | None = None, sides: KernelSides | None = None) -> None:
        super().__init__(node, netns, families)
        self._host: kernel.Host | None = sides.iptables if sides is not None else None
        self._backend = self._host.backend.value if self._host is not None else iptables_backend
        self._drift = 0
        # What the last sync applied (None: unknown), and a count of syncs and repairs that
        # tells a drift check whether one ran while it read the kernel.
        self._record: Record | None = None
        self._generation = 0
        self._probed_sizes: dict[tuple[IPFamily, str], tuple[int, int] | None] = {}  # legacy: see `probe`
        self._rule_counts: dict[tuple[IPFamily, str], tuple[int, int]] = {}  # see rule_counts

    # -- the kernel side, opened on first use -----------------------------------------------

    @property
    def host(self) -> kernel.Host:
        if self._host is None:
            self._host = kernel.open_host(self._backend, netns=self._netns)
        return self._host

    @property
    def tools(self) -> tuple[str, ...]:
        backend = self._backend or self.host.backend
        return (f"iptables-{backend}-restore", f"iptables-{backend}-save")

    def _ipv6_supported(self) -> bool:
        """kube-proxy's `Present()` for IPv6: ip6tables runs and has a nat table (in our netns)."""
        return self.host.run(IPFamily.V6, "save", "-t", "nat").returncode == 0

    # -- one-shot: dump, apply, cleanup -----------------------------------------------------

    def render(self, state: ClusterState, family: IPFamily = IPFamily.V4) -> str:
        return compiler.render_restore(compiler.compile_ruleset(state, self._node, family))

    def plan(self, state: ClusterState) -> ProxierPlan:
        plans = []
        lines: list[str] = []
        for family in self.families:
            desired = compiler.compile_ruleset(state, self._node, family)
            p = kernel.plan(desired, kernel.read_state(self.host, family))
            plans.append((p, kernel.wants_route_localnet(desired)))
            lines.append(f"iptables-{self.host.backend} IPv{int(family)}: "
                         f"{'nothing to change' if p.is_empty else 'to change'}")
            lines += _describe(p)
        payload = "".join(f"--- iptables-restore --noflush payload (IPv{int(p.family)}) ---\n{p.payload}"
                          for p, _ in plans)
        return ProxierPlan(all(p.is_empty for p, _ in plans), tuple(lines), payload, tuple(plans))

    def apply(self, plan: ProxierPlan) -> None:
        """`plan.detail`: (kernel plan, serves localhost NodePorts) per family."""
        plans: tuple[tuple[Plan, bool], ...] = plan.detail  # type: ignore[assignment]
        if plan.is_empty:
            return
        if any(route_localnet for _, route_localnet in plans):
            kernel.enable_route_localnet(self.host)
        kernel.apply_families(self.host, [p for p, _ in plans])

    def cleanup(self) -> tuple[str, ...]:
        lines = []
        for family in (IPFamily.V4, IPFamily.V6):
            try:
                removed = kernel.cleanup(self.host, family)
            except kernel.CommandError:
                if family is IPFamily.V6:
                    continue  # no ip6tables (or IPv6 disabled): nothing of ours there
                raise
            lines.append(f"iptables-{self.host.backend} IPv{int(family)}: removed {len(removed.chains)} chains, "
                         f"{len(removed.jumps)} jumps")
        return tuple(lines)

    def read_back(self) -> str:
        return "".join(render_save(kernel.read_state(self.host, family)) for family in self.families)

    # -- read only: trace, top; and taking a node over ----------------------------------------

    def trace_program(self, state: ClusterState, family: IPFamily, local: frozenset[str]) -> Program:
        """kube-proxy's chains as our compiler writes them for `family`, ready to walk."""
        return IptablesProgram(state_from_ruleset(compiler.compile_ruleset(state, self._node, family)), local)

    def live_trace_program(self, family: IPFamily, local: frozenset[str]) -> Program:
        """`iptables-save` of the nat and filter tables of `family`, ready to walk (never None:
        chains that are not there are simply not walked)."""
        return IptablesProgram(kernel.read_state(self.host, family, ("nat", "filter")), local)

    def connection_counts(self, families: Iterable[IPFamily] = (IPFamily.V4, IPFamily.V6)) -> Sample:
        """The packet counters of the `KUBE-SEP-…` DNAT rules (`iptables-save -c -t nat`, which
        does not reset them), every frontend of a service port. Never None."""
        from kproxy_nft.kernel import counters  # with the nft side's readers: only loaded for `top`

        with counters.reading():
            listings = counters.read_iptables_counters(self.host, counters.present_families(families))
        return Sample(self.mode, time.time(), from_iptables(listings.values()))

    def remove_leftovers(self, running: Proxier) -> tuple[str, ...]:
        """kube-proxy's iptables-mode chains (ours are the same ones) and its canary chains, both
        families, in every iptables backend but the one `running` writes to when it is this proxier.

        `cleanup` is not reused: it cleans one backend, and `iptables-legacy-save -t nat` would
        create the legacy nat table on a node that never had one. Each backend is looked at
        without `-t` first, and only the tables holding kube-proxy's chains are cleaned.
        """
        spared = self.host.backend if running is self else None
        removed: list[str] = []
        for backend in kernel.IptablesBackend:
            if backend is not spared:
                removed += _remove_iptables_mode(kernel.Host(backend, self._netns))
        return tuple(removed)

    # -- the agent's syncs --------------------------------------------------------------------

    def sync(self, state: ClusterState, full: bool, changed: frozenset[ServicePortName] | None = None) -> str:
        parts = []
        previous = self._record
        partial = not full and changed is not None and previous is not None and previous.node is self._node
        families: dict[IPFamily, FamilyRecord] = {}
        try:
            for family in self.families:
                if partial and previous is not None and changed is not None:
                    step = iptables_record.partial_step(previous, state, family, changed)
                else:
                    step = iptables_record.full_step(state, self._node, family)
                current = step.current if step.current is not None else self._read_back(family, step.desired)
                p = kernel.plan(step.desired, current, step.focus)  # planned once, against what was read or applied
                kernel.apply(p, self.host)
                families[family] = record = step.recorded(p.after)
                parts.append(f"v{int(family)} chains={len(p.chains)} jumps={len(p.jumps)}")
                self._rule_counts.update(_rule_counts(step.desired, p, record.service_rules))
            if not partial:
                for family in self.families:
                    kernel.ensure_canaries(self.host, family)
            self._record = Record(state, self._node, families)
        except BaseException:
            # What the kernel holds is unknown now. Not cleared before: a drift check reading
            # meanwhile would find no record and force a blocking full sync; the generation
            # below already makes its result stale.
            self._record = None
            raise
        finally:
            self._generation += 1  # after the record: a drift check that read meanwhile is stale
        return " ".join(parts)

    def _read_back(self, family: IPFamily, desired: Ruleset) -> KernelState:
        """A full sync's read: the kernel's state, which the sync plans against, once.

        No repair is counted here: a blocking full sync runs when what we applied is unknown
        (start, after a failure) or when checks kept being overtaken by syncs, and telling our
        pending changes from someone else's would take a second plan (canonicalising every
        rule: seconds at 10,000 services). Drift is counted by the checks (`check_drift`).
        """
        state = kernel.read_state(self.host, family)
        if kernel.wants_route_localnet(desired):
            kernel.enable_route_localnet(self.host)
        return state

    def rule_counts(self) -> Mapping[tuple[IPFamily, str], tuple[int, int]]:
        return dict(self._rule_counts)

    def cleanup_failures(self) -> int:
        return 0  # one restore per family: nothing is deferred to a second transaction

    def drift(self) -> int:
        return self._drift

    # -- drift: checked off the sync thread; canaries; notifications ------------------------

    def check_drift(self, chains: frozenset[str] | None = None) -> DriftCheck:
        # iptables-save runs as its own process: nothing shared with the sync thread but the
        # record, taken once with its generation (read first: see `sync`'s finally).
        generation, record = self._generation, self._record
        if record is None:
            return DriftCheck(known=False)
        # Comparing costs per rule (each is canonicalised): with the chains a notification
        # named, only those and the shared chains are, as in a partial sync.
        focus = Focus(chains, frozenset()) if chains is not None else None
        read = {family: self._read_for_check(family, kept.base, chains) for family, kept in record.families.items()}
        # Compiled before the generation is compared: the owners of named chains are looked up
        # in a map that syncs update in place (`FamilyRecord.owners`).
        desired = {family: iptables_record.desired_for_check(record, family, chains) for family in record.families}
        if self._generation != generation:
            return DriftCheck(stale=True)  # before planning: that is the expensive part
        plans = []
        for family in record.families:
            p = kernel.plan(desired[family], read[family], focus)
            if not p.is_empty:
                plans.append(p)
        if not plans:
            return DriftCheck()
        # Canaries are put back only where they may be gone: a notification that named no
        # canary did not touch one (sparing `ensure_canaries`, 0.3 s at 10,000 services).
        canaries = chains is None or kernel.CANARY in chains
        return DriftCheck(tuple(f"IPv{int(p.family)} {table}" for p in plans for table in p.tables),
                          (generation, tuple((p, desired[p.family]) for p in plans), canaries))

    def _read_for_check(self, family: IPFamily, base: KernelState, chains: frozenset[str] | None) -> KernelState:
        """The kernel's state for a check: read whole, or, when a notification named a few
        chains, those read afresh (`read_chains`) over the record's `base` (O(named), not
        O(cluster)); the service chains not named are left out, and so not compared."""
        if chains is None or len(chains) > TARGETED_READ_LIMIT:
            return kernel.read_state(self.host, family)
        state = base
        for table in MANAGED_TABLES:
            current = base.table(table)
            names = sorted(c for c in chains if c in current.chains or is_owned(table, c))
            merged = dict(current.chains)
            for name, chain in kernel.read_chains(self.host, family, table, names).items():
                if chain is None:
                    merged.pop(name, None)
                else:
                    merged[name] = chain
            state = state.replace_table(KernelTable(table, merged))
        return state

    def repair(self, check: DriftCheck) -> bool:
        generation, repairs, canaries = cast("tuple[int, tuple[tuple[Plan, Ruleset], ...], bool]", check.repair)
        record = self._record
        if generation != self._generation or record is None:
            return False
        try:
            kernel.apply_families(self.host, [p for p, _ in repairs])
            families = dict(record.families)
            for p, desired in repairs:
                kept = families[p.family]
                families[p.family] = replace(kept, base=iptables_record.kept_state(p.after, desired, kept.base))
                if canaries:
                    kernel.ensure_canaries(self.host, p.family)
            self._record = replace(record, families=families)
        except Exception:
            self._record = None  # trust only the kernel next time
            raise
        finally:
            self._generation += 1
        return True

    def probe(self) -> tuple[str, ...]:
        """kube-proxy's canaries: the tables whose canary is gone, put back at once (so a flush is
        reported once); the caller then checks the rules. With iptables-legacy a table whose
        size has not changed since the last probe is not looked at (`legacy_table_size`)."""
        missing = []
        for family in self.families:
            gone = kernel.missing_canaries(self.host, family, self._tables_to_probe(family))
            if gone:
                kernel.ensure_canaries(self.host, family)
                missing += [f"IPv{int(family)} {table}" for table in gone]
        return tuple(missing)

    def _tables_to_probe(self, family: IPFamily) -> tuple[str, ...]:
        if self.host.backend is not kernel.IptablesBackend.LEGACY:
            return kernel.CANARY_TABLES
        tables = []
        for table in kernel.CANARY_TABLES:
            size = kernel.legacy_table_size(self._netns, family, table)
            if size is None or self._probed_sizes.get((family, table)) != size:
                tables.append(table)
            # Recorded before the canary is put back: that changes it, so the next probe looks
            # once more and finds the canary there, then rests.
            self._probed_sizes[(family, table)] = size
        return tuple(tables)

    def drift_interest(self) -> Interest | None:
        """iptables-nft writes nf_tables tables others share: our `KUBE-*` chains and the rules
        jumping to them are ours. iptables-legacy sends no notifications."""
        if self.host.backend is not kernel.IptablesBackend.NFT:
            return None
        nft_families = [("ip" if family is IPFamily.V4 else "ip6") for family in self.families]
        return Interest(shared_tables=frozenset((f, table) for f in nft_families for table in kernel.CANARY_TABLES))

    def close(self) -> None:
        """Nothing to release: every iptables call is its own process."""


def _remove_iptables_mode(host: kernel.Host) -> list[str]:
    """kube-proxy's iptables-mode chains and canaries in one backend, both families."""
    removed = []
    for family in IPFamily:
        # Without -t: only the tables that exist are listed, none is created.
        saved = host.run(family, "save")
        if saved.returncode != 0:
            continue  # this backend's tool is missing or has no such family: nothing there
        try:
            state = parse_save(saved.stdout, family)
        except SaveFormatError as e:
            raise kernel.IptablesError(f"{host.backend.value} IPv{int(family)}: {e}") from e
        where = f"iptables-{host.backend.value} IPv{int(family)}"
        canaries = [name for name, table in state.tables.items() if kernel.CANARY in table.chains]
        if any(is_owned(name, chain) for name in MANAGED_TABLES if name in state.tables
               for chain in state.tables[name].chains):
            plan = kernel.cleanup(host, family)  # the canaries go with it
            removed.append(f"{where}: removed {len(plan.chains)} chains, {len(plan.jumps)} jumps")
        elif canaries:
            kernel.remove_canaries(host, family, canaries)
        if canaries:
            removed.append(f"{where}: removed {kernel.CANARY} from {', '.join(canaries)}")
    return removed


def _describe(p: Plan) -> list[str]:
    """Per service port: chains added / changed / deleted; then the jumps."""
    lines = []
    for group in p.services:
        who = str(group.owner) if group.owner else "(shared chains)"
        parts = [f"{kind} {', '.join(c.chain for c in chains)}" for kind, chains in
                 (("added", group.added), ("changed", group.changed), ("deleted", group.deleted)) if chains]
        lines.append(f"  {who}: {'; '.join(parts)}")
    lines += [f"  {jump.kind} jump in {jump.table}/{jump.chain}: {jump.rule}" for jump in p.jumps]
    return lines


def _rule_counts(desired: Ruleset, step: Plan, service_rules: int) -> dict[tuple[IPFamily, str], tuple[int, int]]:
    """Per table: the rules we own after the sync (our chains' rules and our jumps from built-in
    chains) and the rule lines the sync wrote (kube-proxy's iptablesRulesTotal / LastSync).
    `desired` may hold only some service chains (a partial sync's): `service_rules` counts all."""
    written = {edit.table: edit.rules_written() for edit in step.edits}
    counts = {}
    for table in desired.tables:
        owned = sum(len(chain.rules) for chain in table.chains if chain.owner is None)
        owned += service_rules if table.name == "nat" else 0
        owned += sum(1 for jump in desired.jumps if jump.table == table.name)
        counts[(desired.family, table.name)] = (owned, written.get(table.name, 0))
    return counts
