"""iptables mode: kube-proxy's chains, one `iptables-restore --noflush` per IP family.

One `kernel.iptables.Syncer` per family keeps what it applied, so a partial sync neither reads
`iptables-save` nor recompiles unchanged service ports (`compile.iptables.update_fragments`,
`iptables_plan.Focus`: O(changed) up to the restore itself). A full sync reads the kernel back,
and counts a repair when what it finds needs another payload than what was applied.

`plan`/`apply` (the CLI's `apply`) plan every family first, then apply them all or nothing:
IPv4 is reverted when IPv6 then fails (`kernel.iptables.apply_families`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kproxy_nft.compile import iptables as compiler
from kproxy_nft.compile.memo import FragmentMemo
from kproxy_nft.kernel import iptables as kernel
from kproxy_nft.kernel.iptables_plan import Plan, focus_of
from kproxy_nft.kernel.iptables_text import render_save
from kproxy_nft.model import ClusterState, IPFamily, NodeContext, ServicePortName
from kproxy_nft.proxier import ProxierBase, ProxierPlan

if TYPE_CHECKING:
    from kproxy_nft.compile.iptables import Fragments


class IptablesProxier(ProxierBase):
    """The iptables mode for one node: a `Syncer` per family (see the module docstring)."""

    mode = "iptables"

    def __init__(self, node: NodeContext, *, netns: str | None = None, iptables_backend: str | None = None,
                 families: tuple[IPFamily, ...] | None = None) -> None:
        super().__init__(node, netns, families)
        self._backend = iptables_backend
        self._host: kernel.Host | None = None
        self._syncers: dict[IPFamily, kernel.Syncer] = {}
        self._drift = 0
        # The last synced fragments per family, and the node they were compiled for.
        self._fragments: tuple[dict[IPFamily, Fragments], NodeContext] | None = None
        self._memo: FragmentMemo[compiler.ServiceRules] = FragmentMemo()  # across syncs: unchanged ports reused

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

    def _syncer(self, family: IPFamily) -> kernel.Syncer:
        if family not in self._syncers:
            self._syncers[family] = kernel.Syncer(self.host, family)
        return self._syncers[family]

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

    # -- the agent's syncs --------------------------------------------------------------------

    def sync(self, state: ClusterState, full: bool, changed: frozenset[ServicePortName] | None = None) -> str:
        parts = []
        previous, self._fragments = self._fragments, None  # None again if this sync fails
        partial = not full and changed is not None and previous is not None and previous[1] is self._node
        synced = {}
        for family in self.families:
            syncer = self._syncer(family)
            focus = None
            if partial and previous is not None and changed is not None:
                # Only the changed service ports are recompiled and compared: O(changed), plus
                # assembling the shared chains. The kernel's cost is another matter (see README).
                old = previous[0][family]
                fragments = compiler.update_fragments(old, state, self._node, family, changed, self._memo)
                focus = focus_of(old, fragments, changed)
            else:
                fragments = compiler.compile_fragments(state, self._node, family, self._memo)
            desired = compiler.assemble_ruleset(fragments.values(), self._node, family)
            if full and syncer.state is not None:
                # A full sync reads the kernel back; if what it finds needs a different payload
                # than what we believe we applied, someone changed our chains: count the repair.
                kernel_state = kernel.read_state(self.host, family)
                expected = kernel.plan(desired, syncer.state).payload
                if kernel.plan(desired, kernel_state).payload != expected:
                    self._drift += 1
                syncer.state = kernel_state
            step = syncer.sync(desired, full=full and syncer.state is None, focus=focus)
            synced[family] = fragments
            parts.append(f"v{int(family)} chains={len(step.chains)} jumps={len(step.jumps)}")
        self._fragments = (synced, self._node)
        return " ".join(parts)

    def drift(self) -> int:
        return self._drift

    def close(self) -> None:
        """Nothing to release: every iptables call is its own process."""


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
