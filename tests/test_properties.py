"""Hypothesis properties of the model → iptables compiler pipeline."""

from __future__ import annotations

import random
import re
from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy_nft.compile.iptables import compile_ruleset, render_restore
from kproxy_nft.compile.memo import FragmentMemo
from kproxy_nft.convert import ServiceInfo, build_state
from kproxy_nft.model import ClusterState, Endpoint, IPFamily, Protocol, ServicePort, ServicePortName
from kproxy_nft.selection import categorize_endpoints
from tests.helpers import NODE, changed_names

names = st.sampled_from(["a", "b", "web", "db", "api-1"])
port_names = st.sampled_from(["", "http", "https", "dns"])
protocols = st.sampled_from(list(Protocol))


@st.composite
def endpoints(draw: st.DrawFn) -> Endpoint:
    ready = draw(st.booleans())
    return Endpoint(
        ip=f"10.{draw(st.integers(0, 2))}.{draw(st.integers(0, 3))}.{draw(st.integers(1, 30))}",
        port=draw(st.sampled_from([80, 443, 8080])),
        ready=ready,
        serving=ready or draw(st.booleans()),
        terminating=not ready and draw(st.booleans()),
        node_name=draw(st.sampled_from([None, "node1", "node2"])),
    )


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[ServiceInfo], list[dict[ServicePortName, tuple[Endpoint, ...]]]]:
    """Services (as ServiceInfo) and endpoint slices, possibly several slices per port."""
    infos = []
    slices: list[dict[ServicePortName, tuple[Endpoint, ...]]] = []
    used: set[tuple[str, str]] = set()
    for i in range(draw(st.integers(0, 6))):
        ns, name = draw(st.sampled_from(["ns1", "ns2"])), draw(names)
        if (ns, name) in used:
            continue
        used.add((ns, name))
        ports = []
        for j, pname in enumerate(draw(st.lists(port_names, min_size=1, max_size=3, unique=True))):
            spn = ServicePortName(ns, name, pname, draw(protocols))
            ports.append(
                ServicePort(
                    name=spn,
                    port=1000 + j,
                    target_port=80,
                    cluster_ips=(f"172.30.{i}.1",),
                    session_affinity_seconds=draw(st.sampled_from([None, 10800])),
                )
            )
            for _ in range(draw(st.integers(0, 2))):
                slices.append({spn: tuple(draw(st.lists(endpoints(), max_size=6)))})
        infos.append(ServiceInfo(ns, name, tuple(ports), True))
    return infos, slices


def shuffled_state(infos: list[ServiceInfo], slices: list[dict[ServicePortName, tuple[Endpoint, ...]]],
                   seed: int) -> ClusterState:
    rng = random.Random(seed)
    infos = rng.sample(infos, len(infos))
    slices = [{k: tuple(rng.sample(v, len(v))) for k, v in s.items()} for s in rng.sample(slices, len(slices))]
    return build_state(infos, slices)


@settings(max_examples=150, deadline=None)
@given(clusters(), st.integers(0, 2**32))
def test_input_order_never_changes_output(cluster, seed) -> None:  # type: ignore[no-untyped-def]
    infos, slices = cluster
    a = render_restore(compile_ruleset(build_state(infos, slices), NODE))
    b = render_restore(compile_ruleset(shuffled_state(infos, slices, seed), NODE))
    assert a == b


def _declared_and_rules(text: str) -> dict[str, tuple[set[str], list[tuple[str, str]]]]:
    tables: dict[str, tuple[set[str], list[tuple[str, str]]]] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("*"):
            current = line[1:]
            tables[current] = (set(), [])
        elif line.startswith(":"):
            tables[current][0].add(line[1:].split()[0])
        elif line.startswith("-A "):
            chain, rule = line[3:].split(" ", 1)
            tables[current][1].append((chain, rule))
    return tables


@settings(max_examples=150, deadline=None)
@given(clusters())
def test_every_jump_target_exists_and_every_usable_endpoint_has_one_chain(cluster) -> None:  # type: ignore[no-untyped-def]
    state = build_state(*cluster)
    text = render_restore(compile_ruleset(state, NODE))
    for declared, rules in _declared_and_rules(text).values():
        for chain, rule in rules:
            target = re.search(r"-j (KUBE-\S+)", rule)
            assert target is None or target.group(1) in declared, rule
            assert chain in declared or chain in ("INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING")
    nat_declared, nat_rules = _declared_and_rules(text)["nat"]
    dnat: dict[str, list[str]] = defaultdict(list)
    for chain, rule in nat_rules:
        if "-j DNAT" in rule:
            dnat[chain].append(rule)
    sep_chains = {c for c in nat_declared if c.startswith("KUBE-SEP-")}
    assert set(dnat) == sep_chains and all(len(r) == 1 for r in dnat.values())
    usable = sum(len(categorize_endpoints(s, state.endpoints_of(n), NODE).all_reachable)
                 for n, s in state.services.items())
    assert len(sep_chains) == usable


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 60))
def test_probabilities_compose_to_a_uniform_choice(n: int) -> None:
    spn = ServicePortName("ns", "svc", "p", Protocol.TCP)
    eps = tuple(Endpoint(ip=f"10.0.{i // 250}.{i % 250 + 1}", port=80) for i in range(n))
    state = ClusterState({spn: ServicePort(spn, 80, 80, cluster_ips=("172.30.0.1",))}, {spn: eps})
    text = render_restore(compile_ruleset(state, NODE))
    jumps = [line for line in text.splitlines() if line.startswith("-A KUBE-SVC-") and "-j KUBE-SEP-" in line]
    assert len(jumps) == n
    remaining = 1.0
    shares = []
    for line in jumps:
        m = re.search(r"--probability (\S+)", line)
        p = float(m.group(1)) if m else 1.0
        shares.append(remaining * p)
        remaining *= 1 - p
    assert abs(remaining) < 1e-12  # the last rule takes everything left
    assert all(abs(share - 1 / n) < 1e-9 for share in shares)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_nftables_update_equals_a_fresh_compile(data: st.DataObject) -> None:
    """update_ruleset(previous, b, changed) holds the same elements as compile_ruleset(b)."""
    from kproxy_nft.compile.nftables import ServiceFragment, update_ruleset
    from kproxy_nft.compile.nftables import compile_ruleset as nft_compile

    a, b = build_state(*data.draw(clusters())), build_state(*data.draw(clusters()))
    changed = changed_names(a, b)
    for family in IPFamily:
        fresh = nft_compile(b, NODE, family)
        memo: FragmentMemo[ServiceFragment] = FragmentMemo()  # an agent's: kept across compiles
        updated = update_ruleset(nft_compile(a, NODE, family, memo), b, NODE, changed, memo)
        assert updated.elements() == fresh.elements()
        assert dict(updated.fragments) == dict(fresh.fragments)
        assert {c.name for c in fresh.chains} <= {c.name for c in updated.chains}  # unused ones may linger
        # A full compile through the same memo afterwards is a fresh compile too.
        again = nft_compile(b, NODE, family, memo)
        assert dict(again.fragments) == dict(fresh.fragments) and again.chains == fresh.chains


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_iptables_partial_plan_equals_the_full_plan(data: st.DataObject) -> None:
    """An agent's O(changed) path (update_fragments + a focused plan) sends what a full plan sends."""
    from kproxy_nft.compile.iptables import ServiceRules, assemble_ruleset, compile_fragments, update_fragments
    from kproxy_nft.kernel.iptables_plan import focus_of, plan
    from kproxy_nft.kernel.iptables_text import KernelState

    a, b = build_state(*data.draw(clusters())), build_state(*data.draw(clusters()))
    changed = changed_names(a, b)
    family = IPFamily.V4
    memo: FragmentMemo[ServiceRules] = FragmentMemo()  # an agent's: kept across compiles
    old = compile_fragments(a, NODE, family, memo)
    current = plan(assemble_ruleset(old.values(), NODE, family), KernelState(family)).after
    new = update_fragments(old, b, NODE, family, changed, memo)
    fresh = compile_fragments(b, NODE, family)
    assert new == fresh and list(new) == list(fresh)
    assert compile_fragments(b, NODE, family, memo) == fresh
    desired = assemble_ruleset(new.values(), NODE, family)
    partial, full = plan(desired, current, focus_of(old, new, changed)), plan(desired, current)
    assert partial.payload == full.payload
    assert partial.after == full.after
