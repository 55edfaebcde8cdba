"""A `Proxier` for agent tests: records nothing itself; subclasses say what a sync does.

It implements the whole protocol (`kproxy_nft.proxier.Proxier`) so the agent under test uses
exactly the calls it uses on the real ones; a sync that must fail, record or clean conntrack
overrides `sync` or `clean_conntrack`.
"""

from __future__ import annotations

from collections.abc import Iterable

from kproxy_nft.kernel.conntrack import CleanupResult
from kproxy_nft.kernel.iptables_text import KernelState
from kproxy_nft.kernel.nftables_events import Interest
from kproxy_nft.model import ClusterState, IPFamily, NodeContext, ServicePortName
from kproxy_nft.proxier import DriftCheck, Proxier, ProxierPlan
from kproxy_nft.top import Sample
from kproxy_nft.trace import Program, iptables_program


class FakeProxier:
    mode = "nftables"
    counts_partial_failures = False
    counters_kept = "no counters"
    tools: tuple[str, ...] = ()
    families = (IPFamily.V4,)
    netns: str | None = None

    def __init__(self, node: NodeContext | None = None) -> None:
        self.node = node or NodeContext(hostname="node1")

    def set_node(self, node: NodeContext) -> None:
        self.node = node

    def sync(self, state: ClusterState, full: bool, changed: frozenset[ServicePortName] | None = None) -> str:
        return "ok"

    def rule_counts(self) -> dict[tuple[IPFamily, str], tuple[int, int]]:
        return {}

    def cleanup_failures(self) -> int:
        return 0

    def drift(self) -> int:
        return 0

    def check_drift(self, chains: frozenset[str] | None = None) -> DriftCheck:
        return DriftCheck()

    def repair(self, check: DriftCheck) -> bool:
        return True

    def probe(self) -> tuple[str, ...]:
        return ()

    def drift_interest(self) -> Interest | None:
        return None

    def clean_conntrack(self, state: ClusterState,
                        changed: frozenset[ServicePortName] | None = None) -> CleanupResult:
        return CleanupResult()

    def render(self, state: ClusterState, family: IPFamily = IPFamily.V4) -> str:
        return ""

    def plan(self, state: ClusterState) -> ProxierPlan:
        return ProxierPlan(True, (), "", None)

    def apply(self, plan: ProxierPlan) -> None:
        pass

    def read_back(self) -> str:
        return ""

    def cleanup(self) -> tuple[str, ...]:
        return ()

    def trace_program(self, state: ClusterState, family: IPFamily, local: frozenset[str]) -> Program:
        """Nothing compiled: a walk of it finds no rules."""
        return iptables_program(KernelState(family), local)

    def live_trace_program(self, family: IPFamily, local: frozenset[str]) -> Program | None:
        """No rules in the kernel."""
        return None

    def connection_counts(self, families: Iterable[IPFamily] = (IPFamily.V4, IPFamily.V6)) -> Sample | None:
        """No counters on the node."""
        return None

    def remove_leftovers(self, running: Proxier) -> tuple[str, ...]:
        """Nothing left to remove."""
        return ()

    def close(self) -> None:
        pass
