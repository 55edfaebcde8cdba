"""The nftables compiler: flat layout, kube-proxy semantics, golden output, memoized fragments."""

from __future__ import annotations

import dataclasses

from kproxy_nft.compile.nftables import (
    HAIRPIN,
    NO_ENDPOINT_SERVICES,
    SERVICE_IPS,
    _nft_duration,
    compile_all,
    compile_ruleset,
    render_script,
)
from kproxy_nft.model import ClusterState, NodeContext, Protocol, TrafficPolicy
from kproxy_nft.sources.manifests import read_manifests
from kproxy_nft.synthetic import synthetic_cluster
from tests.helpers import EXAMPLES, GOLDEN, NODE, endpoint, service, spn

SEED_NODE = NodeContext(hostname="docker-desktop", cluster_cidrs=("10.1.0.0/16",))


def seed_state() -> ClusterState:
    return read_manifests([str(EXAMPLES)]).cluster_state()


def elements(state: ClusterState, node: NodeContext = NODE) -> dict[str, dict[str, str | None]]:
    return compile_ruleset(state, node).elements()


def test_seed_matches_golden() -> None:
    assert render_script(compile_all(seed_state(), SEED_NODE)) == (GOLDEN / "examples.nft").read_text()


def test_seed_layout() -> None:
    ruleset = compile_ruleset(seed_state(), SEED_NODE)
    e = ruleset.elements()
    assert e[SERVICE_IPS] == {
        "10.101.181.214 . tcp . 8080": "goto lb-tcp-3",
        "10.102.199.133 . tcp . 8080": "goto lb-tcp-3",
        "10.102.199.133 . tcp . 8443": "goto lb-tcp-3",
    }
    assert e["backends-tcp"]["10.102.199.133 . 8443 . 2"] == "10.1.0.49 . 443"
    assert e["backends-tcp"]["10.101.181.214 . 8080 . 0"] == "10.1.0.47 . 80"
    assert len(e["backends-tcp"]) == 9
    assert set(e[HAIRPIN]) == {f"10.1.0.{i} . 10.1.0.{i}" for i in (47, 48, 49)}
    lb = ruleset.chain("lb-tcp-3")
    assert lb is not None and lb.rules == (
        "ip saddr != 10.1.0.0/16 jump mark-for-masquerade",
        "dnat ip to ip daddr . tcp dport . numgen random mod 3 map @backends-tcp",
    )


def test_one_chain_per_protocol_and_count_not_per_service() -> None:
    ruleset = compile_ruleset(synthetic_cluster(500, 4), NODE)
    generated = [c.name for c in ruleset.chains if c.name.startswith("lb-")]
    assert generated == ["lb-tcp-4"]
    assert len(ruleset.elements()["backends-tcp"]) == 2000


def test_no_endpoints_rejects_and_local_policy_without_local_endpoints_drops() -> None:
    a, b = spn("a"), spn("b")
    state = ClusterState(
        {a: service(a, "172.30.0.1"), b: service(b, "172.30.0.2", internal_traffic_policy=TrafficPolicy.LOCAL)},
        {b: (endpoint("10.0.0.5", node_name="elsewhere"),)},
    )
    e = elements(state)
    assert e[NO_ENDPOINT_SERVICES] == {
        "172.30.0.1 . tcp . 80": "goto reject-chain",
        "172.30.0.2 . tcp . 80": "drop",
    }
    assert e[SERVICE_IPS] == {}


def test_local_policy_uses_only_local_endpoints() -> None:
    name = spn()
    state = ClusterState(
        {name: service(name, internal_traffic_policy=TrafficPolicy.LOCAL)},
        {name: (endpoint("10.0.0.5", node_name="elsewhere"), endpoint("10.0.0.6", node_name="node1"))},
    )
    e = elements(state)
    assert e[SERVICE_IPS] == {"172.30.0.41 . tcp . 80": "goto lb-tcp-1"}
    assert e["backends-tcp"] == {"172.30.0.41 . 80 . 0": "10.0.0.6 . 80"}


def test_affinity_records_with_the_services_timeout() -> None:
    name = spn(protocol=Protocol.UDP)
    state = ClusterState({name: service(name, session_affinity_seconds=90)}, {name: (endpoint("10.0.0.5"),)})
    ruleset = compile_ruleset(state, NODE)
    e = ruleset.elements()
    assert e[SERVICE_IPS] == {"172.30.0.41 . udp . 80": "goto lb-udp-1-affinity"}
    assert e["affinity-services-udp"] == {"172.30.0.41 . 80": "jump affinity-udp-90"}
    lb = ruleset.chain("lb-udp-1-affinity")
    record = ruleset.chain("affinity-udp-90")
    assert lb is not None and record is not None
    assert lb.rules[1] == "dnat ip to ip saddr . ip daddr . udp dport map @affinity-udp"
    assert "timeout 1m30s : ip daddr . udp dport" in record.rules[0]
    fragment = ruleset.fragments[name]
    assert fragment.affinity is not None and fragment.affinity.endpoints == {"10.0.0.5 . 80"}


def test_masquerade_settings() -> None:
    name = spn()
    state = ClusterState({name: service(name)}, {name: (endpoint("10.0.0.5"),)})

    def lb_rules(node: NodeContext) -> tuple[str, ...]:
        chain = compile_ruleset(state, node).chain("lb-tcp-1")
        assert chain is not None
        return chain.rules

    assert lb_rules(NodeContext())[:-1] == ()
    assert lb_rules(NodeContext(masquerade_all=True))[:-1] == ("jump mark-for-masquerade",)
    assert lb_rules(NODE)[:-1] == ("ip saddr != 10.0.0.0/8 jump mark-for-masquerade",)
    masq = compile_ruleset(state, NodeContext(masquerade_bit=5)).chain("mark-for-masquerade")
    assert masq is not None and masq.rules == ("meta mark set meta mark | 0x00000020",)


def test_ipv6_goes_to_the_ip6_table_only() -> None:
    name = spn()
    svc = dataclasses.replace(service(name), cluster_ips=("172.30.0.41", "fd00::0041"))
    state = ClusterState({name: svc}, {name: (endpoint("10.0.0.5"), endpoint("fd00:0::5"))})
    v4, v6 = compile_all(state, NodeContext(cluster_cidrs=("10.0.0.0/8", "fd00::/64")))
    assert v6.nft_family == "ip6"
    assert v6.elements()[SERVICE_IPS] == {"fd00::41 . tcp . 80": "goto lb-tcp-1"}
    assert v6.elements()["backends-tcp"] == {"fd00::41 . 80 . 0": "fd00::5 . 80"}
    assert v4.elements()["backends-tcp"] == {"172.30.0.41 . 80 . 0": "10.0.0.5 . 80"}
    lb = v6.chain("lb-tcp-1")
    assert lb is not None and lb.rules[0] == "ip6 saddr != fd00::/64 jump mark-for-masquerade"


def test_fragments_are_memoized_so_unchanged_services_are_the_same_object() -> None:
    state = synthetic_cluster(50, 3)
    first = compile_ruleset(state, NODE)
    second = compile_ruleset(state, NODE)
    assert all(first.fragments[n] is second.fragments[n] for n in first.fragments)


def test_shared_hairpin_pairs_are_listed_once() -> None:
    a, b = spn("a"), spn("b")
    eps = (endpoint("10.0.0.5"),)
    state = ClusterState({a: service(a, "172.30.0.1"), b: service(b, "172.30.0.2")}, {a: eps, b: eps})
    script = render_script(compile_ruleset(state, NODE))
    assert script.count("10.0.0.5 . 10.0.0.5") == 1
    assert (HAIRPIN, "10.0.0.5 . 10.0.0.5", None) in compile_ruleset(state, NODE).fragments[a].elements


def test_durations_print_like_nft() -> None:
    assert [_nft_duration(s) for s in (10800, 90, 86400 + 3661, 5)] == ["3h", "1m30s", "1d1h1m1s", "5s"]


def test_script_commands_stay_small() -> None:
    script = render_script(compile_ruleset(synthetic_cluster(1000, 10), NODE))
    assert max(line.count(",") for line in script.splitlines()) < 4096
    assert script.count("add element ip kproxy-nft backends-tcp") == 3  # 10,000 elements in 4096-chunks
