"""The iptables compiler against kube-proxy's own layout, chain names and golden output."""

from __future__ import annotations

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
from kproxy_nft.model import ClusterState, IPFamily, NodeContext, Protocol, ServicePortName
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
    """The ns1/svc1 rows of kube-proxy's TestOverallIPTablesRules, rule for rule."""
    state = ClusterState({spn(): service()}, {spn(): (endpoint("10.180.0.1"),)})
    assert nat_rules(dump(state))[:5] == [
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 '
        "--dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O",
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule '
        'in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS',
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE '
        "--random-fully",
    ]
    assert nat_rules(dump(state))[-5:] == [
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
    svc = svc.__class__(**{**svc.__dict__, "cluster_ips": ("10.96.0.1", "fd00:10:96::1")})
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
