"""The nftables backend against a real kernel, in a throwaway namespace, through both transports.

Loading the dump, canonical listing, incremental transactions (asserted on their text),
idempotence, atomic failure, repair on full sync, and leaving foreign tables alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from kproxy_nft.compile.nftables import compile_all, compile_ruleset, render_script
from kproxy_nft.kernel.nftables import NftablesBackend, NftablesError, parse_terse_listing, read_table
from kproxy_nft.model import ClusterState, Endpoint, NodeContext
from kproxy_nft.sources.manifests import read_manifests
from kproxy_nft.synthetic import synthetic_cluster, synthetic_endpoints, synthetic_name
from tests.helpers import EXAMPLES
from tests.kernel.conftest import run_in

pytestmark = pytest.mark.kernel

SEED_NODE = NodeContext(hostname="docker-desktop", cluster_cidrs=("10.1.0.0/16",))
FOREIGN = """table inet someone-else {
\tset allowed { type ipv4_addr; elements = { 192.0.2.1 } }
\tchain input { type filter hook input priority 0; policy accept; ip saddr @allowed counter accept; }
}
"""


def seed() -> ClusterState:
    return read_manifests([str(EXAMPLES)]).cluster_state()


def ruleset_text(ns: str) -> str:
    result = run_in(ns, ["nft", "list", "ruleset"])
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(params=["libnftables", "nft"])
def backend(request: pytest.FixtureRequest, netns: str) -> Iterator[NftablesBackend]:
    with NftablesBackend(netns, use_libnftables=request.param == "libnftables") as b:
        assert b.transport.name == request.param
        yield b


def test_dump_loads_into_an_empty_namespace_and_lists_as_compiled(netns: str) -> None:
    rulesets = compile_all(seed(), SEED_NODE)
    result = run_in(netns, ["nft", "-f", "-"], render_script(rulesets))
    assert result.returncode == 0, result.stderr
    for ruleset in rulesets:
        listing = run_in(netns, ["nft", "-t", "-y", "list", "table", ruleset.nft_family, "kproxy-nft"]).stdout
        sets, chains = parse_terse_listing(listing)
        # What we write is what nft prints back: full syncs compare the two as text.
        assert {s.name: s for s in ruleset.sets} == sets
        assert {c.name: c.expected_listing for c in ruleset.chains} == {n: c.rules for n, c in chains.items()}
    saved = run_in(netns, ["nft", "list", "map", "ip", "kproxy-nft", "backends-tcp"]).stdout
    assert saved.count(": 10.1.0.4") == 9


def test_first_sync_is_full_then_idempotent(backend: NftablesBackend, netns: str) -> None:
    desired = compile_all(seed(), SEED_NODE)
    plan = backend.plan(desired)
    assert plan.summary.full and plan.summary.elements_added == 15
    backend.apply(plan)
    again = backend.plan(compile_all(seed(), SEED_NODE))
    assert again.is_empty and not again.summary.full
    full = backend.full_sync(desired)
    assert full.is_empty and full.summary.drift == 0
    table = read_table(backend.transport, "ip")
    assert table is not None
    assert table.elements == {n: e for n, e in desired[0].elements().items() if n in table.elements}


def test_incremental_sync_sends_only_the_changed_elements(backend: NftablesBackend) -> None:
    state = synthetic_cluster(200, 3)
    node = NodeContext(hostname="node0", cluster_cidrs=("10.128.0.0/9",))
    backend.full_sync(compile_ruleset(state, node))
    name = synthetic_name(7)
    moved = synthetic_endpoints(7, 3, generation=1)
    changed = ClusterState(state.services, {**state.endpoints, name: moved})
    plan = backend.plan(compile_ruleset(changed, node))
    lines = plan.text.splitlines()

    def hairpin_pairs(eps: tuple[Endpoint, ...]) -> str:  # hairpin pairs: every endpoint, as kube-proxy
        return ", ".join(f"{e.ip} . {e.ip}" for e in eps)

    assert lines == [
        "delete element ip kproxy-nft backends-tcp { 10.96.0.8 . 80 . 0, 10.96.0.8 . 80 . 1, 10.96.0.8 . 80 . 2 }",
        f"delete element ip kproxy-nft hairpin {{ {hairpin_pairs(state.endpoints[name])} }}",
        "add element ip kproxy-nft backends-tcp { "
        + ", ".join(f"10.96.0.8 . 80 . {i} : {e.ip} . 8080" for i, e in enumerate(moved))
        + " }",
        f"add element ip kproxy-nft hairpin {{ {hairpin_pairs(moved)} }}",
    ]
    assert plan.summary.services_changed == 1
    backend.apply(plan)
    assert backend.plan(compile_ruleset(changed, node)).is_empty

    # A new endpoint count brings in a shared chain; the old one stays until a full sync.
    fewer = ClusterState(state.services, {**state.endpoints, name: moved[:2]})
    plan = backend.plan(compile_ruleset(fewer, node))
    assert "add chain ip kproxy-nft lb-tcp-2" in plan.text
    assert "add element ip kproxy-nft service-ips { 10.96.0.8 . tcp . 80 : goto lb-tcp-2 }" in plan.text
    backend.apply(plan)
    only_two = ClusterState(state.services, {n: e[:2] for n, e in fewer.endpoints.items()})
    backend.apply(backend.plan(compile_ruleset(only_two, node)))
    full = backend.full_sync(compile_ruleset(only_two, node))
    assert full.text == "delete chain ip kproxy-nft lb-tcp-3\n" and full.summary.drift == 0


def test_failed_transaction_changes_nothing(backend: NftablesBackend, netns: str) -> None:
    run_in(netns, ["nft", "-f", "-"], FOREIGN)
    backend.full_sync(compile_all(seed(), SEED_NODE))
    before = ruleset_text(netns)
    state = seed()
    name = sorted(state.services)[0]
    changed = ClusterState(state.services, {**state.endpoints, name: state.endpoints[name][:1]})
    plan = backend.plan(compile_all(changed, SEED_NODE))
    assert not plan.is_empty
    # Test hook: the plan is data; append a command the parser rejects, then one the kernel does.
    for bad in ("add rule ip kproxy-nft services this is not nft\n",
                "delete element ip kproxy-nft service-ips { 10.9.9.9 . tcp . 1 }\n"):
        with pytest.raises(NftablesError):
            backend.apply(dataclasses.replace(plan, text=plan.text + bad))
        assert ruleset_text(netns) == before
    backend.apply(plan)  # the backend did not record the failed attempts: the real plan still fits
    assert ruleset_text(netns) != before
    assert backend.plan(compile_all(changed, SEED_NODE)).is_empty


def test_foreign_tables_survive_apply_and_cleanup(backend: NftablesBackend, netns: str) -> None:
    run_in(netns, ["nft", "-f", "-"], FOREIGN)
    foreign = run_in(netns, ["nft", "list", "table", "inet", "someone-else"]).stdout
    backend.full_sync(compile_all(seed(), SEED_NODE))
    backend.full_sync(compile_all(ClusterState(), SEED_NODE))
    assert run_in(netns, ["nft", "list", "table", "inet", "someone-else"]).stdout == foreign
    backend.cleanup()
    backend.cleanup()  # idempotent: no table, no error
    assert ruleset_text(netns) == foreign
    assert not backend.knows_kernel_state


def test_full_sync_repairs_and_counts_drift(backend: NftablesBackend, netns: str) -> None:
    desired = compile_all(seed(), SEED_NODE)
    backend.full_sync(desired)
    tamper = (
        "delete element ip kproxy-nft backends-tcp { 10.101.181.214 . 8080 . 1 }\n"
        "add element ip kproxy-nft service-ips { 10.9.9.9 . tcp . 1 : goto lb-tcp-3 }\n"
        "flush chain ip kproxy-nft masquerading\n"
    )
    assert run_in(netns, ["nft", "-f", "-"], tamper).returncode == 0
    assert backend.plan(desired).is_empty  # incremental syncs trust their record
    plan = backend.full_sync(desired)
    assert plan.summary.drift == 3 and backend.repairs_total == 3
    assert "add element ip kproxy-nft backends-tcp { 10.101.181.214 . 8080 . 1 : 10.1.0.48 . 80 }" in plan.text
    assert "delete element ip kproxy-nft service-ips { 10.9.9.9 . tcp . 1 }" in plan.text
    assert backend.full_sync(desired).is_empty


def test_tables_deleted_behind_our_back_are_rebuilt(backend: NftablesBackend, netns: str) -> None:
    desired = compile_all(seed(), SEED_NODE)
    backend.full_sync(desired)
    listing = ["nft", "list", "table", "ip", "kproxy-nft"]
    before = run_in(netns, listing).stdout
    assert run_in(netns, ["nft", "delete", "table", "ip", "kproxy-nft"]).returncode == 0
    plan = backend.full_sync(desired)
    assert plan.summary.drift > 0 and plan.summary.rebuilt_tables == 0
    assert run_in(netns, listing).stdout == before
