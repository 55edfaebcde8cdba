"""nftables mode: the `ip` and `ip6` kproxy-nft tables, every family in one transaction.

The table of a family the node does not program is never touched (not even deleted). A partial
sync recompiles only the changed service ports (`compile.nftables.update_ruleset`) and the
backend compares only those (O(changed)); a full sync reads the tables back and repairs them.
"""

from __future__ import annotations

from kproxy_nft.compile import nftables as compiler
from kproxy_nft.compile.memo import FragmentMemo
from kproxy_nft.kernel.nftables import NftablesBackend, Plan
from kproxy_nft.kernel.runner import kernel_has_ipv6
from kproxy_nft.model import ClusterState, IPFamily, NodeContext, ServicePortName
from kproxy_nft.proxier import ProxierBase, ProxierPlan

FOLLOWUP_HEADER = "--- then, as a second transaction (backend indexes no longer reachable) ---\n"


class NftablesProxier(ProxierBase):
    """The nftables mode for one node (see the module docstring)."""

    mode = "nftables"
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

    def drift(self) -> int:
        return int(self.backend.repairs_total)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None
