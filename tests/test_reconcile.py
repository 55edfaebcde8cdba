"""Reconcile without a kernel: plan/diff properties on the simulator, and apply/cleanup through the fake runner.

The simulator (`kproxy_nft.kernel.iptables_fake.simulate_restore`) applies restore input with
iptables-restore's semantics (per-table transactions, --noflush chain flushing, refusing jumps
to missing chains and deleting referenced chains); `FakeIptables` answers the exact argv the
backend runs, so these tests pin the commands and their stdin.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy_nft.compile.iptables import Ruleset, compile_ruleset
from kproxy_nft.kernel import iptables as iptables_kernel
from kproxy_nft.kernel.iptables import (
    Host,
    IptablesBackend,
    RestoreError,
    apply,
    choose_backend,
    cleanup,
    detect_backend,
    read_state,
)
from kproxy_nft.kernel.iptables_fake import FakeIptables, SimulatedRestoreError, simulate_restore
from kproxy_nft.kernel.iptables_plan import (
    ChainChangeKind,
    Plan,
    PlanError,
    TableEdit,
    cleanup_plan,
    is_owned,
    plan,
    revert_plan,
)
from kproxy_nft.kernel.iptables_rule import canonical, jump_target
from kproxy_nft.kernel.iptables_text import KernelChain, KernelState, KernelTable, parse_save, render_save
from kproxy_nft.kernel.netns import exec_argv
from kproxy_nft.kernel.runner import Completed, SubprocessRunner
from kproxy_nft.model import (
    ClusterState,
    Endpoint,
    IPFamily,
    NodeContext,
    Protocol,
    ServicePort,
    ServicePortName,
    TrafficPolicy,
)

NODE = NodeContext(hostname="node1", cluster_cidrs=("10.0.0.0/8", "fd00:10::/64"))
POOL = [
    ServicePortName("ns1", "web", "http"),
    ServicePortName("ns1", "web", "https"),
    ServicePortName("ns1", "dns", "dns", Protocol.UDP),
    ServicePortName("ns2", "db", ""),
    ServicePortName("ns2", "sctp", "s", Protocol.SCTP),
]


# ---------------------------------------------------------------------------------------------
# builders
# ---------------------------------------------------------------------------------------------


def foreign_state(family: IPFamily = IPFamily.V4) -> KernelState:
    """Rules of other software: kubelet's KUBE-FIREWALL, a user chain, a MASQUERADE rule."""
    source = "192.0.2.0/24" if family is IPFamily.V4 else "2001:db8::/32"
    return parse_save(
        f"""\
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
-A INPUT -j KUBE-FIREWALL
-A KUBE-FIREWALL -m mark --mark 0x8000/0x8000 -j DROP
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:FOREIGN - [0:0]
-A PREROUTING -j FOREIGN
-A POSTROUTING -s {source} -j MASQUERADE
-A FOREIGN -p tcp -m tcp --dport 22 -j RETURN
COMMIT
""",
        family,
    )


def load(desired: Ruleset, base: KernelState | None = None) -> KernelState:
    """The simulated kernel after applying `desired` on top of `base` (empty by default)."""
    base = base or KernelState(desired.family)
    return simulate_restore(base, plan(desired, base).payload)


def view(state: KernelState) -> dict[str, dict[str, tuple[str | None, tuple[str, ...]]]]:
    """The state as the kernel sees it: canonical rules, chain order ignored."""
    return {
        name: {c.name: (c.policy, tuple(canonical(r, state.family) for r in c.rules)) for c in table.chains.values()}
        for name, table in state.tables.items()
        if table.chains
    }


def ours(state: KernelState) -> dict[tuple[str, str], tuple[str, ...]]:
    """Our chains in a state, canonical."""
    return {
        (t, c.name): tuple(canonical(r, state.family) for r in c.rules)
        for t, table in state.tables.items()
        for c in table.chains.values()
        if not c.builtin and is_owned(t, c.name)
    }


def wanted(desired: Ruleset) -> dict[tuple[str, str], tuple[str, ...]]:
    return {
        (t.name, c.name): tuple(canonical(r, desired.family) for r in c.rules) for t in desired.tables for c in t.chains
    }


def theirs(state: KernelState) -> dict[str, dict[str, tuple[str, ...]]]:
    """Everything that is not ours: other chains, and rules of built-in chains not jumping to ours."""
    return {
        t: {
            c.name: tuple(r for r in c.rules if not is_owned(t, jump_target(r) or ""))
            for c in table.chains.values()
            if c.builtin or not is_owned(t, c.name)
        }
        for t, table in state.tables.items()
    }


def two_table_change(family: IPFamily = IPFamily.V4) -> tuple[Ruleset, Ruleset]:
    """A ruleset and a successor that differs in both tables (a REJECT goes, endpoints come)."""
    return compile_ruleset(sample_state(empty=1), NODE, family), compile_ruleset(sample_state(), NODE, family)


def inject(p: Plan, table: str, line: str) -> Plan:
    """The test hook: `p` with one more line (say, an invalid rule) at the end of a table's block."""
    edits = tuple(dataclasses.replace(e, lines=(*e.lines, line)) if e.table == table else e for e in p.edits)
    if table not in p.tables:
        edits += (TableEdit(table, (line,)),)
    return dataclasses.replace(p, edits=edits)


def sample_state(endpoint_generation: int = 0, services: int = 3, empty: int | None = None) -> ClusterState:
    """The first `services` of POOL, dual-stack, two endpoints per family; service `empty` has none."""
    ports = {}
    endpoints = {}
    for i, name in enumerate(POOL[:services]):
        if i == empty:
            ports[name] = ServicePort(name, 80 + i, 8080, cluster_ips=(f"172.30.0.{i + 1}", f"fd00:30::{i + 1}"))
            continue
        ports[name] = ServicePort(name, 80 + i, 8080, cluster_ips=(f"172.30.0.{i + 1}", f"fd00:30::{i + 1}"))
        hosts = [j + 1 + endpoint_generation for j in range(2)]
        v4 = [Endpoint(f"10.1.{i}.{h}", 8080) for h in hosts]
        endpoints[name] = (*v4, *(Endpoint(f"fd00:10::{i}:{h}", 8080) for h in hosts))
    return ClusterState(ports, endpoints)


@st.composite
def rulesets(draw: st.DrawFn, family: IPFamily | None = None) -> Ruleset:
    """Small clusters over a fixed pool of names, so two draws overlap: added, changed, removed."""
    fam = family or draw(st.sampled_from(list(IPFamily)))
    ports: dict[ServicePortName, ServicePort] = {}
    endpoints: dict[ServicePortName, tuple[Endpoint, ...]] = {}
    for i, name in enumerate(POOL):
        if not draw(st.booleans()):
            continue
        ports[name] = ServicePort(
            name,
            80 + i,
            8080,
            cluster_ips=(f"172.30.0.{i + 1}", f"fd00:30::{i + 1}"),
            session_affinity_seconds=draw(st.sampled_from([None, 10800])),
            internal_traffic_policy=draw(st.sampled_from(list(TrafficPolicy))),
        )
        hosts = draw(st.lists(st.integers(1, 6), unique=True, max_size=4))
        eps = [
            Endpoint(f"10.1.{i}.{h}" if fam is IPFamily.V4 else f"fd00:10::{i}:{h}", 8080,
                     node_name=draw(st.sampled_from(["node1", "node2"])))
            for h in hosts
        ]  # fmt: skip
        endpoints[name] = tuple(sorted(eps, key=lambda ep: ep.address))
    node = dataclasses.replace(NODE, masquerade_all=draw(st.booleans()))
    return compile_ruleset(ClusterState(ports, endpoints), node, fam)


@st.composite
def two_rulesets(draw: st.DrawFn) -> tuple[Ruleset, Ruleset]:
    family = draw(st.sampled_from(list(IPFamily)))
    return draw(rulesets(family)), draw(rulesets(family))


# ---------------------------------------------------------------------------------------------
# properties of plan on the simulator
# ---------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(rulesets())
def test_every_chain_the_compiler_makes_is_recognized_as_ours(desired: Ruleset) -> None:
    # Ownership is by name (so that cleanup finds our chains without any memory of them).
    assert all(is_owned(t.name, c.name) for t in desired.tables for c in t.chains)
    assert all(is_owned(j.table, jump_target(j.rule) or "") for j in desired.jumps)


@settings(max_examples=60, deadline=None)
@given(rulesets(), st.booleans())
def test_diff_of_a_state_with_itself_is_empty(desired: Ruleset, with_foreign: bool) -> None:
    state = load(desired, foreign_state(desired.family) if with_foreign else None)
    assert plan(desired, state).is_empty
    # The state `plan` predicts is one against which there is nothing to do either.
    assert plan(desired, plan(desired, KernelState(desired.family)).after).is_empty


@settings(max_examples=100, deadline=None)
@given(two_rulesets(), st.booleans())
def test_applying_plan_a_to_b_on_state_a_gives_b(pair: tuple[Ruleset, Ruleset], with_foreign: bool) -> None:
    a, b = pair
    base = foreign_state(a.family) if with_foreign else KernelState(a.family)
    state_a = load(a, base)
    step = plan(b, state_a)
    state_b = simulate_restore(state_a, step.payload)
    assert ours(state_b) == wanted(b)
    assert view(state_b) == view(step.after)
    assert plan(b, state_b).is_empty
    # Other software's chains and rules are exactly as they were, in order.
    assert theirs(state_b) == theirs(state_a)
    for table, chain, rule in ((j.table, j.chain, j.rule) for j in b.jumps):
        rules = [canonical(r, b.family) for r in state_b.table(table).rules(chain)]
        assert rules.count(canonical(rule, b.family)) == 1


@settings(max_examples=60, deadline=None)
@given(rulesets())
def test_cleanup_leaves_exactly_the_foreign_rules(desired: Ruleset) -> None:
    base = foreign_state(desired.family)
    state = load(desired, base)
    cleaned = simulate_restore(state, cleanup_plan(state).payload)
    assert view(cleaned) == view(base)
    assert cleanup_plan(cleaned).is_empty


@settings(max_examples=60, deadline=None)
@given(two_rulesets())
def test_revert_restores_a_partly_committed_payload_exactly(pair: tuple[Ruleset, Ruleset]) -> None:
    a, b = pair
    before = load(a, foreign_state(a.family))
    step = plan(b, before)
    try:  # the kernel refuses the filter table after nat committed
        partial = simulate_restore(before, step.payload, refuse=lambda table: table == "filter")
    except SimulatedRestoreError as e:
        partial = e.state
    back = simulate_restore(partial, revert_plan(before, partial).payload)
    as_text = {t: {c.name: (c.policy, c.rules) for c in table.chains.values()} for t, table in back.tables.items()}
    assert as_text == {t: {c.name: (c.policy, c.rules) for c in tb.chains.values()} for t, tb in before.tables.items()}


rule_texts = st.sampled_from(
    ["-j RETURN", '-m comment --comment "a b" -j ACCEPT', "-s 10.0.0.1/32 -j DROP", "", "-p tcp -m tcp --dport 1"]
)
chain_names = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ-0123456789", min_size=1, max_size=12).filter(
    lambda n: not n.startswith("-")
)


@st.composite
def kernel_states(draw: st.DrawFn) -> KernelState:
    tables = {}
    for name in draw(st.lists(st.sampled_from(["filter", "nat", "mangle", "raw"]), unique=True)):
        policies = st.sampled_from(["ACCEPT", "DROP"])
        rules = st.lists(rule_texts, max_size=3)
        chains = [KernelChain(c, tuple(draw(rules)), draw(policies)) for c in ("INPUT", "OUTPUT")]
        for c in draw(st.lists(chain_names, unique=True, max_size=4)):
            if c not in ("INPUT", "OUTPUT"):
                chains.append(KernelChain(c, tuple(draw(rules))))
        tables[name] = KernelTable.of(name, chains)
    return KernelState(draw(st.sampled_from(list(IPFamily))), tables)


@given(kernel_states())
def test_parse_render_round_trips(state: KernelState) -> None:
    assert parse_save(render_save(state), state.family) == state


# ---------------------------------------------------------------------------------------------
# minimality and the shape of payloads
# ---------------------------------------------------------------------------------------------


def test_an_endpoint_change_rewrites_only_that_service() -> None:
    before = load(compile_ruleset(sample_state(), NODE))
    changed = sample_state()
    name = POOL[1]
    endpoints = dict(changed.endpoints)
    endpoints[name] = (Endpoint("10.1.1.9", 8080), *endpoints[name][1:])  # one IPv4 endpoint replaced
    step = plan(compile_ruleset(ClusterState(changed.services, endpoints), NODE), before)
    assert step.tables == ("nat",)
    assert "KUBE-SERVICES" not in step.payload
    assert [s.owner for s in step.services] == [name]
    (summary,) = step.services
    assert [c.chain[:9] for c in summary.added] == ["KUBE-SEP-"]
    assert [c.chain[:9] for c in summary.changed] == ["KUBE-SVC-"]
    assert [c.chain[:9] for c in summary.deleted] == ["KUBE-SEP-"]
    # Stale chain: flushed by its declaration, deleted at the very end.
    deleted = summary.deleted[0].chain
    lines = step.payload.splitlines()
    assert lines.index(f":{deleted} - [0:0]") < lines.index(f"-X {deleted}") == len(lines) - 2


def test_a_new_service_touches_the_shared_chain() -> None:
    before = load(compile_ruleset(sample_state(services=2), NODE))
    step = plan(compile_ruleset(sample_state(services=3), NODE), before)
    assert ":KUBE-SERVICES - [0:0]" in step.payload.splitlines()
    owners = [s.owner for s in step.services]
    assert owners == [None, POOL[2]]  # the shared chains first
    assert [c.chain for c in step.services[0].changed] == ["KUBE-SERVICES"]


def test_a_removed_service_is_summarized_under_its_name_from_the_comments() -> None:
    before = load(compile_ruleset(sample_state(services=3), NODE))
    step = plan(compile_ruleset(sample_state(services=2), NODE), before)
    removed = next(s for s in step.services if s.owner is not None)
    assert removed.owner == POOL[2]  # ns1/dns:dns, UDP: guessed from `-p udp` of its chains
    assert {c.kind for c in removed.deleted} == {ChainChangeKind.DELETED} and len(removed.deleted) == 3


def test_jumps_exist_exactly_once_and_in_order() -> None:
    desired = compile_ruleset(sample_state(), NODE)
    state = load(desired, foreign_state())
    portals = next(j for j in desired.jumps if j.table == "nat" and j.chain == "PREROUTING")
    nat = state.table("nat")
    # Someone duplicated our jump, and left an old jump to our chain with another comment.
    prerouting = KernelChain(
        "PREROUTING", (*nat.rules("PREROUTING"), portals.rule, "-m comment --comment old -j KUBE-SERVICES"), "ACCEPT"
    )
    state = state.replace_table(KernelTable(nat.name, {**nat.chains, "PREROUTING": prerouting}))
    step = plan(desired, state)
    # Both copies go (-D removes the first match each time) and one comes back on top.
    assert step.payload.splitlines()[1:-1] == [
        f"-D PREROUTING {portals.rule}",
        f"-D PREROUTING {portals.rule}",
        "-D PREROUTING -m comment --comment old -j KUBE-SERVICES",
        f"-I PREROUTING 1 {portals.rule}",
    ]
    after = simulate_restore(state, step.payload)
    assert [canonical(r) for r in after.table("nat").rules("PREROUTING")] == [
        canonical(portals.rule), "-j FOREIGN"
    ]


def test_missing_jumps_are_prepended_in_the_compilers_order() -> None:
    desired = compile_ruleset(sample_state(), NODE)
    state = load(desired, foreign_state())
    filter_table = state.table("filter")
    bare = KernelChain("INPUT", ("-j KUBE-FIREWALL",), "ACCEPT")
    state = state.replace_table(KernelTable("filter", {**filter_table.chains, "INPUT": bare}))
    step = plan(desired, state)
    inputs = [j.rule for j in desired.jumps if j.chain == "INPUT" and j.table == "filter"]
    assert step.payload.splitlines()[1:-1] == [f"-I INPUT 1 {rule}" for rule in reversed(inputs)]
    after = simulate_restore(state, step.payload).table("filter").rules("INPUT")
    assert list(after) == [*inputs, "-j KUBE-FIREWALL"]


def test_a_stale_chain_someone_else_jumps_to_is_emptied_not_deleted() -> None:
    desired = compile_ruleset(sample_state(services=3), NODE)
    state = load(desired, foreign_state())
    svc = next(c.name for c in desired.table("nat").chains if c.name.startswith("KUBE-SVC-"))
    nat = state.table("nat")
    foreign = KernelChain("FOREIGN", (*nat.rules("FOREIGN"), f"-j {svc}"))
    state = state.replace_table(KernelTable("nat", {**nat.chains, "FOREIGN": foreign}))
    step = plan(compile_ruleset(sample_state(services=0), NODE), state)
    assert f"-X {svc}" not in step.payload and f":{svc} - [0:0]" in step.payload
    after = simulate_restore(state, step.payload)
    assert after.table("nat").rules(svc) == ()
    assert plan(compile_ruleset(sample_state(services=0), NODE), after).is_empty


def test_families_must_match() -> None:
    with pytest.raises(PlanError, match="IPv6"):
        plan(compile_ruleset(sample_state(), NODE, IPFamily.V6), KernelState(IPFamily.V4))


def test_payload_lines_are_numbered_like_iptables_restore() -> None:
    step = plan(compile_ruleset(sample_state(), NODE), KernelState(IPFamily.V4))
    assert step.payload_line(1) == "*nat"
    assert step.payload_line(len(step.payload.splitlines())) == "COMMIT"
    assert step.payload_line(0) is None


@pytest.mark.parametrize("first_table", [0, 1])
def test_each_line_sent_is_traced_back_to_its_payload_line_past_a_prelude(
    first_table: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What is sent to iptables-nft may carry a prelude after `*table` (`-S` and the built-in
    chains) and is written in pieces; an error's line number still names the plan's line."""
    monkeypatch.setattr(iptables_kernel, "_NFT_PRELUDE_FROM", 0)  # a prelude for every table
    step = plan(compile_ruleset(sample_state(), NODE), KernelState(IPFamily.V4))
    edits = step.edits[first_table:]
    first_line = 1 + sum(edit.line_count + 2 for edit in step.edits[:first_table])
    sent = iptables_kernel._prepare(Host(IptablesBackend.NFT, None, FakeIptables()), step, edits, first_line)
    payload, text = step.payload.splitlines(), "".join(sent.chunks()).splitlines()
    assert len(text) > sum(edit.line_count + 2 for edit in edits)  # there is a prelude
    traced = [sent.plan_line(Completed(2, "", f"Error occurred at line: {n}")) for n in range(1, len(text) + 2)]
    assert traced[-1] is None  # past the end
    for line, number in zip(text, traced, strict=False):
        if number is None:
            assert line == "-S" or line.startswith(":") and line.endswith(" [0:0]") and line.split()[1] == "ACCEPT"
        else:
            assert payload[number - 1] == line
    assert sorted(n for n in traced if n is not None) == list(range(first_line, len(payload) + 1))


# ---------------------------------------------------------------------------------------------
# apply, cleanup, detection through the fake runner
# ---------------------------------------------------------------------------------------------

NS = "kpn-unit"


def restore_argv(*extra: str, family: IPFamily = IPFamily.V4, backend: str = "nft") -> tuple[str, ...]:
    tool = "iptables" if family is IPFamily.V4 else "ip6tables"
    return ("ip", "netns", "exec", NS, f"{tool}-{backend}-restore", "-w", "--noflush", *extra)


def test_apply_sends_one_payload_validated_first_when_it_spans_two_tables() -> None:
    fake = FakeIptables()
    host = Host(IptablesBackend.NFT, NS, fake)
    step = plan(compile_ruleset(sample_state(), NODE), read_state(host))
    assert fake.calls == [
        (("ip", "netns", "exec", NS, "iptables-nft-save", "-t", "nat"), None),
        (("ip", "netns", "exec", NS, "iptables-nft-save", "-t", "filter"), None),
    ]
    fake.calls.clear()
    after = apply(step, host)
    # nat goes first and needs no test run: if it fails, nothing has committed. filter is tested.
    assert step.tables == ("nat", "filter")
    tail = "\n".join(step.edits[1].render()) + "\n"
    assert fake.calls == [(restore_argv("--test"), tail), (restore_argv(), step.payload)]
    assert view(after) == view(fake.state())
    fake.calls.clear()
    # Idempotence: the same input again sends nothing at all.
    assert apply(plan(compile_ruleset(sample_state(), NODE), read_state(host)), host) is not None
    assert [argv[4] for argv, _ in fake.calls] == ["iptables-nft-save", "iptables-nft-save"]


def test_a_single_table_payload_is_sent_once_and_ipv6_uses_ip6tables() -> None:
    fake = FakeIptables()
    host = Host(IptablesBackend.LEGACY, NS, fake)
    desired = compile_ruleset(sample_state(), NODE, IPFamily.V6)
    apply(plan(desired, read_state(host, IPFamily.V6)), host)
    fake.calls.clear()
    step = plan(compile_ruleset(sample_state(endpoint_generation=1), NODE, IPFamily.V6), read_state(host, IPFamily.V6))
    fake.calls.clear()
    apply(step, host)
    assert step.tables == ("nat",)
    assert fake.calls == [(restore_argv(family=IPFamily.V6, backend="legacy"), step.payload)]


def test_an_invalid_rule_is_caught_by_the_test_run_and_nothing_is_committed() -> None:
    fake = FakeIptables()
    host = Host(IptablesBackend.NFT, NS, fake)
    first, second = two_table_change()
    apply(plan(first, read_state(host)), host)
    before = fake.state()
    step = inject(plan(second, before), "filter", "-A KUBE-SERVICES -j NO-SUCH-CHAIN")
    fake.calls.clear()
    with pytest.raises(RestoreError) as caught:
        apply(step, host)
    assert [argv for argv, _ in fake.calls] == [restore_argv("--test")]
    error = caught.value
    assert error.kernel_unchanged and error.text == "-A KUBE-SERVICES -j NO-SUCH-CHAIN"
    assert error.line is not None and step.payload_line(error.line) == error.text
    assert "at payload line" in str(error) and "NO-SUCH-CHAIN" in str(error)
    assert fake.state() == before


def test_a_table_refused_at_commit_after_another_committed_is_reverted() -> None:
    fake = FakeIptables(refuse=lambda table: table == "filter")
    host = Host(IptablesBackend.NFT, NS, fake)
    first, second = two_table_change()
    fake.set_state(load(first, foreign_state()))
    before = fake.state()
    step = plan(second, read_state(host))
    assert step.tables == ("nat", "filter")
    with pytest.raises(RestoreError) as caught:
        apply(step, host)
    assert caught.value.kernel_unchanged and "reverted: nat" in str(caught.value)
    assert render_save(fake.state()) == render_save(before)


def test_a_failing_single_table_payload_is_reported_without_revert() -> None:
    fake = FakeIptables(refuse=lambda table: True)
    host = Host(IptablesBackend.NFT, NS, fake)
    step = plan(compile_ruleset(sample_state(), NODE), KernelState(IPFamily.V4))
    step = dataclasses.replace(step, edits=step.edits[:1])  # nat only
    with pytest.raises(RestoreError, match="atomic per table") as caught:
        apply(step, host)
    assert caught.value.line == len(step.payload.splitlines())  # the COMMIT that was refused
    assert len(fake.calls) == 1 and fake.state() == KernelState(IPFamily.V4)


def test_cleanup_removes_ours_in_one_payload() -> None:
    fake = FakeIptables()
    host = Host(IptablesBackend.NFT, None, fake)
    fake.set_state(load(compile_ruleset(sample_state(), NODE), foreign_state()))
    removal = cleanup(host)
    restores = [(argv, stdin) for argv, stdin in fake.calls if argv[0] == "iptables-nft-restore"]
    assert [argv for argv, _ in restores] == [
        ("iptables-nft-restore", "-w", "--noflush", "--test"),
        ("iptables-nft-restore", "-w", "--noflush"),
    ]
    assert restores[1][1] == removal.payload
    assert view(fake.state()) == view(foreign_state())
    # In each table, the jumps go before our chains are deleted.
    for edit in removal.edits:
        kinds = [line[:2] for line in edit.text_lines()]
        assert "-D" in kinds and max(i for i, k in enumerate(kinds) if k == "-D") < kinds.index("-X")


class ScriptedRunner:
    """Answers iptables-save commands with canned output, keyed by tool and arguments."""

    def __init__(self, outputs: Mapping[tuple[str, ...], str]) -> None:
        self.outputs = outputs
        self.calls: list[tuple[str, ...]] = []

    def run(self, argv: Sequence[str], input: str | None = None) -> Completed:
        self.calls.append(tuple(argv))
        out = self.outputs.get(tuple(argv))
        return Completed(0, out, "") if out is not None else Completed(1, "", "no such table")


HINT = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n"
KUBE_RULES = "*nat\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -j KUBE-SERVICES\n-A OUTPUT -j KUBE-SERVICES\nCOMMIT\n"


@pytest.mark.parametrize(
    ("outputs", "expected"),
    [
        ({("iptables-nft-save", "-t", "mangle"): HINT}, IptablesBackend.NFT),
        ({("ip6tables-legacy-save",): HINT}, IptablesBackend.LEGACY),
        ({("iptables-legacy-save",): KUBE_RULES}, IptablesBackend.LEGACY),
        ({("iptables-legacy-save",): KUBE_RULES, ("iptables-nft-save",): KUBE_RULES * 2}, IptablesBackend.NFT),
        ({("iptables-legacy-save",): "*filter\n-A INPUT -j DROP\nCOMMIT\n"}, IptablesBackend.LEGACY),
        ({}, IptablesBackend.NFT),  # nothing anywhere: nft
    ],
)
def test_backend_detection_follows_iptables_wrappers(
    outputs: dict[tuple[str, ...], str], expected: IptablesBackend
) -> None:
    runner = ScriptedRunner({("ip", "netns", "exec", NS, *k): v for k, v in outputs.items()})
    assert detect_backend(runner, NS) is expected
    assert all(argv[:4] == ("ip", "netns", "exec", NS) for argv in runner.calls)
    assert ("ip", "netns", "exec", NS, "iptables-legacy-save", "-t", "mangle") not in runner.calls


def test_backend_override_and_choice() -> None:
    runner = ScriptedRunner({})
    assert detect_backend(runner, override="legacy") is IptablesBackend.LEGACY and runner.calls == []
    with pytest.raises(ValueError, match="nft, legacy or auto"):
        detect_backend(runner, override="xtables")
    assert choose_backend("", KUBE_RULES, KUBE_RULES) is IptablesBackend.NFT  # a tie goes to nft


def test_commands_are_argument_lists_in_a_checked_namespace() -> None:
    assert exec_argv(None, ["iptables-nft-save"]) == ("iptables-nft-save",)
    assert exec_argv("kpn-1", ["x", "y z"]) == ("ip", "netns", "exec", "kpn-1", "x", "y z")
    for bad in ("../etc", "a b", "", ".."):
        with pytest.raises(ValueError):
            exec_argv(bad, ["x"])
    missing = SubprocessRunner().run(["kproxy-nft-no-such-binary"])
    assert missing.returncode == 127 and "kproxy-nft-no-such-binary" in missing.stderr



def many_services(count: int) -> Ruleset:
    """`count` ClusterIP services with three endpoints each: a payload of about 16 lines per service."""
    names = [ServicePortName("ns", f"s{i}", "p") for i in range(count)]
    ports = {n: ServicePort(n, 80, 80, cluster_ips=(f"172.30.{i // 250}.{i % 250 + 1}",)) for i, n in enumerate(names)}
    endpoints = {
        n: tuple(Endpoint(f"10.2.{i // 50}.{i % 50 * 4 + j}", 80) for j in range(3)) for i, n in enumerate(names)
    }
    return compile_ruleset(ClusterState(ports, endpoints), NODE)


@pytest.mark.parametrize("backend", [IptablesBackend.NFT, IptablesBackend.LEGACY])
def test_a_large_nft_payload_is_sent_with_the_cache_prelude(backend: IptablesBackend) -> None:
    """iptables-nft's per-chain cache bookkeeping is quadratic; `-S` first avoids it (see apply)."""
    desired = many_services(400)
    fake = FakeIptables()
    host = Host(backend, NS, fake)
    step = plan(desired, read_state(host))
    assert step.edits[0].line_count > 5000
    apply(step, host)
    sent = fake.calls[-1][1] or ""
    if backend is IptablesBackend.NFT:
        assert sent.split("\n")[:6] == [
            "*nat", "-S", ":PREROUTING ACCEPT [0:0]", ":INPUT ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]",
            ":POSTROUTING ACCEPT [0:0]",
        ]  # fmt: skip
    else:
        assert sent == step.payload
    assert view(fake.state(backend.value)) == view(step.after)
    # Errors carry the line number of the plan's payload, not of what was sent.
    fake.set_state(KernelState(IPFamily.V4), backend.value)
    bad = inject(plan(desired, read_state(host)), "nat", "-A KUBE-SERVICES -j NO-SUCH-CHAIN")
    with pytest.raises(RestoreError) as caught:
        apply(bad, host)
    assert caught.value.text == "-A KUBE-SERVICES -j NO-SUCH-CHAIN"
