"""What an iptables-mode agent keeps between syncs: everything but the per-service rule text.

At 10,000 services × 10 endpoints the per-service chains (`KUBE-SVC-`, `KUBE-SEP-`, …) are
110,000 chains holding 330,000 rules, about 80 MiB of text. Kept from one sync to the next, they
made the iptables agent nearly twice the size of the nftables one. Instead they are compiled
again when they are needed, from the cluster state the last sync applied (`Record.state`: the
change tracker's snapshot, which exists anyway):

* a partial sync compiles each changed service port twice, as it was and as it is, and plans
  against `base` plus the chains as they were (`partial_step`): O(changed), as before;
* a full sync compiles everything (0.5 s at 10,000 services) and plans against the kernel read
  afresh (`full_step`), which it did already;
* a drift check compiles everything too, or, for the chains a notification named, only the
  service ports owning them (`desired_for_check`, through `FamilyRecord.owners`).

What is kept per family (`FamilyRecord`): each service port's lines in the shared chains, from
which the shared chains are assembled; the kernel state without the service chains (`base`:
built-in, fixed and shared chains, and whatever else the tables hold); which service port owns
each service chain; and how many rules the service chains hold (for the rule metrics).

Compiling is deterministic, so the chains compiled again from the state a sync applied are the
text that sync sent. Pure: the proxier (`proxier.iptables`) reads and writes the kernel.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from kproxy_nft.compile.iptables import (
    Fragments,
    Ruleset,
    ServiceRules,
    assemble_ruleset,
    compile_fragments,
    compile_ruleset,
    compile_service_port,
    update_fragments,
)
from kproxy_nft.kernel.iptables_plan import Focus, focus_of, without_service_chains
from kproxy_nft.kernel.iptables_text import KernelChain, KernelState, KernelTable
from kproxy_nft.model import ClusterState, IPFamily, NodeContext, ServicePortName


@dataclass(frozen=True)
class FamilyRecord:
    """One family's part of a `Record` (see the module docstring)."""

    fragments: Fragments  # every service port, chains left out (`ServiceRules.without_chains`)
    base: KernelState  # the kernel after the last sync, without the service chains
    # Service chain → its service port. Updated in place by partial syncs: a drift check that
    # holds an older record finds it changed, and is stale anyway (the proxier's generation).
    owners: dict[str, ServicePortName]
    service_rules: int  # rules in the service chains


@dataclass(frozen=True)
class Record:
    """What the last successful sync applied: its cluster state and node, and per family the rest."""

    state: ClusterState
    node: NodeContext
    families: Mapping[IPFamily, FamilyRecord]


@dataclass(frozen=True)
class Step:
    """One family's part of a sync: what to plan, and what to record once it is applied.

    `current` is None for a full sync: the caller plans against the kernel, read afresh.
    `compiled` are the service ports compiled for this step, with their chains (all of them in a
    full sync); `old` are, in a partial sync, the changed ports as the previous sync applied them.
    """

    family: IPFamily
    desired: Ruleset
    current: KernelState | None
    focus: Focus | None
    fragments: Fragments
    compiled: Mapping[ServicePortName, ServiceRules]
    old: Mapping[ServicePortName, ServiceRules]
    previous: FamilyRecord | None

    def recorded(self, after: KernelState) -> FamilyRecord:
        """The record once the plan made from this step is applied (`after`: `Plan.after`)."""
        fragments = self.fragments if self.previous is not None else dict(self.fragments)  # partial: a copy already
        for name, fragment in self.compiled.items():
            fragments[name] = fragment.without_chains()
        new_rules = sum(len(chain.rules) for fragment in self.compiled.values() for chain in fragment.chains)
        if self.previous is None:
            owners = {chain.name: name for name, fragment in self.compiled.items() for chain in fragment.chains}
            return FamilyRecord(fragments, without_service_chains(after), owners, new_rules)
        owners = self.previous.owners
        for fragment in self.old.values():
            for chain in fragment.chains:
                owners.pop(chain.name, None)
        for name, fragment in self.compiled.items():
            for chain in fragment.chains:
                owners[chain.name] = name
        old_rules = sum(len(chain.rules) for fragment in self.old.values() for chain in fragment.chains)
        return FamilyRecord(fragments, without_service_chains(after), owners,
                            self.previous.service_rules - old_rules + new_rules)


def compile_port(state: ClusterState, name: ServicePortName, node: NodeContext, family: IPFamily) -> ServiceRules:
    """One service port of `state` (which must have it), compiled with its chains."""
    return compile_service_port(state.services[name], state.endpoints_of(name), node, family)


def full_step(state: ClusterState, node: NodeContext, family: IPFamily) -> Step:
    """Everything compiled, to be planned against the kernel as read."""
    fragments = compile_fragments(state, node, family)
    return Step(family, assemble_ruleset(fragments.values(), node, family), None, None, fragments, fragments, {}, None)


def partial_step(record: Record, state: ClusterState, family: IPFamily, changed: Collection[ServicePortName]) -> Step:
    """Only the `changed` service ports, as they were and as they are; `state` differs from
    `record.state` in those ports only, for the same node (`record.node`)."""
    previous, node = record.families[family], record.node
    old = {name: compile_port(record.state, name, node, family) for name in changed if name in record.state.services}
    fragments = update_fragments(previous.fragments, state, node, family, changed)
    compiled = {name: fragments[name] for name in changed if name in fragments}
    current = _with_chains(previous.base, old.values())
    desired = assemble_ruleset(fragments.values(), node, family)
    return Step(family, desired, current, focus_of(old, compiled, changed), fragments, compiled, old, previous)


def desired_for_check(record: Record, family: IPFamily, chains: Collection[str] | None) -> Ruleset:
    """The rules a drift check compares with the kernel: all of them (`chains` None), or the
    shared chains and the chains of the service ports owning the named `chains`."""
    if chains is None:
        return compile_ruleset(record.state, record.node, family)
    kept = record.families[family]
    owners = {kept.owners.get(chain) for chain in chains}
    fragments = dict(kept.fragments)
    for name in owners:
        if name is not None and name in record.state.services:  # else a later sync's: stale
            fragments[name] = compile_port(record.state, name, record.node, family)
    return assemble_ruleset(fragments.values(), record.node, family)


def _with_chains(base: KernelState, fragments: Collection[ServiceRules]) -> KernelState:
    """`base` with the service chains of `fragments` (in the nat table, where all of them are)."""
    nat = base.table("nat")
    chains = dict(nat.chains)
    for fragment in fragments:
        for chain in fragment.chains:
            chains[chain.name] = KernelChain(chain.name, chain.rules)
    return base.replace_table(KernelTable("nat", chains))
