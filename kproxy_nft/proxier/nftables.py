"""nftables mode: the `ip` and `ip6` kproxy-nft tables, every family in one transaction.

The table of a family the node does not program is never touched (not even deleted). A partial
sync recompiles only the changed service ports (`compile.nftables.update_ruleset`) and the
backend compares only those (O(changed)); a full sync reads the tables back and repairs them.
`check_drift` does that read and comparison against what was last applied on another thread
(its own libnftables context), and `repair` sends the result if no sync overtook it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from kproxy_nft.compile import nftables as compiler
from kproxy_nft.compile.memo import FragmentMemo
from kproxy_nft.kernel import counters
from kproxy_nft.kernel.nft_monitor import list_tables
from kproxy_nft.kernel.nftables import FAMILIES, FollowupFailed, NftablesBackend, Plan, StalePlanError, read_table
from kproxy_nft.kernel.nftables_events import Interest
from kproxy_nft.kernel.nftables_transport import make_transport
from kproxy_nft.kernel.runner import kernel_has_ipv6
from kproxy_nft.model import ClusterState, IPFamily, NodeContext, ServicePortName
from kproxy_nft.proxier import DriftCheck, KernelSides, Proxier, ProxierBase, ProxierPlan
from kproxy_nft.top import Sample, from_nftables
from kproxy_nft.trace import Program
from kproxy_nft.trace.nftables import NftablesProgram, table_from_kernel, table_from_ruleset

NFT_FAMILIES = tuple(FAMILIES)  # ("ip", "ip6")

FOLLOWUP_HEADER = "--- then, as a second transaction (backend indexes no longer reachable) ---\n"


class NftablesProxier(ProxierBase):
    """The nftables mode for one node (see the module docstring)."""

    mode = "nftables"
    counts_partial_failures = False
    counters_kept = "backend map element counters"
    tools = ("nft",)

    def __init__(self, node: NodeContext, *, netns: str | None = None, iptables_backend: str | None = None,
                 families: tuple[IPFamily, ...] | None = None, sides: KernelSides | None = None) -> None:
        del iptables_backend  # iptables only
        super().__init__(node, netns, families)
        self._backend: NftablesBackend | None = sides.nftables if sides is not None else None
        self._desired: tuple[tuple[compiler.Ruleset, ...], NodeContext] | None = None  # last synced, and its node
        self._memo: FragmentMemo[compiler.ServiceFragment] = FragmentMemo()  # across syncs: unchanged ports reused
        self._cleanup_failures = 0  # see cleanup_failures

    @property
    def backend(self) -> NftablesBackend:
        if self._backend is None:
            self._backend = NftablesBackend(netns=self._netns)
        return self._backend

    def _ipv6_supported(self) -> bool:
        return kernel_has_ipv6()

    # -- one-shot: dump, apply, cleanup -----------------------------------------------------

    def render(self, state: ClusterState, family: IPFamily = IPFamily.V4) -> str:
        """Both families' tables, whatever `family` (one script loads them together)."""
        del family
        return compiler.render_script(compiler.compile_all(state, self._node))

    def plan(self, state: ClusterState) -> ProxierPlan:
        p = self.backend.plan(compiler.compile_all(state, self._node, self.families))
        payload = p.text + "".join(p.loads) + (FOLLOWUP_HEADER + p.followup if p.followup else "")
        return ProxierPlan(p.is_empty, (f"nftables: {p.summary}",), payload, p)

    def apply(self, plan: ProxierPlan) -> None:
        if not plan.is_empty:
            detail = plan.detail
            assert isinstance(detail, Plan)
            self.backend.apply(detail)

    def cleanup(self) -> tuple[str, ...]:
        self.backend.cleanup()
        return ("nftables: removed tables ip kproxy-nft and ip6 kproxy-nft (where present)",)

    def read_back(self) -> str:
        out = []
        for family in self.families:
            result = self.backend.transport.run(f"list table {compiler.nft_family(family)} {compiler.TABLE}")
            out.append(result.stdout)
        return "".join(out)

    # -- read only: trace, top; and taking a node over ----------------------------------------

    def trace_program(self, state: ClusterState, family: IPFamily, local: frozenset[str]) -> Program:
        """Our table of `family` as the compiler writes it, ready to walk."""
        return NftablesProgram(table_from_ruleset(compiler.compile_ruleset(state, self._node, family)), local)

    def live_trace_program(self, family: IPFamily, local: frozenset[str]) -> Program | None:
        """Our table of `family` as the kernel holds it (None: not there), ready to walk."""
        # The nft command, not libnftables: its errors come back to us for the one line, while
        # libnftables prints its own on stderr first.
        transport = make_transport(self._netns, use_libnftables=False)
        try:
            table = read_table(transport, compiler.nft_family(family))
        finally:
            transport.close()
        return NftablesProgram(table_from_kernel(table), local) if table is not None else None

    def connection_counts(self, families: Iterable[IPFamily] = (IPFamily.V4, IPFamily.V6)) -> Sample | None:
        """The counters of our backend maps' elements (`nft list map … backends-<proto>`), one
        endpoint of one cluster IP and port each: cluster IP traffic only. None: no such map."""
        with counters.reading():
            listings = counters.read_nftables_listings(self._netns, counters.present_families(families))
        return Sample(self.mode, time.time(), from_nftables(listings)) if listings else None

    def remove_leftovers(self, running: Proxier) -> tuple[str, ...]:
        """Our tables (`cleanup`, which deletes nothing else), unless `running` is this proxier."""
        if running is self:
            return ()
        present = tables_present(self._netns, compiler.TABLE)
        if not present:
            return ()
        self.cleanup()
        return (f"nftables: removed {', '.join(present)}",)

    # -- the agent's syncs --------------------------------------------------------------------

    def sync(self, state: ClusterState, full: bool, changed: frozenset[ServicePortName] | None = None) -> str:
        previous, self._desired = self._desired, None  # None again if this sync fails
        if full or changed is None or previous is None or previous[1] is not self._node:
            desired = compiler.compile_all(state, self._node, self.families, self._memo)
            hint = None
        else:
            # Only the changed service ports are recompiled and compared: O(changed), not O(cluster).
            desired = tuple(compiler.update_ruleset(ruleset, state, self._node, changed, self._memo)
                            for ruleset in previous[0])
            hint = changed
        try:
            p = self.backend.full_sync(desired) if full else self.backend.sync(desired, hint)
        except FollowupFailed:
            self._cleanup_failures += 1
            raise
        self._desired = (desired, self._node)
        return str(p.summary)

    def rule_counts(self) -> Mapping[tuple[IPFamily, str], tuple[int, int]]:
        return {}  # kube-proxy's rule counts are iptables-mode metrics

    def cleanup_failures(self) -> int:
        return self._cleanup_failures

    def drift(self) -> int:
        return int(self.backend.repairs_total)

    # -- drift: checked off the sync thread, noticed by the kernel ----------------------------

    def check_drift(self, chains: frozenset[str] | None = None) -> DriftCheck:
        # `chains`: what a notification named, chains and `@sets`; only those are read and put
        # back (the table whole when they cannot do: `NftablesBackend.check`).
        # Its own libnftables context: the sync thread's is not to be shared.
        reader = make_transport(self._netns)
        try:
            plan = self.backend.check(reader, chains)
        except StalePlanError:
            return DriftCheck(stale=True)
        finally:
            reader.close()
        if plan is None:
            return DriftCheck(known=False)
        if plan.is_empty:
            return DriftCheck()
        # Every command names its table: `… ip kproxy-nft …` (the leading space keeps ip6 apart).
        differs = tuple(f"{f} {compiler.TABLE}" for f in NFT_FAMILIES
                        if f" {f} {compiler.TABLE}" in plan.transactions)
        return DriftCheck(differs or ("kproxy-nft",), plan)

    def repair(self, check: DriftCheck) -> bool:
        plan = check.repair
        assert isinstance(plan, Plan)
        try:
            self.backend.apply(plan)
        except StalePlanError:
            return False
        return True

    def probe(self) -> tuple[str, ...]:
        """Our tables that are missing, by name only (a netlink dump of the table names)."""
        # A failed listing raises (not knowing is not "all gone"): the agent logs it and checks.
        listed = list_tables(self._netns)
        wanted = (f"{compiler.nft_family(f)} {compiler.TABLE}" for f in self.families)
        return tuple(table for table in wanted if table not in listed)

    def drift_interest(self) -> Interest:
        return Interest(tables=frozenset((compiler.nft_family(f), compiler.TABLE) for f in self.families))

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None


def tables_present(netns: str | None, name: str) -> list[str]:
    """`ip NAME`, `ip6 NAME`: those that exist (a netlink dump of the table names)."""
    listed = list_tables(netns)
    return [f"{family} {name}" for family in NFT_FAMILIES if f"{family} {name}" in listed]
