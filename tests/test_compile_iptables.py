"""The iptables compiler against kube-proxy's own layout, chain names and golden output."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from kproxy_nft.compile.iptables import (
    _hash16,
    compile_ruleset,
    endpoint_chain_name,
    probability,
    quote,
    render_restore,
    service_chain_name,
)
from kproxy_nft.model import ClusterState, IPFamily, NodeContext, Protocol, ServicePortName, TrafficPolicy
from tests.helpers import EXAMPLES, GOLDEN, NODE, SEED_CONFIG, endpoint, service, spn


def nat_rules(text: str) -> list[str]:
    """The `-A` lines of the nat table of a restore payload."""
    nat = text.split("*nat\n", 1)[1].split("COMMIT", 1)[0]
    return [line for line in nat.splitlines() if line.startswith("-A KUBE-")]


def filter_rules(text: str) -> list[str]:
    table = text.split("*filter\n", 1)[1].split("COMMIT", 1)[0]
    return [line for line in table.splitlines() if line.startswith("-A KUBE-SERVICES")]


def dump(state: ClusterState, node: NodeContext = NODE, family: IPFamily = IPFamily.V4) -> str:
    return render_restore(compile_ruleset(state, node, family))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The vectors of the issue, and kube-proxy's own proxier_test.go names.
        ("ns1/svc1tcp", "AQI2S6QIMU7PVVRP"),
        ("ns1/svc1tcp10.0.1.1:80", "3JOIVZTXZZRGORX4"),
        ("ns4/svc4:p80tcp", "4SW47YFZTEDKD3PK"),
        ("ns1/svc1:p80tcp", "XPGD46QRK7WJZT7O"),
        ("ns1/svc1:p80tcp10.180.0.1:80", "SXIVWICOYRO3J4NJ"),
    ],
)
def test_chain_name_hash_matches_kube_proxy(text: str, expected: str) -> None:
    assert _hash16(text) == expected


def test_chain_names_include_protocol_and_endpoint() -> None:
    name = ServicePortName("ns1", "svc1", "", Protocol.TCP)
    assert service_chain_name("KUBE-SVC-", name) == "KUBE-SVC-AQI2S6QIMU7PVVRP"
    assert endpoint_chain_name(name, endpoint("10.0.1.1")) == "KUBE-SEP-3JOIVZTXZZRGORX4"
    udp = ServicePortName("ns1", "svc1", "", Protocol.UDP)
    assert service_chain_name("KUBE-SVC-", udp) != service_chain_name("KUBE-SVC-", name)


def test_one_endpoint_is_kube_proxys_overall_rules() -> None:
    """The ns1/svc1 rows of kube-proxy's TestOverallIPTablesRules, rule for rule.

    That test runs with kube-proxy's default localhostNodePorts=true; ours is false, which adds
    `! -d 127.0.0.0/8` to the node-port jump (checked in the node-port tests).
    """
    state = ClusterState({spn(): service()}, {spn(): (endpoint("10.180.0.1"),)})
    node = dataclasses.replace(NODE, localhost_nodeports=True)
    assert nat_rules(dump(state, node))[:5] == [
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 '
        "--dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O",
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule '
        'in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS',
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE '
        "--random-fully",
    ]
    assert nat_rules(dump(state, node))[-5:] == [
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
        '-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp '
        "-d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ",
        '-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" '
        "-j KUBE-SEP-SXIVWICOYRO3J4NJ",
        "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ",
        "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT "
        "--to-destination 10.180.0.1:80",
    ]


def test_probabilities_are_one_over_remaining_and_last_is_unconditional() -> None:
    eps = tuple(endpoint(f"10.180.0.{i}") for i in range(1, 5))
    state = ClusterState({spn(): service()}, {spn(): eps})
    jumps = [r for r in nat_rules(dump(state)) if r.startswith("-A KUBE-SVC-") and "-> " in r]
    assert [r.split("--probability ")[1].split()[0] if "--probability" in r else None for r in jumps] == [
        "0.2500000000",
        "0.3333333333",
        "0.5000000000",
        None,
    ]
    assert probability(3) == "0.3333333333"


def test_endpoints_follow_kube_proxys_text_order() -> None:
    """kube-proxy sorts endpoints by their `ip:port` text, so 10.0.0.10 comes before 10.0.0.9."""
    from kproxy_nft.convert import merge_endpoints

    merged = merge_endpoints([{spn(): (endpoint("10.0.0.9"), endpoint("10.0.0.10"))}])
    assert [ep.ip for ep in merged[spn()]] == ["10.0.0.10", "10.0.0.9"]


def test_no_endpoints_rejects_in_filter_and_has_no_nat_chain() -> None:
    state = ClusterState({spn(): service()}, {})
    text = dump(state)
    assert filter_rules(text) == [
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.41 '
        "--dport 80 -j REJECT"
    ]
    assert "KUBE-SVC-" not in text


def test_not_ready_endpoints_fall_back_to_serving_terminating() -> None:
    eps = (
        endpoint("10.180.0.1", ready=False, serving=True, terminating=True),
        endpoint("10.180.0.2", ready=False, serving=False, terminating=True),
        endpoint("10.180.0.3", ready=False, serving=False, terminating=False),
    )
    text = dump(ClusterState({spn(): service()}, {spn(): eps}))
    assert "DNAT --to-destination 10.180.0.1:80" in text
    assert "10.180.0.2:80" not in text and "10.180.0.3:80" not in text
    assert not filter_rules(text)


def test_session_affinity_uses_recent_match() -> None:
    eps = (endpoint("10.180.0.1"), endpoint("10.180.0.2"))
    state = ClusterState({spn(): service(session_affinity_seconds=10800)}, {spn(): eps})
    rules = nat_rules(dump(state))
    sep1 = endpoint_chain_name(spn(), eps[0])
    assert (
        f'-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m recent '
        f"--name {sep1} --rcheck --seconds 10800 --reap -j {sep1}"
    ) in rules
    assert (
        f"-A {sep1} -m comment --comment ns1/svc1:p80 -m recent --name {sep1} --set -m tcp -p tcp -j DNAT "
        "--to-destination 10.180.0.1:80"
    ) in rules
    # The affinity checks come before the random choice.
    svc_rules = [r for r in rules if r.startswith("-A KUBE-SVC-XPGD46QRK7WJZT7O") and "->" in r]
    assert ["--rcheck" in r for r in svc_rules] == [True, True, False, False]


def test_masquerade_all_and_no_detector() -> None:
    state = ClusterState({spn(): service()}, {spn(): (endpoint("10.180.0.1"),)})
    every = nat_rules(dump(state, NodeContext(masquerade_all=True)))
    assert (
        '-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp '
        "-d 172.30.0.41 --dport 80 -j KUBE-MARK-MASQ"
    ) in every
    none = nat_rules(dump(state, NodeContext()))
    assert not any(r.startswith("-A KUBE-SVC-") and "KUBE-MARK-MASQ" in r for r in none)


def test_masquerade_bit_changes_the_mark() -> None:
    state = ClusterState({spn(): service()}, {spn(): (endpoint("10.180.0.1"),)})
    text = dump(state, NodeContext(masquerade_bit=3))
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x8" in text
    assert "--mark 0x8/0x8" in text


def test_ipv6_family_uses_only_ipv6_addresses() -> None:
    svc = service(ip="fd00:10:96::1")
    svc = dataclasses.replace(svc, cluster_ips=("10.96.0.1", "fd00:10:96::1"))
    eps = (endpoint("10.1.0.1"), endpoint("fd00:10:1::1"))
    node = NodeContext(cluster_cidrs=("10.0.0.0/8", "fd00:10::/48"))
    v6 = dump(ClusterState({spn(): svc}, {spn(): eps}), node, IPFamily.V6)
    assert "-d fd00:10:96::1 --dport 80 ! -s fd00:10::/48 -j KUBE-MARK-MASQ" in v6
    assert "--to-destination [fd00:10:1::1]:80" in v6
    assert "10.1.0.1" not in v6 and "10.96.0.1" not in v6
    v4 = dump(ClusterState({spn(): svc}, {spn(): eps}), node, IPFamily.V4)
    assert "fd00" not in v4


def test_single_stack_service_has_no_rules_in_other_family() -> None:
    state = ClusterState({spn(): service()}, {spn(): (endpoint("10.180.0.1"),)})
    assert "KUBE-SVC-" not in dump(state, NODE, IPFamily.V6)


def test_quote_escapes_what_iptables_would_split() -> None:
    assert quote("ns1/svc1:p80") == "ns1/svc1:p80"
    assert quote("a b") == '"a b"'
    assert quote('a"b\\') == '"a\\"b\\\\"'
    assert quote("") == '""'


def test_internal_traffic_policy_local_drops_without_local_endpoints() -> None:
    from kproxy_nft.model import TrafficPolicy

    svc = service(internal_traffic_policy=TrafficPolicy.LOCAL)
    remote = (endpoint("10.180.0.1", node_name="other"),)
    text = dump(ClusterState({spn(): svc}, {spn(): remote}))
    assert filter_rules(text) == [
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 has no local endpoints" -m tcp -p tcp '
        "-d 172.30.0.41 --dport 80 -j DROP"
    ]
    local = (endpoint("10.180.0.1", node_name="node1"), endpoint("10.180.0.2", node_name="other"))
    text = dump(ClusterState({spn(): svc}, {spn(): local}))
    assert "-j KUBE-SVL-" in text and "10.180.0.2" not in text


def test_golden_dump_of_examples() -> None:
    """`kproxy-nft dump` of the seed's examples equals the reviewed golden file."""
    result = subprocess.run(
        [sys.executable, "-m", "kproxy_nft.cli", "dump", "-f", str(EXAMPLES), "--config", str(SEED_CONFIG)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout == (GOLDEN / "examples.iptables").read_text()


# ---------------------------------------------------------------------------------------------
# externally reachable services: node ports, external and LB IPs, source ranges, policies
# ---------------------------------------------------------------------------------------------

def all_rules(text: str, table: str, chain: str) -> list[str]:
    body = text.split(f"*{table}\n", 1)[1].split("COMMIT", 1)[0]
    return [line.removeprefix(f"-A {chain} ") for line in body.splitlines() if line.startswith(f"-A {chain} ")]


NODEPORT = service(service_type="NodePort", node_port=30080)
TWO = (endpoint("10.180.0.1", node_name="node1"), endpoint("10.180.0.2", node_name="other"))


def test_node_port_goes_through_ext_chain_that_masquerades() -> None:
    text = dump(ClusterState({spn(): NODEPORT}, {spn(): TWO}))
    ext = service_chain_name("KUBE-EXT-", spn())
    assert all_rules(text, "nat", "KUBE-NODEPORTS") == [
        f"-m comment --comment ns1/svc1:p80 -m tcp -p tcp --dport 30080 -j {ext}"
    ]
    assert all_rules(text, "nat", ext) == [
        '-m comment --comment "masquerade traffic for ns1/svc1:p80 external destinations" -j KUBE-MARK-MASQ',
        f"-j {service_chain_name('KUBE-SVC-', spn())}",
    ]


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        (NODE, ["-m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS"]),
        (dataclasses.replace(NODE, localhost_nodeports=True), ["-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"]),
        (dataclasses.replace(NODE, node_ips=("192.168.1.5", "10.9.9.9"), nodeport_addresses=("192.168.0.0/16",)),
         ["-d 192.168.1.5 -j KUBE-NODEPORTS"]),
        (dataclasses.replace(NODE, node_ips=("192.168.1.5", "10.9.9.9"), nodeport_addresses=("primary",)),
         ["-d 192.168.1.5 -j KUBE-NODEPORTS"]),
        (dataclasses.replace(NODE, node_ips=("192.168.1.5",), nodeport_addresses=("0.0.0.0/0",)),
         ["-m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j KUBE-NODEPORTS"]),
        # 127.0.0.1 is selected by a CIDR only when localhost NodePorts are on.
        (dataclasses.replace(NODE, node_ips=("192.168.1.5",), nodeport_addresses=("127.0.0.0/8", "192.168.1.5/32")),
         ["-d 192.168.1.5 -j KUBE-NODEPORTS"]),
        (dataclasses.replace(NODE, node_ips=("192.168.1.5",), nodeport_addresses=("127.0.0.0/8", "192.168.1.5/32"),
                             localhost_nodeports=True),
         ["-d 192.168.1.5 -j KUBE-NODEPORTS", "-d 127.0.0.1 -j KUBE-NODEPORTS"]),
    ],
)
def test_nodeport_addresses_choose_the_last_rules_of_kube_services(node: NodeContext, expected: list[str]) -> None:
    text = dump(ClusterState({spn(): NODEPORT}, {spn(): TWO}), node)
    last = [r.split('chain" ', 1)[1] for r in all_rules(text, "nat", "KUBE-SERVICES") if "nodeports" in r]
    assert last == expected
    # The anti-martian rule comes exactly when 127.0.0.1 serves node ports.
    serves_loopback = "127.0.0.0/8" not in expected[0] and (
        "--dst-type LOCAL" in expected[0] or "-d 127.0.0.1 -j KUBE-NODEPORTS" in expected
    )
    assert ("KUBE-FIREWALL" in text) is serves_loopback


def test_ipv6_nodeports_never_on_loopback() -> None:
    v6 = service(ip="fd00::41", service_type="NodePort", node_port=30080)
    node = dataclasses.replace(NODE, localhost_nodeports=True)
    text = dump(ClusterState({spn(): v6}, {spn(): (endpoint("fd00:1::1"),)}), node, IPFamily.V6)
    assert all_rules(text, "nat", "KUBE-SERVICES")[-1].endswith("--dst-type LOCAL ! -d ::1 -j KUBE-NODEPORTS")
    assert "KUBE-FIREWALL" not in text  # the anti-martian rule is IPv4 only


def test_localhost_nodeports_add_kube_proxys_anti_martian_rule() -> None:
    text = dump(ClusterState({spn(): NODEPORT}, {spn(): TWO}), dataclasses.replace(NODE, localhost_nodeports=True))
    assert all_rules(text, "filter", "KUBE-FIREWALL") == [
        '-m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 '
        "-m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
    ]
    assert "-I INPUT 4 -j KUBE-FIREWALL" in text and "-I OUTPUT 3 -j KUBE-FIREWALL" in text


def test_external_policy_local_keeps_source_and_short_circuits_pods_and_node() -> None:
    svc = dataclasses.replace(NODEPORT, external_traffic_policy=TrafficPolicy.LOCAL, health_check_node_port=32000)
    text = dump(ClusterState({spn(): svc}, {spn(): TWO}))
    ext, svc_chain, svl = (service_chain_name(p, spn()) for p in ("KUBE-EXT-", "KUBE-SVC-", "KUBE-SVL-"))
    assert all_rules(text, "nat", ext) == [
        f'-m comment --comment "pod traffic for ns1/svc1:p80 external destinations" -s 10.0.0.0/8 -j {svc_chain}',
        '-m comment --comment "masquerade LOCAL traffic for ns1/svc1:p80 external destinations" '
        "-m addrtype --src-type LOCAL -j KUBE-MARK-MASQ",
        '-m comment --comment "route LOCAL traffic for ns1/svc1:p80 external destinations" '
        f"-m addrtype --src-type LOCAL -j {svc_chain}",
        f"-j {svl}",
    ]
    assert [r for r in all_rules(text, "nat", svl) if "10.180.0.2" in r] == []  # only this node's endpoint
    assert all_rules(text, "filter", "KUBE-NODEPORTS") == [
        '-m comment --comment "ns1/svc1:p80 health check node port" -m tcp -p tcp --dport 32000 -j ACCEPT'
    ]
    assert all_rules(text, "filter", "KUBE-EXTERNAL-SERVICES") == []


def test_external_policy_local_without_local_endpoints_drops_external_traffic_only() -> None:
    svc = dataclasses.replace(NODEPORT, external_traffic_policy=TrafficPolicy.LOCAL, external_ips=("192.0.2.9",))
    remote = (endpoint("10.180.0.2", node_name="other"),)
    text = dump(ClusterState({spn(): svc}, {spn(): remote}))
    ext = service_chain_name("KUBE-EXT-", spn())
    assert all_rules(text, "nat", ext)[-1].endswith(f"-j {service_chain_name('KUBE-SVC-', spn())}")  # no SVL jump
    assert all_rules(text, "filter", "KUBE-EXTERNAL-SERVICES") == [
        '-m comment --comment "ns1/svc1:p80 has no local endpoints" -m tcp -p tcp -d 192.0.2.9 --dport 80 -j DROP',
        '-m comment --comment "ns1/svc1:p80 has no local endpoints" -m addrtype --dst-type LOCAL '
        "-m tcp -p tcp --dport 30080 -j DROP",
    ]
    assert "-d 172.30.0.41 --dport 80 -j KUBE-SVC-" in text  # the cluster IP still works


def test_no_endpoints_rejects_every_kind_of_destination() -> None:
    svc = dataclasses.replace(NODEPORT, external_ips=("192.0.2.9",), load_balancer_ips=("198.51.100.1",))
    text = dump(ClusterState({spn(): svc}, {}))
    reject = '-m comment --comment "ns1/svc1:p80 has no endpoints" '
    assert all_rules(text, "filter", "KUBE-SERVICES") == [f"{reject}-m tcp -p tcp -d 172.30.0.41 --dport 80 -j REJECT"]
    assert all_rules(text, "filter", "KUBE-EXTERNAL-SERVICES") == [
        f"{reject}-m tcp -p tcp -d 192.0.2.9 --dport 80 -j REJECT",
        f"{reject}-m tcp -p tcp -d 198.51.100.1 --dport 80 -j REJECT",
        f"{reject}-m addrtype --dst-type LOCAL -m tcp -p tcp --dport 30080 -j REJECT",
    ]
    assert not any(line.startswith(":KUBE-EXT-") for line in text.splitlines())


def test_source_ranges_guard_lb_ips_but_not_node_ports() -> None:
    svc = dataclasses.replace(NODEPORT, service_type="LoadBalancer", load_balancer_ips=("198.51.100.1",),
                              load_balancer_source_ranges=("203.0.113.0/24",))
    text = dump(ClusterState({spn(): svc}, {spn(): TWO}))
    fw, ext = service_chain_name("KUBE-FW-", spn()), service_chain_name("KUBE-EXT-", spn())
    assert all_rules(text, "nat", fw) == [
        f'-m comment --comment "ns1/svc1:p80 loadbalancer IP" -s 203.0.113.0/24 -j {ext}',
        '-m comment --comment "other traffic to ns1/svc1:p80 will be dropped by KUBE-PROXY-FIREWALL"',
    ]
    assert all_rules(text, "filter", "KUBE-PROXY-FIREWALL") == [
        f'-m comment --comment "ns1/svc1:p80 traffic not accepted by {fw}" -m tcp -p tcp -d 198.51.100.1 '
        "--dport 80 -j DROP"
    ]
    assert f"--dport 30080 -j {ext}" in text  # node port straight to EXT, not FW
    inside = dataclasses.replace(NODE, node_ips=("203.0.113.7",))
    assert f"-s 198.51.100.1 -j {ext}" in dump(ClusterState({spn(): svc}, {spn(): TWO}), inside)


def test_each_family_sees_only_its_own_external_addresses_and_source_ranges() -> None:
    """kube-proxy's per-family service view: IPv4-only source ranges don't firewall an IPv6 LB
    IP, and an IPv4 external IP doesn't make the IPv6 side "externally accessible"."""
    lb = service(ip="10.96.0.5", service_type="LoadBalancer", node_port=30080,
                 load_balancer_ips=("192.0.2.10", "2001:db8::10"), load_balancer_source_ranges=("203.0.113.0/24",))
    lb = dataclasses.replace(lb, cluster_ips=("10.96.0.5", "fd00::5"))
    eps = (endpoint("10.180.0.1"), endpoint("fd01::1"))
    v6 = dump(ClusterState({spn(): lb}, {spn(): eps}), NODE, IPFamily.V6)
    assert "KUBE-FW-" not in v6 and "KUBE-PROXY-FIREWALL -m comment" not in v6
    assert f"-d 2001:db8::10 --dport 80 -j {service_chain_name('KUBE-EXT-', spn())}" in v6
    assert "-d 192.0.2.10" not in v6 and "KUBE-FW-" in dump(ClusterState({spn(): lb}, {spn(): eps}))

    local = service(ip="10.96.0.6", internal_traffic_policy=TrafficPolicy.LOCAL, external_ips=("203.0.113.7",))
    local = dataclasses.replace(local, cluster_ips=("10.96.0.6", "fd00::6"))
    six = (endpoint("fd01::2", node_name="node1"), endpoint("fd01::3", node_name="other"))
    v6 = dump(ClusterState({spn(): local}, {spn(): six}), NODE, IPFamily.V6)
    assert ":KUBE-SVC-" not in v6 and ":KUBE-SVL-" in v6 and "fd01::3" not in v6


def test_nodeport_cidrs_also_select_the_nodes_other_interface_addresses() -> None:
    node = dataclasses.replace(NODE, node_ips=("192.168.1.5",), nodeport_addresses=("10.20.0.0/16",),
                               local_addresses=("127.0.0.1", "10.20.3.4", "192.168.1.5", "fe80::1"))
    text = dump(ClusterState({spn(): NODEPORT}, {spn(): TWO}), node)
    assert [r for r in all_rules(text, "nat", "KUBE-SERVICES") if "KUBE-NODEPORTS" in r][0].endswith(
        "-d 10.20.3.4 -j KUBE-NODEPORTS")
