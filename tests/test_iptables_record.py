"""The iptables agent keeps no per-service rule text between syncs (`kernel.iptables_record`).

Its syncs, checks and repairs run against the in-memory iptables (`FakeIptables`, which
applies restore input with the kernel's rules). After any sequence of partial and full syncs
the fake holds exactly what a full plan from scratch wants, the rule counts match what the fake
holds, and a drift check finds nothing; a chain someone else changed is found by the check a
notification naming it starts, and repaired.
"""

from __future__ import annotations

from typing import Any, cast

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from kproxy_nft.compile.iptables import KUBE_FIREWALL, SEP_PREFIX, SERVICE_CHAIN_PREFIXES, compile_ruleset
from kproxy_nft.diff_offline import _SysctlAccepted
from kproxy_nft.kernel.iptables import Host, IptablesBackend, RestoreError
from kproxy_nft.kernel.iptables_fake import FakeIptables
from kproxy_nft.kernel.iptables_plan import is_owned, plan
from kproxy_nft.kernel.iptables_record import compile_port, owner_index
from kproxy_nft.kernel.iptables_rule import jump_target
from kproxy_nft.kernel.iptables_text import KernelChain, KernelState
from kproxy_nft.model import ClusterState, Endpoint, IPFamily, ServicePort, ServicePortName
from kproxy_nft.proxier import KernelSides
from kproxy_nft.proxier.iptables import IptablesProxier
from tests.helpers import NODE, changed_names
from tests.test_nftables_plan import PROPERTY, flaps, sync_sequences

FAMILIES = (IPFamily.V4, IPFamily.V6)


def proxier_on(fake: FakeIptables) -> IptablesProxier:
    host = Host(IptablesBackend.NFT, None, _SysctlAccepted(fake))
    return IptablesProxier(NODE, families=FAMILIES, sides=KernelSides(iptables=host, nftables=cast(Any, None)))


def sync(proxier: IptablesProxier, previous: ClusterState | None, state: ClusterState, how: str) -> None:
    if how == "changed" and previous is not None:
        proxier.sync(state, full=False, changed=frozenset(changed_names(previous, state)))
    else:
        proxier.sync(state, full=how == "full")


def owned_rules(state: KernelState, table: str) -> int:
    """Rules of the chains we write, and our jumps in built-in chains (what the rule metric counts)."""

    def ours(chain: str | None) -> bool:
        return chain is not None and (is_owned(table, chain) or chain == KUBE_FIREWALL)

    chains = state.table(table).chains.values()
    return (sum(len(c.rules) for c in chains if not c.builtin and ours(c.name))
            + sum(ours(jump_target(rule)) for c in chains if c.builtin for rule in c.rules))


@PROPERTY
@given(st.one_of(sync_sequences(), flaps()))
def test_syncs_without_the_rule_text_leave_what_a_full_plan_wants(steps: list[tuple[ClusterState, str]]) -> None:
    fake = FakeIptables()
    proxier = proxier_on(fake)
    previous = None
    for state, how in steps:
        sync(proxier, previous, state, how)
        for family in FAMILIES:
            kernel = fake.state(family=family)
            assert plan(compile_ruleset(state, NODE, family), kernel).is_empty, (family, how)
            for table in ("nat", "filter"):
                assert proxier.rule_counts()[(family, table)][0] == owned_rules(kernel, table), (family, table)
            # No rule text of a service chain is kept; a check finds each one's owner all the same.
            record = proxier._record  # noqa: SLF001 - what the agent keeps is the point here
            assert record is not None
            kept = record.families[family]
            assert not any(fragment.chains for fragment in kept.fragments.values())
            assert not any(name.startswith(SERVICE_CHAIN_PREFIXES) for name in kept.base.table("nat").chains)
            owners = owner_index(state, family)
            for name in kernel.table("nat").chains:
                if name.startswith(SERVICE_CHAIN_PREFIXES):
                    assert name in {c.name for c in compile_port(state, owners[name], NODE, family).chains}
        check = proxier.check_drift()
        assert check.known and not check.stale and check.differs == ()
        previous = state
    event(f"syncs: {len(steps)}, partial: {sum(how == 'changed' for _, how in steps[1:])}")


@PROPERTY
@given(sync_sequences(), st.data())
def test_a_chain_someone_else_changed_is_found_by_a_check_of_that_chain_and_repaired(
    steps: list[tuple[ClusterState, str]], data: st.DataObject
) -> None:
    fake = FakeIptables()
    proxier = proxier_on(fake)
    previous = None
    for state, how in steps:
        sync(proxier, previous, state, how)
        previous = state
    family = data.draw(st.sampled_from(FAMILIES))
    kernel = fake.state(family=family)
    nat = kernel.table("nat")
    ours = sorted(name for name in nat.chains if name.startswith(SEP_PREFIX))
    if not ours:
        return
    name = data.draw(st.sampled_from(ours))
    emptied = KernelChain(name, ())  # flushed by someone else
    fake.set_state(kernel.replace_table(type(nat)("nat", {**nat.chains, name: emptied})))
    assert proxier.check_drift(frozenset({"KUBE-SERVICES"})).differs == ()  # not named: not looked at
    check = proxier.check_drift(frozenset({name}))
    assert check.differs == (f"IPv{int(family)} nat",)
    record = proxier._record  # noqa: SLF001 - what the agent keeps is the point here
    assert record is not None
    assert proxier.repair(check)
    # The shared chains the record keeps are the same objects, not the check's compile of them.
    after = proxier._record  # noqa: SLF001
    assert after is not None
    for table in ("nat", "filter"):
        kept, now = record.families[family].base.table(table).chains, after.families[family].base.table(table).chains
        assert all(now[chain] is kept[chain] for chain in kept if not kept[chain].builtin)
    assert plan(compile_ruleset(state, NODE, family), fake.state(family=family)).is_empty
    assert proxier.check_drift().differs == ()


def test_a_partial_sync_whose_filter_table_fails_takes_back_only_what_it_changed() -> None:
    """nat commits, filter is refused: the revert starts from the partial sync's `before`,
    which holds only the changed service's chains; web, unchanged, keeps its chains."""
    web, db = (ServicePortName("default", name, "http") for name in ("web", "db"))
    services = {name: ServicePort(name, 80, 8080, cluster_ips=(ip,))
                for name, ip in ((web, "172.30.0.1"), (db, "172.30.0.2"))}  # fmt: skip
    endpoints = {web: (Endpoint("10.1.0.1", 8080),), db: (Endpoint("10.1.0.2", 8080),)}
    before = ClusterState(services, endpoints)
    after = ClusterState(services, {web: endpoints[web]})  # db loses its endpoint: a REJECT in filter
    fake = FakeIptables()
    proxier = proxier_on(fake)
    proxier.sync(before, full=True)
    kept = fake.state(family=IPFamily.V4)
    fake.refuse = lambda table: table == "filter"
    with pytest.raises(RestoreError) as failed:
        proxier.sync(after, full=False, changed=frozenset({db}))
    assert failed.value.kernel_unchanged, failed.value.note
    assert fake.state(family=IPFamily.V4) == kept
    fake.refuse = lambda table: False
    proxier.sync(after, full=False, changed=frozenset({db}))  # after a failure: a full sync
    assert plan(compile_ruleset(after, NODE, IPFamily.V4), fake.state(family=IPFamily.V4)).is_empty
