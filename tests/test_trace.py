"""`kproxy-nft trace`: goldens of its text and JSON, its bad input, and the two modes agreeing.

* Goldens: one packet per behaviour of the every-type object set (tests/golden/every-type, the
  set `test_golden_dumps` dumps), traced in both modes; text in tests/golden/trace-every-type.<mode>.txt,
  the JSON contract in tests/golden/trace-every-type.<mode>.json. Regenerate after an intended
  change with `python -m tests.test_trace` and review the diff.
* Property: for any cluster and packet, tracing kube-proxy's iptables layout and our nftables
  layout gives the same verdict, endpoints (probabilities within 1e-9) and masquerade: two
  independent rule sets, one walk each, one answer.
* The walk also reads what `iptables-save` prints (not only the compiler's spelling), and a
  node running kube-proxy itself has the same layout.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy_nft.cli import main
from kproxy_nft.compile.iptables import compile_ruleset, render_restore
from kproxy_nft.config import ProxySettings
from kproxy_nft.kernel.iptables_rule import canonical
from kproxy_nft.kernel.iptables_text import KernelChain, KernelState, KernelTable
from kproxy_nft.model import ClusterState, Endpoint, IPFamily, NodeContext, Protocol, ServicePort, ServicePortName
from kproxy_nft.model import TrafficPolicy as Policy
from kproxy_nft.proxier import make_proxier
from kproxy_nft.trace import Trace, iptables_program, parse_packet, trace
from kproxy_nft.trace.iptables import state_from_ruleset
from kproxy_nft.trace.nftables import NotUnderstood, parse_nft_rule
from kproxy_nft.trace.packet import is_local
from kproxy_nft.trace.reasons import explain
from tests.helpers import GOLDEN

FLAGS = ["-f", str(GOLDEN / "every-type"), "--hostname-override", "node-a", "--service-cidr", "10.96.0.0/12",
         "--node-ip", "192.168.100.1", "--cluster-cidr", "10.1.0.0/16"]
# name: (src, dst, protocol): one packet per behaviour of the every-type set.
CASES = {
    "cluster-ip-from-pod": ("10.1.0.50", "10.96.0.10:80", "tcp"),
    "hairpin": ("10.1.0.47", "10.96.0.10:80", "tcp"),
    "nodeport-from-outside": ("192.168.100.2", "192.168.100.1:30080", "tcp"),
    "nodeport-udp": ("192.168.100.2", "192.168.100.1:30053", "udp"),
    "lb-in-source-range": ("192.168.100.2", "203.0.113.10:443", "tcp"),
    "lb-source-range-refused": ("192.168.100.9", "203.0.113.10:443", "tcp"),
    "lb-ipmode-proxy": ("192.168.100.2", "203.0.113.11:443", "tcp"),
    "etp-local-no-local-endpoint": ("192.168.100.2", "192.168.100.1:30082", "tcp"),
    "etp-local-from-pod": ("10.1.0.50", "192.168.100.1:30082", "tcp"),
    "itp-local-from-node": ("192.168.100.1", "10.96.0.16:80", "tcp"),
    "no-endpoints": ("10.1.0.50", "10.96.0.17:80", "tcp"),
    "no-such-port": ("10.1.0.50", "10.96.0.10:81", "tcp"),
    "unallocated-ip": ("10.1.0.50", "10.96.0.99:80", "tcp"),
    "terminating-fallback": ("10.1.0.50", "10.96.0.19:80", "tcp"),
    "ipv6": ("fd00:1::50", "[fd00:96::20]:80", "tcp"),
}
MODES = ("iptables", "nftables")


def run_trace(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["trace", *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def golden_text(mode: str) -> str:
    parts = []
    for name, (src, dst, proto) in CASES.items():
        code, out, err = run_trace(*FLAGS, "--proxy-mode", mode, "--src", src, "--dst", dst, "--protocol", proto)
        assert code == 0, err
        parts.append(f"### {name}\n{out}")
    return "\n".join(parts)


def golden_json(mode: str) -> str:
    traces = {}
    for name, (src, dst, proto) in CASES.items():
        args = ("--proxy-mode", mode, "--src", src, "--dst", dst, "--protocol", proto, "-o", "json")
        code, out, err = run_trace(*FLAGS, *args)
        assert code == 0, err
        traces[name] = json.loads(out)
    return json.dumps(traces, indent=2) + "\n"


@pytest.mark.parametrize("mode", MODES)
def test_text_matches_golden(mode: str) -> None:
    assert golden_text(mode) == (GOLDEN / f"trace-every-type.{mode}.txt").read_text()


@pytest.mark.parametrize("mode", MODES)
def test_json_matches_golden(mode: str) -> None:
    assert golden_json(mode) == (GOLDEN / f"trace-every-type.{mode}.json").read_text()


def test_json_schema_is_the_contract() -> None:
    """docs/TRACE.md: exactly these keys, these types, these verdicts."""
    for mode in MODES:
        for name, traced in json.loads((GOLDEN / f"trace-every-type.{mode}.json").read_text()).items():
            assert set(traced) == {"verdict", "endpoints", "masquerade", "path", "reasons"}, name
            assert traced["verdict"] in ("dnat", "accept", "drop", "reject", "none")
            assert all(set(e) == {"address", "probability"} for e in traced["endpoints"])
            assert (traced["verdict"] == "dnat") == bool(traced["endpoints"]), name
            assert isinstance(traced["masquerade"], bool)
            assert all(set(s) in ({"table", "chain", "rule"}, {"map", "element"}) for s in traced["path"])
            assert all(isinstance(r, str) for r in traced["reasons"])


@pytest.mark.parametrize(
    ("dst", "src", "proto", "message"),
    [
        ("10.96.0.10", "10.1.0.50", "tcp", "needs a port"),
        ("web.demo:80", "10.1.0.50", "tcp", "not an IP address"),
        ("[fd00::1]:80", "10.1.0.50", "tcp", "different IP families"),
        ("10.96.0.10:80", "10.1.0.50", "icmp", "not one of tcp, udp, sctp"),
        ("10.96.0.10:0", "10.1.0.50", "tcp", "between 1 and 65535"),
        ("10.96.0.10:80", "pod-a", "tcp", "not an IP address"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(dst: str, src: str, proto: str, message: str) -> None:
    code, out, err = run_trace(*FLAGS, "--src", src, "--dst", dst, "--protocol", proto)
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and message in lines[0], err


def test_offline_needs_manifests() -> None:
    code, _, err = run_trace("--src", "10.1.0.50", "--dst", "10.96.0.10:80")
    assert code == 2 and "-f PATH" in err


# ---------------------------------------------------------------------------------------------
# reasons, in Service terms
# ---------------------------------------------------------------------------------------------


def _reasons(svc: ServicePort, eps: tuple[Endpoint, ...], src: str, dst: str, node: NodeContext) -> str:
    state = ClusterState({svc.name: svc}, {svc.name: eps})
    return "\n".join(explain(state, node, parse_packet(src, dst), frozenset(node.node_ips)))


HINTED = ServicePort(ServicePortName("ns", "web", "http"), 80, 8080, cluster_ips=("10.96.0.10",))


def test_reasons_tell_which_hints_were_used_or_ignored_and_why() -> None:
    node = NodeContext(hostname="node-a", zone="z1")
    eps = tuple(Endpoint(f"10.1.0.{i}", 8080, zone_hints=frozenset({zone})) for i, zone in ((1, "z1"), (2, "z2")))
    used = _reasons(HINTED, eps, "10.1.0.9", "10.96.0.10:80", node)
    assert "topology hints used: only the endpoints hinted for zone z1" in used
    assert "10.1.0.2:8080 left out: topology hints (hinted for z2)" in used
    half = (eps[0], Endpoint("10.1.0.3", 8080))
    assert "topology hints ignored: 10.1.0.3:8080 has none" in _reasons(HINTED, half, "10.1.0.9", "10.96.0.10:80", node)
    no_zone = NodeContext(hostname="node-a")
    assert "this node has no zone" in _reasons(HINTED, eps, "10.1.0.9", "10.96.0.10:80", no_zone)


def test_reasons_tell_why_endpoints_were_left_out() -> None:
    node = NodeContext(hostname="node-a")
    eps = (Endpoint("10.1.0.1", 8080), Endpoint("10.1.0.2", 8080, ready=False, serving=True, terminating=True),
           Endpoint("10.1.0.3", 8080, ready=False, serving=False))
    text = _reasons(HINTED, eps, "10.1.0.9", "10.96.0.10:80", node)
    assert "1 of 3 endpoints used" in text
    assert "10.1.0.2:8080 left out: terminating (ready endpoints take new connections)" in text
    assert "10.1.0.3:8080 left out: not ready" in text


# ---------------------------------------------------------------------------------------------
# the two layouts agree
# ---------------------------------------------------------------------------------------------

NODE = NodeContext(hostname="node-a", node_ips=("192.168.100.1",), cluster_cidrs=("10.1.0.0/16",),
                   service_cidrs=("10.96.0.0/16",))
LOCAL = frozenset(NODE.node_ips)
POD_IPS = ("10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.1.1")
SOURCES = ("10.1.0.1", "10.1.0.9", "192.168.100.1", "127.0.0.1", "192.168.100.2", "198.51.100.7")
LB_IPS = ("203.0.113.1", "203.0.113.2")


@st.composite
def endpoint_sets(draw: st.DrawFn) -> tuple[Endpoint, ...]:
    found = {}
    for ip in draw(st.lists(st.sampled_from(POD_IPS), max_size=4, unique=True)):
        ready = draw(st.booleans())
        terminating = not ready and draw(st.booleans())
        found[ip] = Endpoint(ip, 8080, ready=ready, serving=ready or draw(st.booleans()), terminating=terminating,
                             node_name=draw(st.sampled_from(["node-a", "node-b", None])),
                             zone_hints=frozenset(draw(st.sampled_from([(), ("z1",), ("z2",)]))))
    return tuple(sorted(found.values(), key=lambda e: e.address))


@st.composite
def clusters(draw: st.DrawFn) -> ClusterState:
    """Up to three services: ClusterIP, NodePort or LoadBalancer, any policy, any endpoints."""
    services, endpoints = {}, {}
    for i in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]))
        name = ServicePortName("ns", f"s{i}", "p", draw(st.sampled_from([Protocol.TCP, Protocol.UDP])))
        services[name] = ServicePort(
            name=name, port=80, target_port=8080, service_type=kind, cluster_ips=(f"10.96.0.{10 + i}",),
            node_port=30000 + i if kind != "ClusterIP" else None,
            external_ips=(f"198.18.0.{i + 1}",) if draw(st.booleans()) else (),
            load_balancer_ips=(LB_IPS[i],) if kind == "LoadBalancer" and i < len(LB_IPS) else (),
            load_balancer_source_ranges=draw(st.sampled_from([(), ("192.168.100.0/30",), ("10.1.0.0/16",)])),
            external_traffic_policy=draw(st.sampled_from(list(Policy))) if kind != "ClusterIP" else Policy.CLUSTER,
            internal_traffic_policy=draw(st.sampled_from(list(Policy))),
        )
        endpoints[name] = draw(endpoint_sets())
    return ClusterState(services, endpoints)


@st.composite
def packets(draw: st.DrawFn, state: ClusterState) -> tuple[str, str, str]:
    svc = draw(st.sampled_from(list(state.services.values())))
    port = draw(st.sampled_from([svc.port, 81]))
    addresses = [(ip, port) for ip in (*svc.cluster_ips, *svc.external_ips, *svc.load_balancer_ips)]
    if svc.node_port:
        addresses.append(("192.168.100.1", svc.node_port))
    addresses.append(("10.96.5.5", 80))  # unallocated
    ip, number = draw(st.sampled_from(addresses))
    return draw(st.sampled_from(SOURCES)), f"{ip}:{number}", svc.protocol.lowercase


def _traced(mode: str, state: ClusterState, node: NodeContext, src: str, dst: str, proto: str) -> Trace:
    packet = parse_packet(src, dst, proto)
    return trace(make_proxier(ProxySettings(mode, node)).trace_program(state, IPFamily.V4, LOCAL), packet, LOCAL)


def assert_agree(a: Trace, b: Trace, unknowable: frozenset[str] = frozenset()) -> None:
    """Same verdict, endpoints, probabilities and masquerade; for the `unknowable` endpoints'
    hairpin the layouts may differ (see `elsewhere_hairpin`)."""
    assert a.verdict == b.verdict
    assert [e.address for e in a.endpoints] == [e.address for e in b.endpoints]
    assert all(abs(x.probability - y.probability) < 1e-9 for x, y in zip(a.endpoints, b.endpoints, strict=True))
    assert a.masqueraded_endpoints - unknowable == b.masqueraded_endpoints - unknowable
    if not unknowable:
        assert a.masquerade == b.masquerade


def elsewhere_hairpin(state: ClusterState, node: NodeContext, src: str) -> frozenset[str]:
    """Endpoints that are the client itself but run on another node: a pod's packets to a service
    are DNATed on its own node, so whether this node would masquerade them is moot (iptables
    marks every endpoint's hairpin, nftables only this node's and those of unknown node)."""
    return frozenset(ep.address for eps in state.endpoints.values() for ep in eps
                     if ep.ip == src and ep.node_name not in (None, node.hostname))


def known_difference(ipt: Trace, nft: Trace, src: str) -> str | None:
    """Where the two layouts really differ (kube-proxy's iptables and nftables modes do too),
    which one, else None. Found by this property; the kernel suite shows the same."""
    elements = {step.map for step in nft.path if step.map}
    pair = (ipt.verdict, nft.verdict)
    if pair in (("none", "reject"), ("none", "drop")) and not ipt.endpoints:
        # iptables has no cluster-ips-check (a port no service has, an unallocated service IP),
        # and no KUBE-EXTERNAL-SERVICES in OUTPUT (the node to an external IP without endpoints).
        return "nftables decides where iptables has no rule"
    if pair == ("reject", "drop") and "firewall-ips" in elements:
        return "source ranges are checked before the no-endpoints reject in nftables"
    if pair == ("dnat", "drop") and is_local(src, LOCAL) and "no-endpoint-services" in elements:
        return "the node to an external IP of a Local service without local endpoints: nftables drops in output"
    return None


@settings(max_examples=300, deadline=None)
@given(st.data(), clusters(), st.sampled_from([None, "z1"]), st.booleans())
def test_iptables_and_nftables_traces_agree(data: st.DataObject, state: ClusterState, zone: str | None,
                                            masquerade_all: bool) -> None:
    node = NodeContext(**{**vars(NODE), "zone": zone, "masquerade_all": masquerade_all})
    src, dst, proto = data.draw(packets(state))
    ipt = _traced("iptables", state, node, src, dst, proto)
    nft = _traced("nftables", state, node, src, dst, proto)
    if ipt.verdict != nft.verdict and known_difference(ipt, nft, src):
        return
    assert_agree(ipt, nft, elsewhere_hairpin(state, node, src))


@settings(max_examples=100, deadline=None)
@given(st.data(), clusters())
def test_iptables_save_spelling_traces_the_same(data: st.DataObject, state: ClusterState) -> None:
    """The rules as `iptables-save` prints them (canonical spelling, probabilities as stored)
    trace like the compiler's: what `--live` reads on a node, ours or kube-proxy's."""
    src, dst, proto = data.draw(packets(state))
    compiled = state_from_ruleset(compile_ruleset(state, NODE, IPFamily.V4))
    saved = KernelState(IPFamily.V4, {
        name: KernelTable.of(name, (KernelChain(c.name, tuple(canonical(r) for r in c.rules), c.policy)
                                    for c in table.chains.values()))
        for name, table in compiled.tables.items()
    })
    packet = parse_packet(src, dst, proto)
    ours = trace(iptables_program(compiled, LOCAL), packet, LOCAL)
    theirs = trace(iptables_program(saved, LOCAL), packet, LOCAL)
    assert ours.verdict == theirs.verdict and ours.masquerade == theirs.masquerade
    assert [e.address for e in ours.endpoints] == [e.address for e in theirs.endpoints]
    # iptables-save prints what the kernel stores: p rounded to 1/2^31, so 1e-9 per choice.
    assert all(abs(x.probability - y.probability) < 1e-8 for x, y in zip(ours.endpoints, theirs.endpoints, strict=True))


def test_render_restore_rules_are_what_the_walk_reads() -> None:
    """`state_from_ruleset` holds exactly the rules `dump` prints (built-in jumps included)."""
    state = ClusterState({}, {})
    ruleset = compile_ruleset(state, NODE, IPFamily.V4)
    restore = render_restore(ruleset)
    walked = state_from_ruleset(ruleset)
    for table in walked.tables.values():
        for chain in table.chains.values():
            for rule in chain.rules:
                assert rule in restore


def test_nft_rules_outside_the_grammar_are_refused_not_guessed() -> None:
    with pytest.raises(NotUnderstood):
        parse_nft_rule("iifname eth0 accept")
    assert parse_nft_rule("ip daddr . meta l4proto . th dport vmap @service-ips").statement == ("vmap", "@service-ips")


if __name__ == "__main__":
    for mode in MODES:
        (GOLDEN / f"trace-every-type.{mode}.txt").write_text(golden_text(mode))
        (GOLDEN / f"trace-every-type.{mode}.json").write_text(golden_json(mode))
        print(f"wrote trace-every-type.{mode}.txt, .json")
