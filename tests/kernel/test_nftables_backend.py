"""The nftables backend against a real kernel, in a throwaway namespace, through both transports.

Loading the dump, canonical listing, incremental transactions (asserted on their text),
idempotence, atomic failure, repair on full sync, and leaving foreign tables alone; for
externally reachable services, that their own chains come and go with them in the same
transaction as their elements, and that full syncs repair them.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator

import pytest

from kproxy_nft.compile.nftables import (
    Ruleset,
    compile_all,
    compile_ruleset,
    external_chain,
    firewall_chain,
    render_script,
    update_ruleset,
)
from kproxy_nft.kernel.nftables import NftablesBackend, NftablesError, parse_terse_listing, read_table
from kproxy_nft.lab.synthetic import synthetic_cluster, synthetic_endpoints, synthetic_name
from kproxy_nft.model import ClusterState, Endpoint, NodeContext, TrafficPolicy
from kproxy_nft.sources.manifests import read_manifests
from tests.helpers import EXAMPLES, GOLDEN, ROOT, endpoint, service, spn
from tests.kernel.conftest import run_in
from tests.test_compile_nftables import EVERY_TYPE, every_type

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


def assert_lists_as_compiled(netns: str, rulesets: tuple[Ruleset, ...]) -> None:
    for ruleset in rulesets:
        listing = run_in(netns, ["nft", "-t", "-y", "list", "table", ruleset.nft_family, "kproxy-nft"]).stdout
        sets, chains = parse_terse_listing(listing)
        # What we write is what nft prints back: full syncs compare the two as text.
        assert {s.name: s for s in ruleset.sets} == sets
        assert {c.name: c.expected_listing for c in ruleset.all_chains()} == {n: c.rules for n, c in chains.items()}


def test_dump_loads_into_an_empty_namespace_and_lists_as_compiled(netns: str) -> None:
    rulesets = compile_all(seed(), SEED_NODE)
    result = run_in(netns, ["nft", "-f", "-"], render_script(rulesets))
    assert result.returncode == 0, result.stderr
    assert_lists_as_compiled(netns, rulesets)
    saved = run_in(netns, ["nft", "list", "map", "ip", "kproxy-nft", "backends-tcp"]).stdout
    assert saved.count(": 10.1.0.4") == 9


def test_first_sync_is_full_then_idempotent(backend: NftablesBackend, netns: str) -> None:
    desired = compile_all(seed(), SEED_NODE)
    plan = backend.plan(desired)
    assert plan.summary.full and plan.summary.elements_added == 17  # 15 + 2 in cluster-ips
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
    # The agent's O(changed) path: recompile and compare only the changed port; the same plan.
    updated = update_ruleset(compile_ruleset(state, node), changed, node, {name})
    assert backend.plan(updated, changed={name}).text == plan.text

    def hairpin_pairs(eps: tuple[Endpoint, ...]) -> str:  # hairpin pairs: the endpoints on this node
        return ", ".join(f"{e.ip} . {e.ip}" for e in eps if e.node_name == node.hostname)

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
    # Index 2 goes only in a second transaction: a packet that got `goto lb-tcp-3` just before
    # the commit may look it up just after it (see `kernel.nftables_plan._element_commands`).
    assert "10.96.0.8 . 80 . 2" not in plan.text
    assert plan.followup == "delete element ip kproxy-nft backends-tcp { 10.96.0.8 . 80 . 2 }\n"
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


# ---------------------------------------------------------------------------------------------
# externally reachable services
# ---------------------------------------------------------------------------------------------


def test_every_type_golden_checks_loads_and_lists_as_compiled(netns: str) -> None:
    golden = (GOLDEN / "every-type-shop.nft").read_text()
    check = run_in(netns, ["nft", "-c", "-f", "-"], golden)
    assert check.returncode == 0, check.stderr
    assert run_in(netns, ["nft", "list", "ruleset"]).stdout == ""  # -c loads nothing
    result = run_in(netns, ["nft", "-f", "-"], golden)
    assert result.returncode == 0, result.stderr
    state, node = every_type()
    assert_lists_as_compiled(netns, compile_all(state, node))


def test_cli_dump_of_every_type_loads(netns: str) -> None:
    # The command line of the issue, without a hostname override: no endpoint is local then.
    argv = [sys.executable, "-c", "from kproxy_nft.cli import main; main()", "dump", "--proxy-mode", "nftables",
            "-f", str(EVERY_TYPE), "--node-ip", "192.168.100.1", "--cluster-cidr", "10.1.0.0/16"]
    dump = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    assert dump.returncode == 0, dump.stderr
    assert "ip daddr 10.96.0.0/16 drop" in dump.stdout  # the ServiceCIDR object was read
    result = run_in(netns, ["nft", "-f", "-"], dump.stdout)
    assert result.returncode == 0, result.stderr


NEW = spn("new-lb", "shop", "https")


def with_new_lb(state: ClusterState, endpoints: tuple[Endpoint, ...]) -> ClusterState:
    """`state` plus a LoadBalancer with a node port, an external IP and source ranges."""
    svc = service(NEW, "10.96.0.77", 443, node_port=31443, external_ips=("192.0.2.77",),
                  load_balancer_ips=("198.51.100.77",), load_balancer_source_ranges=("203.0.113.0/24",),
                  service_type="LoadBalancer")
    return ClusterState({**state.services, NEW: svc}, {**state.endpoints, NEW: endpoints})


def lines_about_others(text: str) -> list[str]:
    """Lines of a plan that name neither the new service's chains nor its addresses."""
    ours = (external_chain(NEW), firewall_chain(NEW), "10.96.0.77", "192.0.2.77", "198.51.100.77", "31443",
            "10.1.7.")
    return [line for line in text.splitlines() if not any(word in line for word in ours)]


def test_an_external_service_touches_only_its_elements_and_chains(backend: NftablesBackend, netns: str) -> None:
    state, node = every_type()
    backend.full_sync(compile_all(state, node))
    ext, fw = external_chain(NEW), firewall_chain(NEW)

    # Added: its two chains are created, then filled, and its elements point at them.
    two = (endpoint("10.1.7.1", 8443, node_name="node1"), endpoint("10.1.7.2", 8443, node_name="node2"))
    plan = backend.plan(compile_all(with_new_lb(state, two), node))
    lines = plan.text.splitlines()
    assert lines_about_others(plan.text) == []
    assert lines[:2] == [f"add chain ip kproxy-nft {ext}", f"add chain ip kproxy-nft {fw}"]
    assert f"add element ip kproxy-nft service-nodeports {{ tcp . 31443 : goto {ext} }}" in lines
    assert f"add element ip kproxy-nft firewall-ips {{ 198.51.100.77 . tcp . 443 : goto {fw} }}" in lines
    # Changed in both tables' records (its ip6 fragment is empty); two chains, both ip.
    assert plan.summary.services_changed == 2 and plan.summary.chains_added == 2
    backend.apply(plan)
    assert backend.plan(compile_all(with_new_lb(state, two), node)).is_empty

    # An endpoint replaced: only its external chain is rewritten (flush + rules), no other chain.
    moved = (two[0], endpoint("10.1.7.3", 8443, node_name="node2"))
    plan = backend.plan(compile_all(with_new_lb(state, moved), node))
    assert lines_about_others(plan.text) == []
    assert [line for line in plan.text.splitlines() if "element" not in line] == [
        f"flush chain ip kproxy-nft {ext}",
        f"add rule ip kproxy-nft {ext} jump mark-for-masquerade",
        f"add rule ip kproxy-nft {ext} meta l4proto tcp dnat ip to numgen random mod 2 map "
        "{ 0 : 10.1.7.1 . 8443, 1 : 10.1.7.3 . 8443 }",
    ]
    assert plan.summary.chains_changed == 1 and plan.summary.chains_added == 0
    backend.apply(plan)

    # Its policy changes to Local: the same chain, new content.
    local = with_new_lb(state, moved)
    local = ClusterState({**local.services, NEW: dataclasses.replace(
        local.services[NEW], external_traffic_policy=TrafficPolicy.LOCAL)}, local.endpoints)
    plan = backend.plan(compile_all(local, node))
    assert lines_about_others(plan.text) == [] and plan.summary.chains_changed == 1
    assert f"add rule ip kproxy-nft {ext} meta l4proto tcp dnat ip to numgen random mod 1 map " \
           "{ 0 : 10.1.7.1 . 8443 }" in plan.text
    backend.apply(plan)
    assert backend.plan(compile_all(local, node)).is_empty

    # Removed: its elements go, then its chains, in the follow-up transaction (kernels before
    # 6.2 refuse to delete a chain in the transaction that drops its last reference).
    plan = backend.plan(compile_all(state, node))
    assert lines_about_others(plan.text) == [] and "delete chain" not in plan.text
    assert plan.followup.splitlines()[:2] == [f"delete chain ip kproxy-nft {ext}", f"delete chain ip kproxy-nft {fw}"]
    assert plan.summary.chains_deleted == 2
    backend.apply(plan)
    listing = run_in(netns, ["nft", "list", "chains", "ip"]).stdout
    assert "external-" in listing and ext not in listing and fw not in listing
    assert backend.plan(compile_all(state, node)).is_empty
    full = backend.full_sync(compile_all(state, node))
    assert full.is_empty and full.summary.drift == 0


def test_full_sync_repairs_hand_deleted_and_altered_service_chains(backend: NftablesBackend, netns: str) -> None:
    state, node = every_type()
    desired = compile_all(state, node)
    backend.full_sync(desired)
    np = external_chain(spn("np", "shop", "http"))
    lb_fw = firewall_chain(spn("lb", "shop", "https"))
    # A chain an element points at cannot be deleted: drop the elements first, as a person would.
    tamper = (
        "delete element ip kproxy-nft service-nodeports { tcp . 30080 }\n"
        f"delete chain ip kproxy-nft {np}\n"
        f"flush chain ip kproxy-nft {lb_fw}\n"
    )
    result = run_in(netns, ["nft", "-f", "-"], tamper)
    assert result.returncode == 0, result.stderr
    assert backend.plan(desired).is_empty  # incremental syncs trust their record
    plan = backend.full_sync(desired)
    assert plan.summary.drift == 3  # the chain, its element, the emptied firewall
    assert f"add chain ip kproxy-nft {np}" in plan.text
    assert f"add element ip kproxy-nft service-nodeports {{ tcp . 30080 : goto {np} }}" in plan.text
    assert f"add rule ip kproxy-nft {lb_fw} drop" in plan.text
    assert_lists_as_compiled(netns, desired)
    assert backend.full_sync(desired).is_empty


def test_affinity_entries_of_a_gone_endpoint_go_for_every_destination(backend: NftablesBackend, netns: str) -> None:
    state, node = every_type()
    backend.full_sync(compile_all(state, node))
    # Entries as the datapath records them: client . destination . port → endpoint.
    entries = {
        "10.9.9.1 . 192.168.100.1 . 30443": "10.1.0.22 . 8443",  # node port, to the endpoint that goes
        "10.9.9.2 . 198.51.100.10 . 443": "10.1.0.22 . 8443",  # LB IP, same
        "10.9.9.3 . 10.96.0.12 . 443": "10.1.0.22 . 8443",  # cluster IP, same
        "10.9.9.4 . 198.51.100.10 . 443": "10.1.0.11 . 8443",  # LB IP, an endpoint that stays
    }
    add = "".join(f"add element ip kproxy-nft affinity-tcp {{ {k} timeout 1h : {v} }}\n" for k, v in entries.items())
    assert run_in(netns, ["nft", "-f", "-"], add).returncode == 0
    lb = spn("lb", "shop", "https")
    fewer = ClusterState(state.services, {**state.endpoints, lb: state.endpoints[lb][:2]})
    plan = backend.sync(compile_all(fewer, node))
    assert plan.summary.affinity_entries_deleted == 3
    left = run_in(netns, ["nft", "list", "map", "ip", "kproxy-nft", "affinity-tcp"]).stdout
    assert "10.9.9.4" in left and not any(f"10.9.9.{i}" in left for i in (1, 2, 3))


def test_text_listing_gives_the_elements_nft_json_gives(netns: str) -> None:
    """read_table parses nft's text (one listing, fast); nft's JSON per map must agree with it."""
    from kproxy_nft.kernel.nftables import parse_json_elements, parse_listing

    state, node = every_type()
    assert run_in(netns, ["nft", "-f", "-"], render_script(compile_all(state, node))).returncode == 0
    for family in ("ip", "ip6"):
        text = run_in(netns, ["nft", "-y", "list", "table", family, "kproxy-nft"]).stdout
        sets, _, elements = parse_listing(text)
        assert sum(len(e) for e in elements.values()) > (20 if family == "ip" else 3)
        for name, decl in sets.items():
            listed = run_in(netns, ["nft", "-j", "list", decl.keyword, family, "kproxy-nft", name]).stdout
            assert elements[name] == parse_json_elements(listed), name
