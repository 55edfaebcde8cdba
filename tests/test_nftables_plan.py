"""Properties of the nftables planner, run against the nftables fake (no root, no kernel).

The planner (`kernel/nftables_plan.py`) is pure; the fake (`kernel/nftables_fake.py`) applies its
text all or nothing and refuses what the kernel refuses (checked against a real kernel in
tests/kernel/test_nftables_fake.py), here as a kernel before 6.2, the stricter kind. The backend
runs on the fake through `FakeTransport`, so its read path (listing → `KernelTable`, affinity
maps as JSON) is the one used on a kernel.

* diff(a, a) is empty, incrementally (also for equal but rebuilt fragments) and in full;
* applying plan(a → b) to a fake holding a gives b: exactly, but for the shared chains that
  lost their last user, which are left for the next full sync, which deletes only them;
* partial equals full: the agent's O(changed) path (`update_ruleset` + `changed`) leaves the
  fake as a full plan does;
* a full sync repairs a fake tampered with (elements, chains, rules, the whole table) to b;
* affinity entries pointing at endpoints a service no longer has are deleted, the others kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterable, Iterator

from hypothesis import event, given, settings
from hypothesis import strategies as st

from kproxy_nft.compile import nftables as nftables_compiler
from kproxy_nft.compile.nftables import TABLE, Ruleset, compile_all, render_script, update_ruleset
from kproxy_nft.kernel import nftables_plan
from kproxy_nft.kernel.nftables import MAX_NAMED_SETS, NftablesBackend
from kproxy_nft.kernel.nftables_fake import FakeNftables, FakeNftablesError, FakeTransport
from kproxy_nft.kernel.nftables_plan import ENTRY_MAPS, Applied, advance, plan_full, plan_incremental
from kproxy_nft.kernel.nftables_text import is_dynamic, parse_listing, table_from_listing
from kproxy_nft.model import ClusterState, Endpoint, NodeContext, Protocol, ServicePort, ServicePortName, TrafficPolicy
from tests.helpers import changed_names
from tests.test_properties import endpoints

NODE = NodeContext(
    hostname="node1",
    node_ips=("192.168.100.1", "2001:db8:1::1"),
    cluster_cidrs=("10.0.0.0/8", "fd00:10::/64"),
    service_cidrs=("172.30.0.0/16", "fd00:30::/112"),
)
# A fixed pool of names, so that two draws overlap: service ports are added, changed, removed.
POOL = (
    ServicePortName("ns1", "web", "http"),
    ServicePortName("ns1", "web", "https"),
    ServicePortName("ns1", "dns", "dns", Protocol.UDP),
    ServicePortName("ns2", "db", ""),
    ServicePortName("ns2", "lb", "https"),
    ServicePortName("ns2", "sig", "s", Protocol.SCTP),
)
FAMILIES = ("ip", "ip6")
PROPERTY = settings(max_examples=40, deadline=None)


# ---------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------


def _v6(ep: Endpoint) -> Endpoint:
    a, b, c = ep.ip.split(".")[1:]
    return dataclasses.replace(ep, ip=f"fd00:10::{a}:{b}:{c}")


@st.composite
def service_ports(draw: st.DrawFn, i: int, name: ServicePortName) -> ServicePort:
    """One service port of every kind: ClusterIP, NodePort, external IPs, LoadBalancer (ranges)."""
    kind = draw(st.sampled_from(["ClusterIP", "NodePort", "external", "LoadBalancer"]))
    lb = kind == "LoadBalancer"
    policies = st.sampled_from(list(TrafficPolicy))
    return ServicePort(
        name,
        80 + i,
        8080,
        service_type="LoadBalancer" if lb else "NodePort" if kind == "NodePort" else "ClusterIP",
        cluster_ips=(f"172.30.0.{i + 1}", f"fd00:30::{i + 1}"),
        node_port=30000 + i if kind in ("NodePort", "LoadBalancer") else None,
        external_ips=(f"192.0.2.{i + 1}",) if kind == "external" else (),
        load_balancer_ips=(f"198.51.100.{i + 1}", f"2001:db8::{i + 1}") if lb else (),
        load_balancer_source_ranges=draw(st.sampled_from([(), ("203.0.113.0/24", "2001:db8:f::/48")])) if lb else (),
        external_traffic_policy=draw(policies),
        internal_traffic_policy=draw(policies),
        session_affinity_seconds=draw(st.sampled_from([None, 600, 10800])),
    )


@st.composite
def cluster_states(draw: st.DrawFn) -> ClusterState:
    ports: dict[ServicePortName, ServicePort] = {}
    eps: dict[ServicePortName, tuple[Endpoint, ...]] = {}
    for i, name in enumerate(POOL):
        if not draw(st.booleans()):
            continue
        ports[name] = draw(service_ports(i, name))
        # Few addresses, so that service ports share endpoints (and their hairpin elements).
        v4 = [dataclasses.replace(ep, ip=f"10.1.0.{int(ep.ip.rsplit('.', 1)[1]) % 6 + 1}")
              for ep in draw(st.lists(endpoints(), max_size=4))]  # fmt: skip
        v4 = list({(ep.ip, ep.port): ep for ep in v4}.values())
        eps[name] = (*v4, *(_v6(ep) for ep in v4[: draw(st.integers(0, len(v4)))]))
    return ClusterState(ports, eps)


def _edited(draw: st.DrawFn, a: ClusterState) -> ClusterState:
    """`a` with some service ports removed, added or changed (endpoints, affinity, policy)."""
    services, eps = dict(a.services), dict(a.endpoints)
    for i, name in enumerate(POOL):
        svc = services.get(name)
        action = draw(st.sampled_from(["keep", "keep", "endpoints", "remove", "affinity", "policy", "new"]))
        if svc is None:
            if action == "new":
                services[name] = draw(service_ports(i, name))
                eps[name] = tuple(draw(st.lists(endpoints(), max_size=3, unique_by=lambda e: (e.ip, e.port))))
        elif action == "remove":
            del services[name]
            eps.pop(name, None)
        elif action == "endpoints":  # some leave, maybe one comes (not one already there: the
            # tracker's tuples hold no duplicates)
            kept = [ep for ep in eps.get(name, ()) if draw(st.booleans())]
            came = draw(st.lists(endpoints(), max_size=1))
            eps[name] = tuple({(ep.ip, ep.port): ep for ep in (*kept, *came)}.values())
        elif action == "affinity":
            services[name] = dataclasses.replace(svc, session_affinity_seconds=draw(st.sampled_from([None, 600])))
        elif action == "policy":
            local = svc.external_traffic_policy is TrafficPolicy.LOCAL
            services[name] = dataclasses.replace(
                svc, external_traffic_policy=TrafficPolicy.CLUSTER if local else TrafficPolicy.LOCAL
            )
    return ClusterState(services, eps)


@st.composite
def state_pairs(draw: st.DrawFn) -> tuple[ClusterState, ClusterState]:
    """Two states: unrelated, or (mostly) the second an edit of the first, as an agent sees them."""
    a = draw(cluster_states())
    return a, draw(cluster_states()) if draw(st.integers(0, 3)) == 0 else _edited(draw, a)


@st.composite
def sync_sequences(draw: st.DrawFn) -> list[tuple[ClusterState, str]]:
    """States one after the other (mostly edits of the one before), each with how it is synced."""
    states = [draw(cluster_states())]
    for _ in range(draw(st.integers(1, 4))):
        # Mostly an edit of the last state; sometimes back to the one before (services come back).
        how = draw(st.sampled_from(["fresh", "edit", "edit", "edit", "back", "edit back"]))
        base = states[-2] if how.endswith("back") and len(states) > 1 else states[-1]
        states.append(draw(cluster_states()) if how == "fresh" else base if how == "back" else _edited(draw, base))
    return [(state, draw(st.sampled_from(["incremental", "changed", "full"]))) for state in states]


@st.composite
def flaps(draw: st.DrawFn) -> list[tuple[ClusterState, str]]:
    """Service ports removed, a full sync (their chains, still used in the kernel, left stale), then
    back (changed or not) in an incremental sync, and maybe gone again."""
    a = draw(cluster_states())
    gone = draw(st.sets(st.sampled_from(sorted(a.services)), min_size=1)) if a.services else set()
    without = ClusterState({n: s for n, s in a.services.items() if n not in gone},
                           {n: e for n, e in a.endpoints.items() if n not in gone})  # fmt: skip
    moved = {n: tuple(draw(st.lists(endpoints(), min_size=1, max_size=3, unique_by=lambda e: (e.ip, e.port))))
             for n in gone}  # fmt: skip
    back = ClusterState(a.services, {**a.endpoints, **moved})
    return [(a, "full"), (without, "full"), (back, draw(st.sampled_from(["incremental", "changed"]))),
            *([(without, "incremental")] if draw(st.booleans()) else [])]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the fake, seen as the kernel's listings
# ---------------------------------------------------------------------------------------------

View = tuple[object, ...]


def view(fake: FakeNftables) -> dict[str, View | None]:
    """Per family: declarations, chains (header, rules) and static elements as `nft list` shows them."""
    out: dict[str, View | None] = {}
    for family in FAMILIES:
        if fake.table(family, TABLE) is None:
            out[family] = None
            continue
        sets, chains, elements = parse_listing(fake.listing(family, TABLE))
        static = {n: e for n, e in elements.items() if not is_dynamic(sets[n])}
        out[family] = (sets, chains, static)
    return out


def rendered(desired: Iterable[Ruleset]) -> dict[str, View | None]:
    """The view of a fake into which `render_script(desired)` was loaded."""
    return _loaded(render_script(tuple(desired)))


@functools.lru_cache(maxsize=32)
def _loaded(script: str) -> dict[str, View | None]:
    fake = FakeNftables()
    fake.apply(script)
    return view(fake)


def without_unused_chains(fake: FakeNftables, desired: Iterable[Ruleset]) -> dict[str, View | None]:
    """`view(fake)` without the chains nothing desires, after checking nothing points at them."""
    out = view(fake)
    for ruleset in desired:
        family = ruleset.nft_family
        table = fake.table(family, TABLE)
        listed = out[family]
        assert table is not None and listed is not None
        sets, chains, elements = listed
        assert isinstance(chains, dict)
        wanted = {c.name for c in ruleset.all_chains()}
        for name in [n for n in chains if n not in wanted]:
            assert table.chain_users(name) == [], f"{name} is left over but still used"
            del chains[name]
    return out


def compiled(pair: tuple[ClusterState, ClusterState]) -> tuple[tuple[Ruleset, ...], tuple[Ruleset, ...]]:
    """Both states of a pair, compiled for NODE."""
    state_a, state_b = pair
    return compile_all(state_a, NODE), compile_all(state_b, NODE)


def holding(desired: tuple[Ruleset, ...]) -> tuple[FakeNftables, NftablesBackend]:
    """A fake holding `desired`, and a backend that synced it there (so it knows that state).

    The fake behaves as a kernel before 6.2, the stricter one: there a chain cannot be deleted
    in the transaction that deletes the last map element pointing at it, which the planner
    avoids (follow-up transactions, stale chains) as kube-proxy does.
    """
    fake = FakeNftables(pre_6_2_kernel=True)
    backend = NftablesBackend(transport=FakeTransport(fake))
    backend.sync(desired)
    return fake, backend


def assert_only_chain_deletions_left(backend: NftablesBackend, desired: tuple[Ruleset, ...]) -> None:
    """A full sync finds nothing but unused chains to delete, then nothing at all."""
    cleanup = backend.full_sync(desired)
    assert all(line.startswith("delete chain ") for line in cleanup.text.splitlines()), cleanup.text
    assert cleanup.summary.drift == 0 and not cleanup.followup
    assert backend.full_sync(desired).is_empty


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------


def _rebuilt(ruleset: Ruleset) -> Ruleset:
    """An equal ruleset whose fragments are new objects (so identity checks cannot short-cut)."""
    return Ruleset(ruleset.family, ruleset.sets, ruleset.chains,
                   {n: dataclasses.replace(f) for n, f in ruleset.fragments.items()})  # fmt: skip


@PROPERTY
@given(cluster_states())
def test_diff_of_a_state_with_itself_is_empty(state: ClusterState) -> None:
    a = compile_all(state, NODE)
    fake, backend = holding(a)
    # The planner, called directly: incremental from the record, full from the listing.
    applied: dict[str, Applied] = advance(None, plan_full({}, a))
    assert plan_incremental(applied, a).is_empty
    assert plan_incremental(applied, tuple(_rebuilt(r) for r in a)).is_empty
    assert plan_incremental(applied, a, changed=set(state.services)).is_empty
    kernel = {f: table_from_listing(f, fake.listing(f, TABLE)) for f in FAMILIES}
    full = plan_full(kernel, a, applied)
    assert full.is_empty and full.summary.drift == 0
    # And through the backend (its read path on the fake's listings).
    assert backend.plan(a).is_empty and backend.full_sync(a).is_empty


@PROPERTY
@given(state_pairs())
def test_applying_the_plan_from_a_to_b_gives_b(pair: tuple[ClusterState, ClusterState]) -> None:
    a, b = compiled(pair)
    fake, backend = holding(a)
    step = backend.sync(b)  # text, then follow-up: each all or nothing in the fake
    assert not step.summary.full
    summary = step.summary
    event(f"chains added/changed/deleted: {summary.chains_added > 0}/{summary.chains_changed > 0}/"
          f"{summary.chains_deleted > 0}, follow-up: {bool(step.followup)}, left over: {view(fake) != rendered(b)}")
    assert without_unused_chains(fake, b) == rendered(b)
    assert backend.plan(b).is_empty
    assert_only_chain_deletions_left(backend, b)
    assert view(fake) == rendered(b)


@PROPERTY
@given(state_pairs())
def test_a_partial_plan_leaves_the_state_a_full_plan_leaves(pair: tuple[ClusterState, ClusterState]) -> None:
    state_a, state_b = pair
    a = compile_all(state_a, NODE)
    changed = changed_names(state_a, state_b)
    partial = tuple(update_ruleset(r, state_b, NODE, changed) for r in a)
    b = compile_all(state_b, NODE)
    fake_partial, backend_partial = holding(a)
    fake_full, backend_full = holding(a)
    backend_partial.sync(partial, changed=changed)
    backend_full.full_sync(b)
    assert without_unused_chains(fake_partial, b) == without_unused_chains(fake_full, b)
    assert_only_chain_deletions_left(backend_partial, b)
    assert_only_chain_deletions_left(backend_full, b)
    assert view(fake_partial) == view(fake_full) == rendered(b)


def _tamper_commands(fake: FakeNftables, family: str, kind: str, pick: int) -> list[str]:
    """Commands that change our table behind the backend's back (some may not apply)."""
    table = fake.table(family, TABLE)
    assert table is not None
    prefix = f"{family} {TABLE}"
    elements = [(s.name, k) for s in table.sets.values() if not is_dynamic_set(s.body) for k in s.elements]
    chains = sorted(table.chains)
    if kind == "delete table":
        return [f"delete table {prefix}"]
    if kind == "delete element" and elements:
        set_name, key = elements[pick % len(elements)]
        return [f"delete element {prefix} {set_name} {{ {key} }}"]
    if kind == "change element":
        doomed = [(s, k) for s, k in elements if table.sets[s].elements[k] not in (None, "drop")]
        if doomed:
            set_name, key = doomed[pick % len(doomed)]
            return [f"delete element {prefix} {set_name} {{ {key} }}\n"
                    f"add element {prefix} {set_name} {{ {key} : drop }}"]
    if kind == "add element":
        key = "10.255.0.1" if family == "ip" else "fd00:ff::1"
        return [f"add element {prefix} cluster-ips {{ {key} }}",
                f"add element {prefix} service-nodeports {{ tcp . 1 : goto reject-chain }}"]  # fmt: skip
    if kind == "flush chain":
        return [f"flush chain {prefix} {chains[pick % len(chains)]}"]
    if kind == "add rule":
        return [f"add rule {prefix} {chains[pick % len(chains)]} counter"]
    if kind == "add chain":
        return [f"add chain {prefix} intruder\nadd rule {prefix} intruder jump reject-chain"]
    if kind == "delete chain":
        name = chains[pick % len(chains)]
        users = [f"delete element {prefix} {s.name} {{ {k} }}" for s in table.sets.values()
                 for k, v in s.elements.items() if v is not None and v.split(" ", 1)[-1] == name]  # fmt: skip
        users += [f"flush chain {prefix} {c.name}" for c in table.chains.values()
                  if c.name != name and any(f" {name}" in f" {r}".replace("\t", " ") for r in c.rules)]  # fmt: skip
        return ["\n".join([*users, f"delete chain {prefix} {name}"])]
    return []


def is_dynamic_set(body: tuple[str, ...]) -> bool:
    return any(line.startswith("flags ") and "dynamic" in line for line in body)


TAMPERING = st.lists(
    st.tuples(
        st.sampled_from(FAMILIES),
        st.sampled_from(["delete table", "delete element", "change element", "add element", "flush chain",
                         "add rule", "add chain", "delete chain"]),
        st.integers(0, 10_000),
    ),
    min_size=1,
    max_size=3,
)  # fmt: skip


@PROPERTY
@given(state_pairs(), TAMPERING)
def test_a_full_sync_repairs_what_was_tampered_with(
    pair: tuple[ClusterState, ClusterState], tampering: list[tuple[str, str, int]]
) -> None:
    a, b = compiled(pair)
    fake, backend = holding(a)
    before = view(fake)
    for family, kind, pick in tampering:
        if fake.table(family, TABLE) is None:
            continue
        for text in _tamper_commands(fake, family, kind, pick):
            # Some fail (e.g. a chain still used by a rule not flushed): that tampering is refused.
            with contextlib.suppress(FakeNftablesError):
                fake.apply(text)
    tampered = view(fake) != before
    event(f"tampered: {tampered}")
    repair = backend.full_sync(b)
    assert (repair.summary.drift > 0) == tampered
    assert without_unused_chains(fake, b) == rendered(b)
    assert_only_chain_deletions_left(backend, b)
    assert view(fake) == rendered(b)


# What a notification names narrowly: elements (`@set`) and the rules of chains.
NAMED_TAMPERING = st.lists(
    st.tuples(
        st.sampled_from(FAMILIES),
        st.sampled_from(["delete element", "change element", "add element", "flush chain", "add rule"]),
        st.integers(0, 10_000),
    ),
    min_size=1,
    max_size=3,
)  # fmt: skip


def _named(text: str) -> set[str]:
    """The objects a notification of `text` names: `@set` for elements, else the chain."""
    out = set()
    for words in (line.split() for line in text.splitlines()):
        out.add(f"@{words[4]}" if words[1] == "element" else words[4])
    return out


@PROPERTY
@given(cluster_states(), NAMED_TAMPERING)
def test_a_repair_of_the_named_objects_reads_only_them_and_undoes_the_tampering(
    state: ClusterState, tampering: list[tuple[str, str, int]]
) -> None:
    a = compile_all(state, NODE)
    fake, backend = holding(a)
    before = view(fake)
    named: set[str] = set()
    for family, kind, pick in tampering:
        for text in _tamper_commands(fake, family, kind, pick):
            with contextlib.suppress(FakeNftablesError):
                fake.apply(text)
                named |= _named(text)
    reader = FakeTransport(fake)
    plan = backend.check(reader, frozenset(named))
    assert plan is not None
    sets = {name for name in named if name.startswith("@")}
    whole = not named or len(sets) > MAX_NAMED_SETS
    event(f"tables read whole: {whole}")
    assert any(command.startswith("list table") for command, _ in reader.calls) == whole
    if not whole:
        listed = {command.split()[-1] for command, _ in reader.calls}
        assert listed == {name[1:] for name in sets}
        assert plan.is_empty == (not named)
    backend.apply(plan)
    assert view(fake) == before
    assert backend.plan_full(a).is_empty  # and the record is still true


Entry = tuple[str, str, str, str, ServicePortName, str]  # family, map, key, endpoint, service port, suffix


def _affinity_entries(desired: Iterable[Ruleset]) -> list[Entry]:
    """Entries the datapath could have recorded: one per affinity destination and endpoint."""
    out: list[Entry] = []
    for ruleset in desired:
        family = ruleset.nft_family
        local = "192.168.100.1" if family == "ip" else "2001:db8:1::1"
        for n, (name, fragment) in enumerate(ruleset.fragments.items()):
            target = fragment.affinity
            if target is None:
                continue
            for m, (suffix, endpoint) in enumerate(sorted((s, e) for s in target.suffixes for e in target.endpoints)):
                client = f"10.99.{n}.{m}" if family == "ip" else f"fd00:99::{n}:{m}"
                dest = suffix if suffix.count(" . ") == 2 else f" . {local}{suffix}"  # a node port: any address
                out.append((family, target.map, f"{client}{dest}", endpoint, name, suffix))
    return out


@PROPERTY
@given(state_pairs())
def test_affinity_entries_of_endpoints_a_service_lost_are_deleted(pair: tuple[ClusterState, ClusterState]) -> None:
    a, b = compiled(pair)
    fake, backend = holding(a)
    entries = _affinity_entries(a)
    for family, map_name, key, endpoint, _, _ in entries:
        fake.apply(f"add element {family} {TABLE} {map_name} {{ {key} timeout 1h : {endpoint} }}")
    step = backend.sync(b)
    after = {r.nft_family: r.fragments for r in b}

    def kept(family: str, map_name: str, endpoint: str, name: ServicePortName, suffix: str) -> bool:
        fragment = after[family].get(name)
        target = fragment.affinity if fragment is not None else None
        if target is None or target.map != map_name:
            return False
        return suffix in target.suffixes and endpoint in target.endpoints

    expected: dict[tuple[str, str], dict[str, str | None]] = {}
    for family, map_name, key, endpoint, name, suffix in entries:
        survivors = expected.setdefault((family, map_name), {})
        if kept(family, map_name, endpoint, name, suffix):
            survivors[key] = endpoint
    for (family, map_name), survivors in expected.items():
        table = fake.table(family, TABLE)
        assert table is not None and table.sets[map_name].elements == survivors, (family, map_name)
    deleted = len(entries) - sum(len(s) for s in expected.values())
    event(f"affinity entries: {bool(entries)}, some deleted: {deleted > 0}, some kept: {deleted < len(entries)}")
    assert step.summary.affinity_entries_deleted == deleted


@PROPERTY
@given(st.one_of(sync_sequences(), flaps()))
def test_any_sequence_of_syncs_keeps_the_record_true(steps: list[tuple[ClusterState, str]]) -> None:
    """After any mix of incremental, O(changed) and full syncs, the fake holds what was desired,
    and a full sync finds nothing but what the backend had recorded (drift 0)."""
    fake = FakeNftables(pre_6_2_kernel=True)
    backend = NftablesBackend(transport=FakeTransport(fake))
    previous: tuple[ClusterState, tuple[Ruleset, ...]] | None = None
    for state, how in steps:
        desired = compile_all(state, NODE)
        if how == "full":
            assert backend.full_sync(desired).summary.drift == 0
        elif how == "changed" and previous is not None:
            changed = changed_names(previous[0], state)
            desired = tuple(update_ruleset(r, state, NODE, changed) for r in previous[1])
            backend.sync(desired, changed=changed)
        else:
            backend.sync(desired)
        assert without_unused_chains(fake, compile_all(state, NODE)) == rendered(compile_all(state, NODE))
        previous = state, desired
    assert_only_chain_deletions_left(backend, compile_all(steps[-1][0], NODE))


@PROPERTY
@given(cluster_states(), st.integers(1, 3), st.integers(1, 4))
def test_a_new_table_loaded_in_parts_lets_no_packet_into_a_service_before_all_it_uses_is_in(
    state: ClusterState, per_command: int, commands_per_load: int
) -> None:
    """A new table in several transactions (tiny sizes here; 20,480 elements each on a node):
    the end is the rendered table, and until an entry map's element is added, every other set
    already holds all its elements, so a packet reaches no service that is half loaded."""
    desired = compile_all(state, NODE)
    fake = FakeNftables(pre_6_2_kernel=True)
    transport = FakeTransport(fake)
    with contextlib.ExitStack() as patches:
        for module in (nftables_compiler, nftables_plan):
            patches.enter_context(_patched(module, "ELEMENTS_PER_COMMAND", per_command))
        patches.enter_context(_patched(nftables_plan, "ELEMENTS_PER_LOAD", per_command * commands_per_load))
        plan = NftablesBackend(transport=transport).sync(desired)
    assert view(fake) == rendered(desired)
    event(f"transactions: {min(len(plan.loads) + 1, 4)}{'+' if len(plan.loads) > 2 else ''}")
    final = rendered(desired)
    replay = FakeNftables(pre_6_2_kernel=True)
    for commands in (commands for commands, _ in transport.calls if not commands.startswith("list ")):
        replay.apply(commands)  # then packets see this state, until the next transaction
        for family, listed in view(replay).items():
            expected = final[family]
            if listed is None or expected is None:
                continue
            static, wanted = listed[2], expected[2]
            assert isinstance(static, dict) and isinstance(wanted, dict)
            if any(static.get(name) for name in ENTRY_MAPS):
                assert {n: e for n, e in static.items() if n not in ENTRY_MAPS} == {
                    n: e for n, e in wanted.items() if n not in ENTRY_MAPS}


@contextlib.contextmanager
def _patched(module: object, name: str, value: int) -> Iterator[None]:
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)
