"""nftables mode: the `ip` and `ip6` kproxy-nft tables, every family in one transaction.

The table of a family the node does not program is never touched (not even deleted). A partial
sync recompiles only the changed service ports (`compile.nftables.update_ruleset`) and the
backend compares only those (O(changed)); a full sync reads the tables back and repairs them.
`check_drift` does that read and comparison against what was last applied on another thread
(its own libnftables context), and `repair` sends the result if no sync overtook it.
"""

from __future__ import annotations

from collections.abc import Mapping

from kproxy_nft.compile import nftables as compiler
from kproxy_nft.compile.memo import FragmentMemo
from kproxy_nft.kernel.nftables import NftablesBackend, Plan, StalePlanError
from kproxy_nft.kernel.nftables_events import Interest
from kproxy_nft.kernel.nftables_transport import make_transport
from kproxy_nft.kernel.runner import kernel_has_ipv6
from kproxy_nft.model import ClusterState, IPFamily, NodeContext, ServicePortName
from kproxy_nft.proxier import DriftCheck, ProxierBase, ProxierPlan

FOLLOWUP_HEADER = "--- then, as a second transaction (backend indexes no longer reachable) ---\n"


class NftablesProxier(ProxierBase):
    """The nftables mode for one node (see the module docstring)."""

    mode = "nftables"
    counts_partial_failures = False
    tools = ("nft",)

    def __init__(self, node: NodeContext, *, netns: str | None = None, iptables_backend: str | None = None,
                 families: tuple[IPFamily, ...] | None = None) -> None:
        del iptables_backend  # iptables only
        super().__init__(node, netns, families)
        self._backend: NftablesBackend | None = None
        self._desired: tuple[tuple[compiler.Ruleset, ...], NodeContext] | None = None  # last synced, and its node
        self._memo: FragmentMemo[compiler.ServiceFragment] = FragmentMemo()  # across syncs: unchanged ports reused

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
        payload = p.text + (FOLLOWUP_HEADER + p.followup if p.followup else "")
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
        p = self.backend.full_sync(desired) if full else self.backend.sync(desired, hint)
        self._desired = (desired, self._node)
        return str(p.summary)

    def rule_counts(self) -> Mapping[tuple[IPFamily, str], tuple[int, int]]:
        return {}  # kube-proxy's rule counts are iptables-mode metrics

    def drift(self) -> int:
        return int(self.backend.repairs_total)

    # -- drift: checked off the sync thread, noticed by the kernel ----------------------------

    def check_drift(self, chains: frozenset[str] | None = None) -> DriftCheck:
        del chains  # reading the table is the cost here, and it is read whole either way
        # Its own libnftables context: the sync thread's is not to be shared.
        reader = make_transport(self._netns)
        try:
            plan = self.backend.check(reader)
        except StalePlanError:
            return DriftCheck(stale=True)
        finally:
            reader.close()
        if plan is None:
            return DriftCheck(known=False)
        if plan.is_empty:
            return DriftCheck()
        # Every command names its table: `… ip kproxy-nft …` (the leading space keeps ip6 apart).
        differs = tuple(f"{f} {compiler.TABLE}" for f in ("ip", "ip6")
                        if f" {f} {compiler.TABLE}" in plan.text + plan.followup)
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
        """Our tables, by name only (`list tables` reads no rules: cheap at any size)."""
        listed = set(self.backend.transport.run("list tables").stdout.splitlines())
        wanted = (f"{compiler.nft_family(f)} {compiler.TABLE}" for f in self.families)
        return tuple(table for table in wanted if f"table {table}" not in listed)

    def drift_interest(self) -> Interest:
        return Interest(tables=frozenset((compiler.nft_family(f), compiler.TABLE) for f in self.families))

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None
