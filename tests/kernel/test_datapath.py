"""Real packets through both backends: the seed scenario and kube-proxy's ClusterIP behaviour.

A netlab (node namespace + pod and client namespaces, all `kpn-<id>-*`, removed afterwards)
runs the seed's three pods. Each behaviour test runs three times, through the `program`
fixture: iptables rules via iptables-nft and via iptables-legacy (the reconcile backend), and
the nftables backend in-process through libnftables (the seed is replayed through `nft` too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import pytest

from kproxy_nft.compile.nftables import compile_all
from kproxy_nft.kernel import iptables as iptables_kernel
from kproxy_nft.kernel.nftables import NftablesBackend
from kproxy_nft.lab import NODE, ClientSpec, Lab, PodSpec
from kproxy_nft.model import ClusterState, Endpoint, NodeContext, Protocol, ServicePort, ServicePortName, TrafficPolicy
from kproxy_nft.sources.manifests import read_manifests
from tests.helpers import EXAMPLES
from tests.kernel.conftest import iptables_apply, serving_lab
from tests.kernel.tracecheck import mode_under_test, traced_probe

pytestmark = pytest.mark.kernel

SEED_NODE = NodeContext(hostname="docker-desktop", cluster_cidrs=("10.1.0.0/16",))
SEED_PODS = {"pod1": "10.1.0.47", "pod2": "10.1.0.48", "pod3": "10.1.0.49"}
PODS = (
    *(PodSpec(name, ip, tcp_ports=(80, 443), udp_ports=(53,)) for name, ip in SEED_PODS.items()),
    PodSpec("only80", "10.1.0.60", tcp_ports=(80,)),
)
CLIENTS = (ClientSpec("testpod", "10.1.0.50"), ClientSpec("ext", "192.168.100.2"))
VIP = "10.101.181.214"
MULTI_VIP = "10.102.199.133"
CHI2_P001_DF2 = 13.816  # χ² critical value, 2 degrees of freedom, p = 0.001


def seed() -> ClusterState:
    return read_manifests([str(EXAMPLES)]).cluster_state()


def name(svc: str, port: str = "http") -> ServicePortName:
    return ServicePortName("test", svc, port)


def port(svc: str, ip: str, number: int, **kw: object) -> ServicePort:
    return ServicePort(name=name(svc), port=number, target_port=80, cluster_ips=(ip,), **kw)  # type: ignore[arg-type]


def with_services(base: ClusterState, extra: dict[ServicePort, tuple[Endpoint, ...]]) -> ClusterState:
    return ClusterState(
        {**base.services, **{s.name: s for s in extra}},
        {**base.endpoints, **{s.name: eps for s, eps in extra.items()}},
    )


def chi2(counts: dict[str, int], total: int, k: int) -> float:
    expected = total / k
    observed = [counts.get(p, 0) for p in SEED_PODS]
    return sum((o - expected) ** 2 / expected for o in observed)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with serving_lab(PODS, CLIENTS) as the_lab:
        yield the_lab


Program = Callable[[ClusterState, NodeContext], None]


@pytest.fixture(params=["iptables-nft", "iptables-legacy", "nftables"])
def program(request: pytest.FixtureRequest, lab: Lab) -> Iterator[Program]:
    """Make the node namespace hold a state's rules, with the mode under test; clean up after."""
    if request.param == "nftables":
        with NftablesBackend(lab.node_ns) as nft:
            yield lambda state, node: nft.sync(compile_all(state, node)) and None
            nft.cleanup()
        return
    backend = request.param.split("-")[1]
    yield lambda state, node: iptables_apply(lab.node_ns, backend, state, node)
    iptables_kernel.cleanup(iptables_kernel.open_host(backend, netns=lab.node_ns))


@pytest.fixture
def backend(lab: Lab) -> Iterator[NftablesBackend]:
    with NftablesBackend(lab.node_ns) as b:
        assert b.transport.name == "libnftables"
        yield b
        b.cleanup()


@pytest.mark.parametrize("use_libnftables", [True, False], ids=["libnftables", "nft"])
def test_seed_random_balance_and_multi_port(lab: Lab, use_libnftables: bool) -> None:
    with NftablesBackend(lab.node_ns, use_libnftables=use_libnftables) as backend:
        try:
            backend.full_sync(compile_all(seed(), SEED_NODE))
            res = lab.probe("testpod", VIP, 8080, count=300)
            assert res.ok, res.summary()
            assert chi2(res.counts(), 300, 3) < CHI2_P001_DF2, res.summary()
            for svc_port in (8080, 8443):
                res = lab.probe("testpod", MULTI_VIP, svc_port, count=30)
                assert res.ok and set(res.counts()) == set(SEED_PODS), res.summary()
        finally:
            backend.cleanup()


def test_target_port_mapping(lab: Lab, program: Program) -> None:
    """8080 → 80 and 8443 → 443 on a pod that only listens on 80: the second is refused by the pod."""
    only80 = (Endpoint("10.1.0.60", 80),)
    http = port("mp", "10.96.0.40", 8080)
    https = dataclasses.replace(http, name=name("mp", "https"), port=8443, target_port=443)
    state = ClusterState(
        {http.name: http, https.name: https}, {http.name: only80, https.name: (Endpoint("10.1.0.60", 443),)}
    )
    program(state, SEED_NODE)
    assert lab.probe("testpod", "10.96.0.40", 8080, count=3).counts() == {"only80": 3}
    assert lab.probe("testpod", "10.96.0.40", 8443, count=3).error_counts() == {"refused": 3}


def test_masquerade_outside_cluster_only(lab: Lab, request: pytest.FixtureRequest, program: Program) -> None:
    mode = mode_under_test(request)  # the trace reads this mode's rules
    program(seed(), SEED_NODE)
    res = traced_probe(lab, mode, "ext", VIP, 8080, count=10)
    assert res.ok and res.seen_ips() <= set(lab.node_ips), res.summary()
    res = traced_probe(lab, mode, "testpod", VIP, 8080, count=10)
    assert res.ok and res.seen_ips() == {"10.1.0.50"}
    res = traced_probe(lab, mode, NODE, VIP, 8080, count=5)  # locally generated: nat output
    assert res.ok, res.summary()

    program(seed(), dataclasses.replace(SEED_NODE, masquerade_all=True))
    res = traced_probe(lab, mode, "testpod", VIP, 8080, count=10)
    assert res.ok and res.seen_ips() <= set(lab.node_ips), res.summary()


def test_hairpin_is_masqueraded(lab: Lab, request: pytest.FixtureRequest, program: Program) -> None:
    mode = mode_under_test(request)  # the trace reads this mode's rules
    program(seed(), SEED_NODE)
    res = traced_probe(lab, mode, "pod1", VIP, 8080, count=60)
    assert res.ok, res.summary()
    for attempt in res.attempts:
        if attempt.pod == "pod1":
            assert attempt.seen_ip in lab.node_ips  # reached itself: masqueraded
        else:
            assert attempt.seen_ip == "10.1.0.47"  # other pods see the client pod
    assert res.counts().get("pod1", 0) > 0


def test_no_endpoints_refused_at_once_and_local_policy_drops(
    lab: Lab, request: pytest.FixtureRequest, program: Program
) -> None:
    mode = mode_under_test(request)  # the trace reads this mode's rules
    empty = port("empty", "10.96.0.50", 80)
    udp = dataclasses.replace(port("dns", "10.96.0.51", 53), name=ServicePortName("test", "dns", "dns", Protocol.UDP))
    elsewhere = port("remote", "10.96.0.52", 80, internal_traffic_policy=TrafficPolicy.LOCAL)
    state = with_services(seed(), {empty: (), udp: (), elsewhere: (Endpoint("10.1.0.47", 80, node_name="other"),)})
    program(state, SEED_NODE)
    for client in ("testpod", NODE):  # forward and output hooks
        res = traced_probe(lab, mode, client, "10.96.0.50", 80, count=3, timeout=2.0)
        assert res.error_counts() == {"refused": 3}, res.summary()
        assert max(a.elapsed for a in res.attempts) < 0.5
    res = traced_probe(lab, mode, "testpod", "10.96.0.51", 53, proto="udp", count=3, timeout=2.0)
    assert res.error_counts() == {"refused": 3}, res.summary()
    res = traced_probe(lab, mode, "testpod", "10.96.0.52", 80, count=1, timeout=0.5)
    assert res.error_counts() == {"timeout": 1}, res.summary()


def test_internal_traffic_policy_local_uses_local_endpoints(
    lab: Lab, request: pytest.FixtureRequest, program: Program
) -> None:
    mode = mode_under_test(request)  # the trace reads this mode's rules
    local = port("local", "10.96.0.53", 80, internal_traffic_policy=TrafficPolicy.LOCAL)
    eps = (Endpoint("10.1.0.47", 80, node_name="other"), Endpoint("10.1.0.48", 80, node_name="docker-desktop"))
    program(with_services(ClusterState(), {local: eps}), SEED_NODE)
    assert traced_probe(lab, mode, "testpod", "10.96.0.53", 80, count=20).counts() == {"pod2": 20}


def test_session_affinity_and_removal_of_stale_entries(lab: Lab, backend: NftablesBackend) -> None:
    sticky = port("sticky", "10.96.0.60", 80, session_affinity_seconds=600)
    eps = tuple(Endpoint(ip, 80) for ip in SEED_PODS.values())
    state = with_services(ClusterState(), {sticky: eps})
    backend.full_sync(compile_all(state, SEED_NODE))
    res = lab.probe("testpod", "10.96.0.60", 80, count=20)
    assert res.ok and len(res.counts()) == 1, res.summary()
    chosen = next(iter(res.counts()))
    res = lab.probe("ext", "10.96.0.60", 80, count=20)  # another client: its own (single) choice
    assert res.ok and len(res.counts()) == 1, res.summary()

    # The chosen pod leaves: its affinity entries are deleted in the same transaction.
    remaining = tuple(ep for ep in eps if ep.ip != SEED_PODS[chosen])
    plan = backend.plan(compile_all(with_services(ClusterState(), {sticky: remaining}), SEED_NODE))
    assert plan.summary.affinity_entries_deleted >= 1
    backend.apply(plan)
    res = lab.probe("testpod", "10.96.0.60", 80, count=20)
    assert res.ok and len(res.counts()) == 1 and chosen not in res.counts(), res.summary()


def test_seed_balance_multi_port_and_affinity_in_every_mode(lab: Lab, program: Program) -> None:
    """The seed (χ² over 300 fresh connections), 8080/8443, and ClientIP affinity per client."""
    program(seed(), SEED_NODE)
    res = lab.probe("testpod", VIP, 8080, count=300)
    assert res.ok and chi2(res.counts(), 300, 3) < CHI2_P001_DF2, res.summary()
    for svc_port in (8080, 8443):
        res = lab.probe("testpod", MULTI_VIP, svc_port, count=30)
        assert res.ok and set(res.counts()) == set(SEED_PODS), res.summary()
    sticky = port("sticky", "10.96.0.61", 80, session_affinity_seconds=600)
    program(with_services(seed(), {sticky: tuple(Endpoint(ip, 80) for ip in SEED_PODS.values())}), SEED_NODE)
    for client in ("testpod", "ext"):
        res = lab.probe(client, "10.96.0.61", 80, count=20)
        assert res.ok and len(res.counts()) == 1, res.summary()


def test_endpoint_churn_fails_no_connection(lab: Lab, program: Program) -> None:
    """100 syncs adding or removing one endpoint at a time (never empty) while fresh connections
    run in a loop: every connection lands on a live endpoint, none fails."""
    svc = port("churn", "10.96.0.70", 80)
    pods = [Endpoint(ip, 80) for ip in SEED_PODS.values()]
    current = list(pods)
    program(with_services(ClusterState(), {svc: tuple(current)}), SEED_NODE)
    # 3 s: a SYN lost to a transaction would be retransmitted after 1 s; record the slow ones too.
    loop = lab.start_probe_loop("testpod", "10.96.0.70", 80, timeout=3.0)
    try:
        for i in range(100):
            candidate = pods[i % 3]
            if candidate in current and len(current) > 1:
                current.remove(candidate)
            elif candidate not in current:
                current.append(candidate)
            program(with_services(ClusterState(), {svc: tuple(sorted(current, key=lambda e: e.address))}), SEED_NODE)
    finally:
        res = loop.stop()
    failed = [i for i, a in enumerate(res.attempts) if not a.ok]
    slow = [round(a.elapsed, 2) for a in res.attempts if a.elapsed > 0.9]
    assert len(res) > 100 and not failed, f"{res.summary()}; failed attempts {failed} of {len(res)}, slow {slow}"
