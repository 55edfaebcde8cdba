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
  service ports owning them (`desired_for_check`; which port owns a chain is worked out then,
  from the chain names the state gives: `owner_index`).

What is kept per family (`FamilyRecord`): each service port's lines in the shared chains, from
which the shared chains are assembled; the built-in chains as the kernel holds them and our
other chains as we wrote them (`base`, see `kept_state`); and how many rules the service chains
hold (for the rule metrics).

Memory that stays down also depends on where the kept objects lie. A full sync allocates some
hundred MiB for a moment (every rule's text, twice over with the kernel read back); kept
objects scattered among them would pin most of that memory's pymalloc arenas after it is
freed (73 of 153 MB were such gaps at 10,000 services). So a full sync compiles the kept lines
first, one service port at a time, each port's chains freed before the next port is compiled
(`full_step`), and `base` is made of those lines and the built-in chains only.

Compiling is deterministic, so the chains compiled again from the state a sync applied are the
text that sync sent. Pure: the proxier (`proxier.iptables`) reads and writes the kernel.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from kproxy_nft.compile.iptables import (
    PORT_CHAIN_PREFIXES,
    SERVICE_CHAIN_PREFIXES,
    Fragments,
    Ruleset,
    ServiceRules,
    assemble_ruleset,
    compile_ruleset,
    compile_service_port,
    endpoint_chain_name,
    service_chain_name,
    update_fragments,
)
from kproxy_nft.kernel.iptables_plan import Focus, focus_of
from kproxy_nft.kernel.iptables_text import KernelChain, KernelState, KernelTable
from kproxy_nft.model import ClusterState, IPFamily, NodeContext, ServicePortName, sort_key
from kproxy_nft.selection import endpoints_of_family


@dataclass(frozen=True)
class FamilyRecord:
    """One family's part of a `Record` (see the module docstring)."""

    fragments: Fragments  # every service port, chains left out (`ServiceRules.without_chains`)
    base: KernelState  # the kernel after the last sync: built-in chains, and ours but the service chains
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
    `fragments` are every service port's (those of a full sync already without chains);
    `compiled` the service ports compiled for this step, with their chains (all of them in a
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
        fragments = self.fragments  # this step's own dict
        for name, fragment in self.compiled.items():
            if fragments[name] is fragment:  # a partial step's: kept without its chains from now on
                fragments[name] = fragment.without_chains()
        service_rules = _rules_in(self.compiled.values())
        if self.previous is not None:
            service_rules += self.previous.service_rules - _rules_in(self.old.values())
        return FamilyRecord(fragments, kept_state(after, self.desired), service_rules)


def _rules_in(fragments: Iterable[ServiceRules]) -> int:
    return sum(len(chain.rules) for fragment in fragments for chain in fragment.chains)


def kept_state(after: KernelState, desired: Ruleset, previous: KernelState | None = None) -> KernelState:
    """What a record keeps of the kernel once `desired` is applied: the built-in chains as they
    are (their jumps are compared by position), and our chains but the service chains, in
    `desired`'s text (which the kernel now holds, maybe spelled otherwise).

    Others' chains are left out: a partial plan never looks at them (only our service chains
    can be stale in one), and a drift check reads what it compares. A chain equal in
    `previous` (the record's `base` before) is kept as it was, not as just compiled again (by a
    drift check): see the module docstring on where kept objects lie.
    """
    tables = {}
    for table in desired.tables:
        chains = {name: chain for name, chain in after.table(table.name).chains.items() if chain.builtin}
        before = previous.table(table.name).chains if previous is not None else {}
        for chain in table.chains:
            if chain.owner is None:
                kept = before.get(chain.name)
                if kept is None or kept.rules != chain.rules:
                    kept = KernelChain(chain.name, chain.rules)
                chains[chain.name] = kept
        tables[table.name] = KernelTable(table.name, chains)
    return KernelState(after.family, tables)


def compile_port(state: ClusterState, name: ServicePortName, node: NodeContext, family: IPFamily) -> ServiceRules:
    """One service port of `state` (which must have it), compiled with its chains."""
    return compile_service_port(state.services[name], state.endpoints_of(name), node, family)


def full_step(state: ClusterState, node: NodeContext, family: IPFamily) -> Step:
    """Everything compiled, to be planned against the kernel as read.

    Compiled twice: first what the record keeps (each port's lines in the shared chains, its
    chains freed at once, so that the kept lines lie together), then the chains, which go when
    the sync ends (see the module docstring). The second costs 0.5 s at 10,000 services.
    """
    order = sorted(state.services, key=sort_key)
    kept = {name: compile_port(state, name, node, family).without_chains() for name in order}
    compiled = {name: compile_port(state, name, node, family) for name in order}
    # The shared chains from the kept lines, the service chains from the second compile.
    both = [ServiceRules(name, compiled[name].chains, kept[name].shared) for name in order]
    return Step(family, assemble_ruleset(both, node, family), None, None, kept, compiled, {}, None)


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
    fragments = dict(kept.fragments)
    if any(chain.startswith(SERVICE_CHAIN_PREFIXES) for chain in chains):
        owners = owner_index(record.state, family)
        for name in {owners[chain] for chain in chains if chain in owners}:
            fragments[name] = compile_port(record.state, name, record.node, family)
    return assemble_ruleset(fragments.values(), record.node, family)


def owner_index(state: ClusterState, family: IPFamily) -> dict[str, ServicePortName]:
    """Service chain name → the service port it belongs to, for every chain `state` can give
    rise to in `family` (a superset: every endpoint counts, usable or not).

    Worked out when a check needs it, not kept: a check of named service chains runs only when
    someone else changed one of ours, and the index is 110,000 names at 10,000 services
    (~10 MiB, and 0.2 s to work out).
    """
    index = {}
    for name, svc in state.services.items():
        if svc.cluster_ip(family) is None:
            continue
        for prefix in PORT_CHAIN_PREFIXES:
            index[service_chain_name(prefix, name)] = name
        for endpoint in endpoints_of_family(state.endpoints_of(name), family):
            index[endpoint_chain_name(name, endpoint)] = name
    return index


def _with_chains(base: KernelState, fragments: Collection[ServiceRules]) -> KernelState:
    """`base` with the service chains of `fragments` (in the nat table, where all of them are)."""
    nat = base.table("nat")
    chains = dict(nat.chains)
    for fragment in fragments:
        for chain in fragment.chains:
            chains[chain.name] = KernelChain(chain.name, chain.rules)
    return base.replace_table(KernelTable("nat", chains))
