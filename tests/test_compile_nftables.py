"""The nftables compiler: flat layout, kube-proxy semantics, golden output, memoized fragments.

The every-type golden (tests/golden/every-type-shop.yaml → every-type-shop.nft) holds every Service type
and policy; tests/kernel/test_nftables_backend.py checks that it loads and lists back as written.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kproxy_nft.compile.memo import FragmentMemo
from kproxy_nft.compile.nftables import (
    CLUSTER_IPS,
    FIREWALL_IPS,
    HAIRPIN,
    NO_ENDPOINT_NODEPORTS,
    NO_ENDPOINT_SERVICES,
    SERVICE_IPS,
    SERVICE_NODEPORTS,
    Ruleset,
    ServiceFragment,
    _nft_duration,
    compile_all,
    compile_ruleset,
    external_chain,
    firewall_chain,
    ipv6_affinity_skipped,
    render_script,
    service_chain_base,
)
from kproxy_nft.lab.synthetic import synthetic_cluster
from kproxy_nft.model import ClusterState, IPFamily, NodeContext, Protocol, ServicePort, TrafficPolicy
from kproxy_nft.sources.manifests import ManifestError, read_manifests
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


def test_a_memo_gives_unchanged_services_the_same_fragment_object() -> None:
    state = synthetic_cluster(50, 3)
    memo: FragmentMemo[ServiceFragment] = FragmentMemo()
    first = compile_ruleset(state, NODE, memo=memo)
    second = compile_ruleset(state, NODE, memo=memo)
    assert all(first.fragments[n] is second.fragments[n] for n in first.fragments)
    # Equal inputs in new objects (an update that changed nothing) count as unchanged too.
    copied = ClusterState(
        {n: dataclasses.replace(s) for n, s in state.services.items()},
        {n: tuple(dataclasses.replace(ep) for ep in eps) for n, eps in state.endpoints.items()},
    )
    third = compile_ruleset(copied, NODE, memo=memo)
    assert all(first.fragments[n] is third.fragments[n] for n in first.fragments)


def test_a_memo_holds_only_the_last_compile_and_no_memo_holds_nothing() -> None:
    state = synthetic_cluster(50, 3)
    memo: FragmentMemo[ServiceFragment] = FragmentMemo()
    compile_ruleset(state, NODE, memo=memo)
    assert len(memo) == 50
    kept = dict(list(state.services.items())[:10])
    compile_ruleset(ClusterState(kept, state.endpoints), NODE, memo=memo)
    assert len(memo) == 10
    # Without a memo nothing is kept: equal fragments, but compiled afresh.
    a, b = compile_ruleset(state, NODE), compile_ruleset(state, NODE)
    assert a == b
    assert not any(a.fragments[n] is b.fragments[n] for n in a.fragments)


def test_shared_hairpin_pairs_are_listed_once() -> None:
    a, b = spn("a"), spn("b")
    eps = (endpoint("10.0.0.5"),)
    state = ClusterState({a: service(a, "172.30.0.1"), b: service(b, "172.30.0.2")}, {a: eps, b: eps})
    script = render_script(compile_ruleset(state, NODE))
    assert script.count("10.0.0.5 . 10.0.0.5") == 1
    assert (HAIRPIN, "10.0.0.5 . 10.0.0.5", None) in compile_ruleset(state, NODE).fragments[a].elements


def test_hairpin_pairs_only_for_endpoints_that_can_be_on_this_node() -> None:
    """A pod is DNATed back to itself only by its own node: this node's endpoints, and the
    ones whose node is not known, get a pair; other nodes' do not."""
    a = spn("a")
    eps = (endpoint("10.0.0.5", node_name="node1"), endpoint("10.0.0.6"), endpoint("10.0.0.7", node_name="node2"))
    state = ClusterState({a: service(a, "172.30.0.1")}, {a: eps})
    pairs = {key for name, key, _ in compile_ruleset(state, NODE).fragments[a].elements if name == HAIRPIN}
    assert pairs == {"10.0.0.5 . 10.0.0.5", "10.0.0.6 . 10.0.0.6"}


def test_durations_print_like_nft() -> None:
    assert [_nft_duration(s) for s in (10800, 90, 86400 + 3661, 5)] == ["3h", "1m30s", "1d1h1m1s", "5s"]


def test_script_commands_stay_small() -> None:
    script = render_script(compile_ruleset(synthetic_cluster(1000, 10), NODE))
    assert max(line.count(",") for line in script.splitlines()) < 4096
    assert script.count("add element ip kproxy-nft backends-tcp") == 3  # 10,000 elements in 4096-chunks


# ---------------------------------------------------------------------------------------------
# externally reachable services
# ---------------------------------------------------------------------------------------------

EVERY_TYPE = GOLDEN / "every-type-shop.yaml"
EVERY_NODE = NodeContext(hostname="node1", node_ips=("192.168.100.1",), cluster_cidrs=("10.1.0.0/16",))


def every_type() -> tuple[ClusterState, NodeContext]:
    """The every-type objects, and the node with the ServiceCIDRs they hold (as `kproxy-nft dump`)."""
    manifests = read_manifests([str(EVERY_TYPE)])
    return manifests.cluster_state(), dataclasses.replace(EVERY_NODE, service_cidrs=manifests.service_cidrs)


def every_type_rulesets() -> tuple[Ruleset, ...]:
    state, node = every_type()
    return compile_all(state, node)


def test_every_type_matches_golden() -> None:
    # Regenerate after an intended change: write render_script(every_type_rulesets()) to the file.
    assert render_script(every_type_rulesets()) == (GOLDEN / "every-type-shop.nft").read_text()


def test_service_cidrs_come_from_servicecidr_objects_and_bad_ones_name_the_field(tmp_path: Path) -> None:
    assert every_type()[1].service_cidrs == ("10.96.0.0/16", "fd00:96::/112")
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: x}\n"
                   "spec: {cidrs: [10.96.0.0/12, 10.300.0.0/16]}\n")
    field = r"spec.cidrs\[1\]: '10.300.0.0/16' is not a valid CIDR"
    with pytest.raises(ManifestError, match=rf"bad.yaml: document 1 \(ServiceCIDR x\): {field}"):
        read_manifests([str(bad)])


def test_chain_names_are_kube_proxys() -> None:
    # pkg/proxy/nftables/proxier_test.go names `ns1/svc1` port `p80` this way.
    assert service_chain_base(spn("svc1", "ns1", "p80")) == "ULMVA6XW-ns1/svc1/tcp/p80"
    assert external_chain(spn()).startswith("external-") and firewall_chain(spn()).startswith("firewall-")


def external(name: str = "svc1", **kw: object) -> ServicePort:
    return service(spn(name), node_port=30080, external_ips=("192.0.2.1",), **kw)


HERE, THERE = endpoint("10.0.0.5", node_name="node1"), endpoint("10.0.0.6", node_name="node2")


def test_external_policy_cluster_masquerades_and_uses_every_endpoint() -> None:
    name = spn()
    ruleset = compile_ruleset(ClusterState({name: external()}, {name: (HERE, THERE)}), NODE)
    e = ruleset.elements()
    ext = external_chain(name)
    assert e[SERVICE_IPS]["192.0.2.1 . tcp . 80"] == f"goto {ext}"
    assert e[SERVICE_NODEPORTS] == {"tcp . 30080": f"goto {ext}"}
    assert e[NO_ENDPOINT_SERVICES] == {} and e[NO_ENDPOINT_NODEPORTS] == {}
    chain = ruleset.chain(ext)
    assert chain is not None and chain.rules == (
        "jump mark-for-masquerade",
        "meta l4proto tcp dnat ip to numgen random mod 2 map { 0 : 10.0.0.5 . 80, 1 : 10.0.0.6 . 80 }",
    )
    assert ruleset.fragments[name].chains == (chain,)


def test_external_policy_local_short_circuits_pods_and_host_and_keeps_client_addresses() -> None:
    name = spn()
    svc = external(external_traffic_policy=TrafficPolicy.LOCAL)
    ruleset = compile_ruleset(ClusterState({name: svc}, {name: (HERE, THERE)}), NODE)
    chain = ruleset.chain(external_chain(name))
    both = "map { 0 : 10.0.0.5 . 80, 1 : 10.0.0.6 . 80 }"
    assert chain is not None and chain.rules == (
        f"ip saddr 10.0.0.0/8 meta l4proto tcp dnat ip to numgen random mod 2 {both}",
        "fib saddr type local jump mark-for-masquerade",
        f"fib saddr type local meta l4proto tcp dnat ip to numgen random mod 2 {both}",
        "meta l4proto tcp dnat ip to numgen random mod 1 map { 0 : 10.0.0.5 . 80 }",
    )
    # Without a cluster CIDR there is no pod short-circuit (kube-proxy: no local detector).
    no_cidr = compile_ruleset(ClusterState({name: svc}, {name: (HERE, THERE)}), NodeContext(hostname="node1"))
    chain = no_cidr.chain(external_chain(name))
    assert chain is not None and not any("saddr 10." in rule for rule in chain.rules)


def test_no_local_endpoints_drops_external_traffic_no_endpoints_rejects_everything() -> None:
    local, empty = spn("local"), spn("empty")
    state = ClusterState(
        {
            local: service(local, "172.30.0.1", node_port=30001, external_ips=("192.0.2.1",),
                           load_balancer_ips=("198.51.100.1",), external_traffic_policy=TrafficPolicy.LOCAL),
            empty: service(empty, "172.30.0.2", node_port=30002, external_ips=("192.0.2.2",),
                           load_balancer_ips=("198.51.100.2",)),
        },
        {local: (THERE,)},
    )
    ruleset = compile_ruleset(state, NODE)
    e = ruleset.elements()
    assert e[NO_ENDPOINT_SERVICES] == {
        "192.0.2.1 . tcp . 80": "drop",
        "198.51.100.1 . tcp . 80": "drop",
        "172.30.0.2 . tcp . 80": "goto reject-chain",
        "192.0.2.2 . tcp . 80": "goto reject-chain",
        "198.51.100.2 . tcp . 80": "goto reject-chain",
    }
    assert e[NO_ENDPOINT_NODEPORTS] == {"tcp . 30001": "drop", "tcp . 30002": "goto reject-chain"}
    # The cluster IP of the Local service still works, and so does its external chain's
    # short-circuit for pods and the host; the empty service has neither.
    assert e[SERVICE_IPS]["172.30.0.1 . tcp . 80"] == "goto lb-tcp-1"
    assert e[SERVICE_NODEPORTS] == {"tcp . 30001": f"goto {external_chain(local)}"}
    assert ruleset.fragments[empty].chains == ()
    assert e[CLUSTER_IPS] == {"172.30.0.1": None, "172.30.0.2": None}


def test_source_ranges_filter_lb_ips_only_and_allow_the_lb_ips_when_the_node_is_inside() -> None:
    name = spn()
    svc = service(name, node_port=30080, load_balancer_ips=("198.51.100.1", "2001:db8::1"),
                  load_balancer_source_ranges=("203.0.113.0/24", "192.168.0.0/16", "2001:db8::/32"))
    state = ClusterState({name: svc}, {name: (HERE,)})
    fw = firewall_chain(name)

    def firewall(node: NodeContext) -> tuple[str, ...]:
        ruleset = compile_ruleset(state, node)
        assert ruleset.elements()[FIREWALL_IPS] == {"198.51.100.1 . tcp . 80": f"goto {fw}"}
        chain = ruleset.chain(fw)
        assert chain is not None
        return chain.rules

    ranges = ("ip saddr 203.0.113.0/24 return", "ip saddr 192.168.0.0/16 return")
    assert firewall(NODE) == (*ranges, "drop")
    inside = dataclasses.replace(NODE, node_ips=("192.168.1.1",))
    assert firewall(inside) == (*ranges, "ip saddr 198.51.100.1 return", "drop")
    # No ranges of the family: no firewall (kube-proxy filters the ranges by family).
    v4_only = dataclasses.replace(svc, load_balancer_source_ranges=("2001:db8::/32",))
    assert compile_ruleset(ClusterState({name: v4_only}, {name: (HERE,)}), NODE).elements()[FIREWALL_IPS] == {}


def test_nodeport_addresses() -> None:
    def services_rules(node: NodeContext, family: IPFamily = IPFamily.V4) -> tuple[str, ...]:
        chain = compile_ruleset(ClusterState(), node, family).chain("services")
        assert chain is not None
        return chain.rules[1:]

    vmap = "meta l4proto . th dport vmap @service-nodeports"
    assert services_rules(NODE) == (f"fib daddr type local ip daddr != 127.0.0.0/8 {vmap}",)
    assert services_rules(NODE, IPFamily.V6) == (f"fib daddr type local ip6 daddr != ::1 {vmap}",)
    node = NodeContext(node_ips=("192.168.1.1", "10.0.0.1"), nodeport_addresses=("0.0.0.0/1", "127.0.0.0/8"),
                       localhost_nodeports=True)
    # Localhost is never a node-port address in nftables mode, even when iptables mode allows it.
    assert services_rules(node) == (f"ip daddr 10.0.0.1 {vmap}",)
    node = dataclasses.replace(node, nodeport_addresses=("0.0.0.0/1", "192.168.0.0/16"))
    assert services_rules(node) == (f"ip daddr {{ 10.0.0.1, 192.168.1.1 }} {vmap}",)
    check = compile_ruleset(ClusterState(), node).chain("nodeport-endpoints-check")
    assert check is not None and check.rules == (
        "ip daddr { 10.0.0.1, 192.168.1.1 } meta l4proto . th dport vmap @no-endpoint-nodeports",
    )
    assert services_rules(dataclasses.replace(node, nodeport_addresses=("172.16.0.0/12",))) == ()


def test_cluster_ips_check_rejects_unknown_ports_and_drops_unallocated_addresses() -> None:
    node = dataclasses.replace(NODE, service_cidrs=("172.30.0.0/16", "fd00::/108", "10.96.0.1/32"))
    chain = compile_ruleset(ClusterState(), node).chain("cluster-ips-check")
    assert chain is not None and chain.rules == (
        "ip daddr @cluster-ips reject",
        "ip daddr 172.30.0.0/16 drop",
        "ip daddr 10.96.0.1 drop",
    )


def test_affinity_holds_for_every_destination() -> None:
    name = spn()
    svc = external(session_affinity_seconds=60, load_balancer_ips=("198.51.100.1",),
                   external_traffic_policy=TrafficPolicy.LOCAL)
    ruleset = compile_ruleset(ClusterState({name: svc}, {name: (HERE, THERE)}), NODE)
    e = ruleset.elements()
    assert e["affinity-services-tcp"] == {
        "172.30.0.41 . 80": "jump affinity-tcp-60",
        "192.0.2.1 . 80": "jump affinity-tcp-60",
        "198.51.100.1 . 80": "jump affinity-tcp-60",
    }
    assert e["affinity-nodeports-tcp"] == {"30080": "jump affinity-tcp-60"}
    chain = ruleset.chain(external_chain(name))
    assert chain is not None
    lookup = "dnat ip to ip saddr . ip daddr . tcp dport map @affinity-tcp"
    # The sticky endpoint is looked up before each random pick, under the same condition.
    assert [r for r in chain.rules if "affinity" in r] == [
        f"ip saddr 10.0.0.0/8 {lookup}", f"fib saddr type local {lookup}", lookup
    ]
    for i, rule in enumerate(chain.rules):
        if "affinity" in rule:
            assert "numgen" in chain.rules[i + 1]
    target = ruleset.fragments[name].affinity
    assert target is not None
    assert target.suffixes == {" . 172.30.0.41 . 80", " . 192.0.2.1 . 80", " . 198.51.100.1 . 80", " . 30080"}
    assert target.endpoints == {"10.0.0.5 . 80", "10.0.0.6 . 80"}


def test_other_family_addresses_are_left_out() -> None:
    name = spn()
    svc = dataclasses.replace(external(), cluster_ips=("172.30.0.41", "fd00::41"),
                              external_ips=("192.0.2.1", "2001:db8::7"))
    v4, v6 = compile_all(ClusterState({name: svc}, {name: (HERE, endpoint("fd00::5", node_name="node1"))}), NODE)
    assert set(v4.elements()[SERVICE_IPS]) == {"172.30.0.41 . tcp . 80", "192.0.2.1 . tcp . 80"}
    assert set(v6.elements()[SERVICE_IPS]) == {"fd00::41 . tcp . 80", "2001:db8::7 . tcp . 80"}
    chain = v6.chain(external_chain(name))
    assert chain is not None
    assert chain.rules[-1] == "meta l4proto tcp dnat ip6 to numgen random mod 1 map { 0 : fd00::5 . 80 }"


def test_ipv6_client_ip_affinity_is_left_out_of_the_ip6_table_only() -> None:
    """nft 1.0.6 aborts on an ip6 dynamic map update (see `compile_service_port`): IPv4 keeps it."""
    name = spn()
    svc = dataclasses.replace(service(name, session_affinity_seconds=90), cluster_ips=("172.30.0.41", "fd00::41"))
    state = ClusterState({name: svc}, {name: (endpoint("10.0.0.5"), endpoint("fd00::5"))})
    v4, v6 = compile_all(state, NODE)
    assert v4.elements()[SERVICE_IPS] == {"172.30.0.41 . tcp . 80": "goto lb-tcp-1-affinity"}
    assert v6.elements()[SERVICE_IPS] == {"fd00::41 . tcp . 80": "goto lb-tcp-1"}
    assert not any("update @affinity" in rule for chain in v6.all_chains() for rule in chain.rules)
    assert ipv6_affinity_skipped(state) == [name]
