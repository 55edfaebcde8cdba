# ruff: noqa: E501 (recorded iptables-save lines are kept verbatim, however long)
"""Canonical rule text and iptables-save parsing, checked against output recorded from the kernel.

The recordings below are verbatim `iptables-save` output (iptables 1.8.9, nft and legacy) of
rules loaded with `iptables-restore`: `SURVEY` pairs each rule as written with the line the
kernel gave back, and the recordings in tests/golden/recorded/ are the compiler's output for the
examples, for `variant_state()` (affinity, UDP/SCTP, REJECT/DROP, Local policy, IPv6,
masquerade-all, another mark bit) and for the every-type object set (node ports, external and
LB IPs, source ranges, traffic policies, localhost NodePorts), re-recorded by
tests/record_iptables.py. tests/kernel/test_iptables_apply.py replays the same inputs live on both
backends, so a newer iptables that prints differently fails there first.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kproxy_nft.compile.iptables import Ruleset, compile_ruleset
from kproxy_nft.config import Overrides, load_config_file, resolve
from kproxy_nft.kernel.iptables_plan import plan
from kproxy_nft.kernel.iptables_rule import canonical, jump_target, parse_rule, probability_text, save_string, tokenize
from kproxy_nft.kernel.iptables_text import KernelChain, SaveFormatError, parse_save, render_save, strip_comments
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
from kproxy_nft.sources.manifests import read_manifests
from tests.helpers import EXAMPLES, GOLDEN, SEED_CONFIG

# ---------------------------------------------------------------------------------------------
# inputs shared with the kernel tests
# ---------------------------------------------------------------------------------------------

NODE_CIDR = NodeContext(hostname="node1", cluster_cidrs=("10.0.0.0/8", "fd00:10::/64"))
NODE_MASQUERADE_ALL = NodeContext(hostname="node1", masquerade_all=True, masquerade_bit=5)


def _name(name: str, protocol: Protocol = Protocol.TCP, port: str = "p") -> ServicePortName:
    return ServicePortName("ns1", name, port, protocol)


def variant_state() -> ClusterState:
    """One service port per rule shape the compiler has, dual-stack where it matters."""
    affinity, empty, dns, local, sctp, remote = (
        _name("affinity"), _name("empty"), _name("dns", Protocol.UDP, "dns"), _name("local"),
        _name("sctp", Protocol.SCTP), _name("remote"),
    )  # fmt: skip
    services = {
        affinity: ServicePort(
            affinity, 80, 8080, cluster_ips=("172.30.0.1", "fd00:30::1"), session_affinity_seconds=10800
        ),
        empty: ServicePort(empty, 443, 8443, cluster_ips=("172.30.0.2", "fd00:30::2")),
        dns: ServicePort(dns, 53, 53, cluster_ips=("172.30.0.3", "fd00:30::3")),
        local: ServicePort(
            local, 8080, 80, cluster_ips=("172.30.0.4",), internal_traffic_policy=TrafficPolicy.LOCAL
        ),
        sctp: ServicePort(sctp, 9999, 9999, cluster_ips=("fd00:30::5",)),
        remote: ServicePort(
            remote, 80, 80, cluster_ips=("172.30.0.6",), internal_traffic_policy=TrafficPolicy.LOCAL
        ),
    }
    endpoints = {
        affinity: (Endpoint("10.1.0.1", 8080), Endpoint("10.1.0.2", 8080), Endpoint("fd00:10::1", 8080)),
        dns: (Endpoint("10.1.0.3", 53), Endpoint("fd00:10::3", 53)),
        local: (Endpoint("10.1.0.4", 80, node_name="node1"), Endpoint("10.1.0.5", 80, node_name="node2")),
        sctp: (Endpoint("fd00:10::5", 9999),),
        remote: (Endpoint("10.1.0.6", 80, node_name="node2"),),
    }
    return ClusterState(services, endpoints)


def examples_ruleset(family: IPFamily = IPFamily.V4) -> Ruleset:
    """What `kproxy-nft dump -f examples/ --config examples/kube-proxy-config.yaml` prints."""
    node = resolve(load_config_file(str(SEED_CONFIG)), Overrides(), default_hostname="x").node
    return compile_ruleset(read_manifests([str(EXAMPLES)]).cluster_state(), node, family)


# (family, table, rule as written, the rule as iptables-save printed it) — nft and legacy agree.
SURVEY: list[tuple[int, str, str, str]] = [
    (4, 'nat', '-m comment --comment "ns/svc:p -> 10.0.0.1:80" -m recent --name KUBE-SEP-X --rcheck --seconds 10800 --reap -j KUBE-SEP-X',
     '-m comment --comment "ns/svc:p -> 10.0.0.1:80" -m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-X --mask 255.255.255.255 --rsource -j KUBE-SEP-X'),
    (4, 'nat', '-m comment --comment ns/svc:p -m recent --name KUBE-SEP-X --set -m tcp -p tcp -j DNAT --to-destination 10.0.0.1:80',
     '-p tcp -m comment --comment "ns/svc:p" -m recent --set --name KUBE-SEP-X --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.0.0.1:80'),
    (4, 'nat', '-m statistic --mode random --probability 0.1000000000 -j RETURN',
     '-m statistic --mode random --probability 0.10000000009 -j RETURN'),
    (4, 'nat', '-m statistic --mode random --probability 0.0001000000 -j RETURN',
     '-m statistic --mode random --probability 0.00009999983 -j RETURN'),
    (4, 'nat', '-m statistic --mode random --probability 0.0909090909 -j RETURN',
     '-m statistic --mode random --probability 0.09090909082 -j RETURN'),
    (4, 'nat', '-m statistic --mode random --probability 0.0100000000 -j RETURN',
     '-m statistic --mode random --probability 0.00999999978 -j RETURN'),
    (4, 'nat', '-m statistic --mode random --probability 0.00001 -j RETURN',
     '-m statistic --mode random --probability 0.00001000008 -j RETURN'),
    (4, 'nat', '-m statistic --mode nth --every 3 --packet 1 -j RETURN',
     '-m statistic --mode nth --every 3 --packet 1 -j RETURN'),
    (4, 'nat', '-p udp --dport 53 -j RETURN',
     '-p udp -m udp --dport 53 -j RETURN'),
    (4, 'nat', '-p udp -m udp --dport 53:60 -j RETURN',
     '-p udp -m udp --dport 53:60 -j RETURN'),
    (4, 'nat', '-m sctp -p sctp --dport 99 -j RETURN',
     '-p sctp -m sctp --dport 99 -j RETURN'),
    (4, 'nat', '-p tcp -m multiport --dports 80,443 -j RETURN',
     '-p tcp -m multiport --dports 80,443 -j RETURN'),
    (4, 'nat', '-i eth0 ! -o eth1 -s 10.1.2.3/16 -d 1.2.3.4 -p TCP -j RETURN',
     '-s 10.1.0.0/16 -d 1.2.3.4/32 -i eth0 ! -o eth1 -p tcp -j RETURN'),
    (4, 'nat', '-m addrtype --dst-type LOCAL --limit-iface-in -j RETURN',
     '-m addrtype --dst-type LOCAL --limit-iface-in -j RETURN'),
    (4, 'nat', '-m addrtype ! --src-type LOCAL -j RETURN',
     '-m addrtype ! --src-type LOCAL -j RETURN'),
    (4, 'nat', '-m mark --mark 0x4000 -j RETURN',
     '-m mark --mark 0x4000 -j RETURN'),
    (4, 'nat', '-m mark --mark 16384/16384 -j RETURN',
     '-m mark --mark 0x4000/0x4000 -j RETURN'),
    (4, 'nat', '-j MARK --set-mark 0x10',
     '-j MARK --set-xmark 0x10/0xffffffff'),
    (4, 'nat', '-j MARK --and-mark 0xff',
     '-j MARK --set-xmark 0x0/0xffffff00'),
    (4, 'nat', '-j MARK --set-xmark 0x4000/0x4000',
     '-j MARK --set-xmark 0x4000/0x4000'),
    (4, 'nat', '-j MARK --or-mark 16384',
     '-j MARK --set-xmark 0x4000/0x4000'),
    (4, 'nat', '-p tcp -j MASQUERADE --to-ports 1000-2000 --random',
     '-p tcp -j MASQUERADE --to-ports 1000-2000 --random'),
    (4, 'nat', '-j MASQUERADE',
     '-j MASQUERADE'),
    (4, 'nat', '-j SNAT --to-source 1.2.3.4',
     '-j SNAT --to-source 1.2.3.4'),
    (4, 'nat', '-m comment --comment "a \\"quoted\\" b\\\\c" -j RETURN',
     '-m comment --comment "a \\"quoted\\" b\\\\c" -j RETURN'),
    (4, 'nat', '-m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j RETURN',
     '-m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j RETURN'),
    (4, 'nat', '-m conntrack --ctstate ESTABLISHED,RELATED,NEW -j RETURN',
     '-m conntrack --ctstate NEW,RELATED,ESTABLISHED -j RETURN'),
    (4, 'nat', '-m conntrack --ctstate DNAT --ctorigdst 10.0.0.1 -j RETURN',
     '-m conntrack --ctstate DNAT --ctorigdst 10.0.0.1 -j RETURN'),
    (4, 'nat', '-p tcp --tcp-flags SYN,ACK SYN -j RETURN',
     '-p tcp -m tcp --tcp-flags SYN,ACK SYN -j RETURN'),
    (4, 'nat', '-p tcp --syn -j RETURN',
     '-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j RETURN'),
    (4, 'nat', '! -p tcp -j RETURN',
     '! -p tcp -j RETURN'),
    (4, 'nat', '-p 17 -j RETURN',
     '-p udp -j RETURN'),
    (4, 'nat', '-p all -j RETURN',
     '-j RETURN'),
    (4, 'nat', '-d 10.0.0.0/255.255.0.0 -j RETURN',
     '-d 10.0.0.0/16 -j RETURN'),
    (4, 'nat', '-m tcp -p tcp ! --dport 80 -j RETURN',
     '-p tcp -m tcp ! --dport 80 -j RETURN'),
    (4, 'nat', '-p tcp -m tcp --sport 1 --dport 2 -j RETURN',
     '-p tcp -m tcp --sport 1 --dport 2 -j RETURN'),
    (4, 'nat', '-p tcp -m tcp --dport 2 --sport 1 -j RETURN',
     '-p tcp -m tcp --sport 1 --dport 2 -j RETURN'),
    (4, 'nat', '-m comment --comment x -m comment --comment y -j RETURN',
     '-m comment --comment x -m comment --comment y -j RETURN'),
    (4, 'nat', '--src 1.1.1.1 --destination 2.2.2.2 --protocol tcp -j RETURN',
     '-s 1.1.1.1/32 -d 2.2.2.2/32 -p tcp -j RETURN'),
    (4, 'filter', '-m comment --comment "ns/svc:p has no endpoints" -m tcp -p tcp -d 10.0.0.1 --dport 80 -j REJECT',
     '-d 10.0.0.1/32 -p tcp -m comment --comment "ns/svc:p has no endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable'),
    (4, 'filter', '-j REJECT --reject-with icmp-host-prohibited',
     '-j REJECT --reject-with icmp-host-prohibited'),
    (4, 'filter', '-m conntrack --ctstate INVALID -j DROP',
     '-m conntrack --ctstate INVALID -j DROP'),
    (4, 'filter', '-m tcp -p tcp -m comment --comment x --dport 80 -j ACCEPT',
     '-p tcp -m tcp --dport 80 -m comment --comment x -j ACCEPT'),
    (4, 'filter', '-j LOG --log-prefix "hello world" --log-level 4',
     '-j LOG --log-prefix "hello world"'),
    (4, 'filter', '-m physdev --physdev-is-bridged -j ACCEPT',
     '-m physdev --physdev-is-bridged -j ACCEPT'),
    (4, 'filter', '-m limit --limit 5/sec -j ACCEPT',
     '-m limit --limit 5/sec -j ACCEPT'),
    (6, 'nat', '-m comment --comment "ns/svc:p -> [fd00::1]:80" -m recent --name KUBE-SEP-X --rcheck --seconds 10800 --reap -j KUBE-SEP-X',
     '-m comment --comment "ns/svc:p -> [fd00::1]:80" -m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-X --mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff --rsource -j KUBE-SEP-X'),
    (6, 'nat', '-m comment --comment ns/svc:p -s fd00:0:0::1 -m recent --name KUBE-SEP-X --set -m tcp -p tcp -j DNAT --to-destination [fd00::1]:80',
     '-s fd00::1/128 -p tcp -m comment --comment "ns/svc:p" -m recent --set --name KUBE-SEP-X --mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff --rsource -m tcp -j DNAT --to-destination [fd00::1]:80'),
    (6, 'nat', '-m tcp -p tcp -d FD00::10 --dport 80 ! -s fd00:10::/64 -j RETURN',
     '! -s fd00:10::/64 -d fd00::10/128 -p tcp -m tcp --dport 80 -j RETURN'),
    (6, 'nat', '-d fd00::10/ffff:ffff:: -j RETURN',
     '-d fd00::/32 -j RETURN'),
    (6, 'nat', '-j MARK --xor-mark 0x4000',
     '-j MARK --set-xmark 0x4000/0x0'),
    (6, 'nat', '-p tcp -j DNAT --to-destination fd00::1',
     '-p tcp -j DNAT --to-destination fd00::1'),
    (6, 'nat', '-p tcp -j DNAT --to-destination [fd00::1]',
     '-p tcp -j DNAT --to-destination fd00::1'),
    (6, 'filter', '-m comment --comment "ns/svc:p has no endpoints" -m tcp -p tcp -d fd00::10 --dport 80 -j REJECT',
     '-d fd00::10/128 -p tcp -m comment --comment "ns/svc:p has no endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp6-port-unreachable'),
    (6, 'filter', '-p udp -j REJECT --reject-with icmp6-adm-prohibited',
     '-p udp -j REJECT --reject-with icmp6-adm-prohibited'),
    (4, 'nat', '-m recent --name KUBE-SEP-X --update --seconds 60 --hitcount 3 --rttl --rdest -j RETURN',
     '-m recent --update --seconds 60 --hitcount 3 --rttl --name KUBE-SEP-X --mask 255.255.255.255 --rdest -j RETURN'),
    (4, 'nat', '-m tcp -m comment --comment x --dport 80 -p tcp -j RETURN',
     '-p tcp -m tcp --dport 80 -m comment --comment x -j RETURN'),
    (4, 'nat', '-p tcp -j DNAT --to-destination 10.0.0.1:80-90 --random --persistent',
     '-p tcp -j DNAT --to-destination 10.0.0.1:80-90 --random --persistent'),
    (4, 'nat', '-p tcp -j DNAT --to-destination 10.0.0.1-10.0.0.3:8080',
     '-p tcp -j DNAT --to-destination 10.0.0.1-10.0.0.3:8080'),
    (4, 'nat', '-m conntrack --ctstatus CONFIRMED,ASSURED -j RETURN',
     '-m conntrack --ctstatus ASSURED,CONFIRMED -j RETURN'),
    (4, 'nat', '-m addrtype --src-type LOCAL,UNICAST -j RETURN',
     '-m addrtype --src-type UNICAST,LOCAL -j RETURN'),
    (4, 'nat', '-p tcp -m multiport --destination-ports 443,80:90 -j RETURN',
     '-p tcp -m multiport --dports 443,80:90 -j RETURN'),
    (4, 'nat', '-j MARK --set-mark 0x1/0xff',
     '-j MARK --set-xmark 0x1/0xff'),
    (4, 'nat', '-p udp -j SNAT --to-source 1.2.3.4-1.2.3.9:1000-2000 --random-fully',
     '-p udp -j SNAT --to-source 1.2.3.4-1.2.3.9:1000-2000 --random-fully'),
    (4, 'nat', '-m statistic --mode random --probability 1 -j RETURN',
     '-m statistic --mode random --probability 1.00000000000 -j RETURN'),
    (4, 'nat', '-m statistic --mode random --probability 0.5 -j RETURN',
     '-m statistic --mode random --probability 0.50000000000 -j RETURN'),
    (4, 'nat', '-m statistic --mode random --probability 0.3333333333 -j RETURN',
     '-m statistic --mode random --probability 0.33333333349 -j RETURN'),
    (4, 'nat', '-g KUBE-SEP-X',
     '-g KUBE-SEP-X'),
    (4, 'nat', '-m comment --comment "it\'s" -j RETURN',
     '-m comment --comment "it\\\'s" -j RETURN'),
    (4, 'nat', '-m mark ! --mark 0x4000/0x4000 -j RETURN',
     '-m mark ! --mark 0x4000/0x4000 -j RETURN'),
    (4, 'nat', '-m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully',
     '-m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully'),
    (4, 'nat', '-s 10.1.0.47 -m comment --comment default/x:http -j KUBE-SEP-X',
     '-s 10.1.0.47/32 -m comment --comment "default/x:http" -j KUBE-SEP-X'),
    (4, 'nat', '-m udp -p udp --sport 0053 -j RETURN',
     '-p udp -m udp --sport 53 -j RETURN'),
    (4, 'filter', '-p tcp -j REJECT --reject-with tcp-reset',
     '-p tcp -j REJECT --reject-with tcp-reset'),
    (4, 'filter', '-j REJECT --reject-with host-prohib',
     '-j REJECT --reject-with icmp-host-prohibited'),
    (4, 'filter', '-m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j ACCEPT',
     '-m conntrack --ctstate NEW -m comment --comment "kubernetes load balancer firewall" -j ACCEPT'),
]

RECORDINGS_DIR = GOLDEN / "recorded"
EVERY_TYPE_NODE = NodeContext(hostname="node-a", node_ips=("192.168.100.1",), cluster_cidrs=("10.1.0.0/16",))


def every_type_ruleset(node: NodeContext = EVERY_TYPE_NODE, family: IPFamily = IPFamily.V4) -> Ruleset:
    return compile_ruleset(read_manifests([str(GOLDEN / "every-type")]).cluster_state(), node, family)


# Recording name → (ruleset, iptables backend that printed it). tests/record_iptables.py
# re-records them from the kernel.
RECORDED = {
    "examples-v4-nft": (lambda: examples_ruleset(), "nft"),
    "variants-v4-legacy": (lambda: compile_ruleset(variant_state(), NODE_CIDR), "legacy"),
    "variants-v6-masquerade-all-nft": (
        lambda: compile_ruleset(variant_state(), NODE_MASQUERADE_ALL, IPFamily.V6), "nft"),
    "every-type-v4-nft": (lambda: every_type_ruleset(), "nft"),
    "every-type-localhost-v4-legacy": (
        lambda: every_type_ruleset(dataclasses.replace(EVERY_TYPE_NODE, localhost_nodeports=True)), "legacy"),
    "every-type-v6-nft": (lambda: every_type_ruleset(family=IPFamily.V6), "nft"),
}


def recording_inputs(name: str) -> tuple[Ruleset, str]:
    make, backend = RECORDED[name]
    return make(), backend


def recorded(name: str) -> str:
    return (RECORDINGS_DIR / f"{name}.save").read_text()


RECORDINGS = [pytest.param(recorded(name), make, id=name) for name, (make, _) in RECORDED.items()]


# ---------------------------------------------------------------------------------------------
# canonical form against the kernel's own printing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "table", "written", "saved"), SURVEY)
def test_canonical_is_what_iptables_save_prints(family: int, table: str, written: str, saved: str) -> None:
    assert canonical(written, IPFamily(family)) == saved


@pytest.mark.parametrize(("family", "table", "written", "saved"), SURVEY)
def test_canonical_leaves_saved_text_alone(family: int, table: str, written: str, saved: str) -> None:
    assert canonical(saved, IPFamily(family)) == saved


@pytest.mark.parametrize(("recorded", "ruleset"), RECORDINGS)
def test_each_compiled_rule_canonicalizes_to_the_recorded_line(recorded: str, ruleset: object) -> None:
    desired: Ruleset = ruleset()  # type: ignore[operator]
    state = parse_save(recorded, desired.family)
    for table in desired.tables:
        for chain in table.chains:
            saved = state.table(table.name).rules(chain.name)
            assert [canonical(rule, desired.family) for rule in chain.rules] == list(saved), chain.name
    for jump in desired.jumps:
        assert canonical(jump.rule, desired.family) in state.table(jump.table).rules(jump.chain)


@pytest.mark.parametrize(("recorded", "ruleset"), RECORDINGS)
def test_plan_against_the_recorded_kernel_is_empty(recorded: str, ruleset: object) -> None:
    desired: Ruleset = ruleset()  # type: ignore[operator]
    result = plan(desired, parse_save(recorded, desired.family))
    assert result.is_empty, result.payload


@pytest.mark.parametrize(("recorded", "ruleset"), RECORDINGS)
def test_recorded_output_is_a_fixpoint(recorded: str, ruleset: object) -> None:
    family = IPFamily.V6 if "ip6tables" in recorded else IPFamily.V4
    for table in parse_save(recorded, family).tables.values():
        for chain in table.chains.values():
            assert [canonical(rule, family) for rule in chain.rules] == list(chain.rules)


def test_the_kernel_quotes_only_what_is_not_plainly_alphanumeric() -> None:
    assert save_string("kubernetes") == "kubernetes"
    assert save_string("a-b_c9") == "a-b_c9"
    assert save_string("ns/svc:p") == '"ns/svc:p"'
    assert save_string("10.0.0.1") == '"10.0.0.1"'
    assert save_string("") == '""'
    assert save_string("it's \"x\" \\") == '"it\\\'s \\"x\\" \\\\"'


@pytest.mark.parametrize(
    ("written", "printed"),
    [
        ("0.3333333333", "0.33333333349"),  # kube-proxy's 1/3: 715827883 / 2^31
        ("0.5000000000", "0.50000000000"),
        ("0.1000000000", "0.10000000009"),
        ("1", "1.00000000000"),
        ("0", "0.00000000000"),
        ("0.0000000002328306437", "0.00000000047"),  # exactly half a step: rounds up, like lround
    ],
)
def test_probability_is_what_the_kernel_stores(written: str, printed: str) -> None:
    assert probability_text(written) == printed


@given(st.floats(min_value=0.0, max_value=1.0))
def test_probability_text_is_stable(p: float) -> None:
    once = probability_text(repr(p))
    assert probability_text(once) == once
    assert abs(float(once) - p) <= 2**-32 + 5e-12  # half a kernel step, plus %.11f rounding


# ---------------------------------------------------------------------------------------------
# reading rule text
# ---------------------------------------------------------------------------------------------


def test_tokens_follow_iptables_restore_quoting() -> None:
    assert [t.text for t in tokenize('-m comment --comment "a \\"b\\" c\\\\d" -j X')] == [
        "-m", "comment", "--comment", 'a "b" c\\d', "-j", "X",
    ]  # fmt: skip
    # A single quote is an ordinary character to iptables-restore.
    assert [t.text for t in tokenize("--comment it's")] == ["--comment", "it's"]
    # A quoted value is a value even when it starts with a dash.
    assert parse_rule('-j LOG --log-prefix "-x"').target.options[0].args == ("-x",)  # type: ignore[union-attr]


def test_options_go_to_the_latest_extension_that_knows_them() -> None:
    rule = parse_rule("-m tcp -m comment --comment x --dport 80 -p tcp -j KUBE-SVC-X")
    routed = [(m.name, [o.name for o in m.options]) for m in rule.matches]
    assert routed == [("tcp", ["dport"]), ("comment", ["comment"])]
    # Without -m tcp, --dport loads the protocol's match where it appears.
    rule = parse_rule("-m comment --comment x -p udp --dport 53 -j ACCEPT")
    assert [m.name for m in rule.matches] == ["comment", "udp"]
    # A chain as target takes no options: --comment after -j still belongs to the comment match.
    assert canonical("-m comment -j KUBE-SVC-X --comment x") == "-m comment --comment x -j KUBE-SVC-X"


def test_unknown_extensions_keep_their_options_in_order() -> None:
    assert canonical("-m foo --b 2 --a 1 -j BAR --z --y") == "-m foo --b 2 --a 1 -j BAR --z --y"


def test_host_names_and_address_lists_are_left_alone() -> None:
    assert canonical("-s example.com -d 10.0.0.1,10.0.0.2") == "-s example.com -d 10.0.0.1,10.0.0.2"


@pytest.mark.parametrize(
    ("rule", "target"),
    [
        ("-m comment --comment x -j KUBE-SVC-ABC", "KUBE-SVC-ABC"),
        ("-g KUBE-SEP-X", "KUBE-SEP-X"),
        ('-m comment --comment "-j NOT-THIS" -j RETURN', "RETURN"),
        ("-m comment --comment x", None),
    ],
)
def test_jump_target(rule: str, target: str | None) -> None:
    assert jump_target(rule) == target


# ---------------------------------------------------------------------------------------------
# iptables-save text
# ---------------------------------------------------------------------------------------------


def test_parse_save_keeps_chains_policies_and_rule_text() -> None:
    state = parse_save(recorded("examples-v4-nft"))
    nat = state.table("nat")
    assert list(nat.chains)[:4] == ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"]
    assert nat.chains["PREROUTING"].policy == "ACCEPT" and nat.chains["KUBE-SERVICES"].policy is None
    assert nat.rules("KUBE-MARK-MASQ") == ("-j MARK --set-xmark 0x4000/0x4000",)
    assert render_save(state) == strip_comments(recorded("examples-v4-nft"))


def test_parse_save_reads_counters() -> None:
    text = "*nat\n:PREROUTING ACCEPT [5:300]\n:X - [0:0]\n[5:300] -A PREROUTING -j X\n-A X\nCOMMIT\n"
    nat = parse_save(text).table("nat")
    assert nat.rules("PREROUTING") == ("-j X",)
    assert nat.chains["X"] == KernelChain("X", ("",))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("*nat\n:X - [0:0]\n", "line 2: table nat has no COMMIT"),
        ("*nat\n-A X -j RETURN\nCOMMIT\n", "line 2: not a rule of a declared chain"),
        (":X - [0:0]\n", "line 1: outside a table"),
        ("*nat\n*filter\n", "line 2: table filter starts before COMMIT of nat"),
        ("*nat\n:X\nCOMMIT\n", "line 2: bad chain line"),
    ],
)
def test_parse_save_names_the_bad_line(text: str, message: str) -> None:
    with pytest.raises(SaveFormatError, match=message):
        parse_save(text)


def test_a_missing_table_reads_as_empty() -> None:
    state = parse_save("")
    assert state.table("nat").chains == {}
    assert state.table("nat").is_builtin("PREROUTING") and not state.table("nat").is_builtin("KUBE-SERVICES")
