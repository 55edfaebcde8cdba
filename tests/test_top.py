"""Connection counters, pure: listings recorded from a kernel → per service port → per endpoint, rates.

tests/counters_recorded/ holds what tests/kernel/test_counters.py read after 40 connections from
testpod to the seed's 10.101.181.214:8080 (`nft list map … backends-*`, `iptables-save -c -t nat`
of iptables-nft and iptables-legacy). The same parsers must also keep counters out of what the
planner compares: counted elements are not drift, and a full plan does not re-add (reset) them.
"""

from __future__ import annotations

import json

import pytest

from kproxy_nft.compile.nftables import TABLE, backends_map, compile_all
from kproxy_nft.kernel.iptables_text import cluster_ip_frontends, dnat_counters
from kproxy_nft.kernel.nftables_fake import FakeNftables
from kproxy_nft.kernel.nftables_plan import Applied, plan_full
from kproxy_nft.kernel.nftables_text import parse_counted_listing, table_from_listing
from kproxy_nft.model import ClusterState, Endpoint, NodeContext, Protocol, ServicePort, ServicePortName
from kproxy_nft.top import EndpointCount, Sample, ServicePortCount, from_iptables, from_nftables, with_rates
from tests.helpers import ROOT

RECORDED = ROOT / "tests" / "counters_recorded"
SEED = "10.101.181.214:8080/tcp"
# The 40 connections' random spread in each recording.
SEED_COUNTS = {"10.1.0.47:80": 14, "10.1.0.48:80": 12, "10.1.0.49:80": 14}
IPTABLES_COUNTS = {"nft": {"10.1.0.49:80": 12, "10.1.0.47:80": 13, "10.1.0.48:80": 15},
                   "legacy": {"10.1.0.49:80": 12, "10.1.0.47:80": 13, "10.1.0.48:80": 15}}


def recorded(prefix: str) -> list[str]:
    return [p.read_text() for p in sorted(RECORDED.glob(f"{prefix}-*.txt"))]


def test_nftables_elements_give_each_endpoint_of_each_cluster_ip_its_count() -> None:
    services = {svc.frontend: svc for svc in from_nftables(recorded("nftables-nft"))}
    assert set(services) == {SEED, "10.102.199.133:8080/tcp", "10.102.199.133:8443/tcp"}
    assert {ep.address: ep.connections for ep in services[SEED].endpoints} == SEED_COUNTS
    assert services[SEED].service is None  # the elements carry no name
    assert services["10.102.199.133:8443/tcp"].connections == 0


@pytest.mark.parametrize("backend", ["nft", "legacy"])
def test_iptables_sep_dnat_rules_give_the_same_counts_with_the_service_names(backend: str) -> None:
    services = {svc.frontend: svc for svc in from_iptables(recorded(f"iptables-{backend}"))}
    assert {ep.address: ep.connections for ep in services[SEED].endpoints} == IPTABLES_COUNTS[backend]
    assert services[SEED].service == "default/sample-clusterip:http-port"
    assert services[SEED].label == f"default/sample-clusterip:http-port {SEED}"


def test_iptables_parsing_finds_ipv6_frontends_and_ignores_other_rules() -> None:
    save = "\n".join([
        "*nat",
        ':KUBE-SERVICES - [0:0]',
        ':KUBE-SEP-A - [0:0]',
        '[0:0] -A KUBE-SERVICES -d fd00:96::20/128 -p tcp -m comment --comment "demo/dual:http cluster IP" '
        '-m tcp --dport 80 -j KUBE-SVC-X',
        '[3:180] -A KUBE-SEP-A -s fd00:10:1::47/128 -m comment --comment demo/dual:http -j KUBE-MARK-MASQ',
        '[7:560] -A KUBE-SEP-A -p tcp -m comment --comment demo/dual:http -m tcp -j DNAT '
        '--to-destination [fd00:10:1::47]:8080',
        "COMMIT",
    ])
    assert cluster_ip_frontends(save) == {"demo/dual:http": "[fd00:96::20]:80/tcp"}
    (rule,) = dnat_counters(save)
    assert (rule.chain, rule.service, rule.destination, rule.packets) == (
        "KUBE-SEP-A", "demo/dual:http", "[fd00:10:1::47]:8080", 7)


def test_rates_between_two_samples_restart_a_counter_that_went_down() -> None:
    def sample(at: float, a: int, b: int) -> Sample:
        eps = (EndpointCount("10.1.0.1:80", a), EndpointCount("10.1.0.2:80", b))
        return Sample("nftables", at, (ServicePortCount("10.96.0.1:80/tcp", None, eps),))

    first = with_rates(None, sample(10.0, 100, 50))
    assert first.services[0].rate is None and first.interval is None
    later = with_rates(sample(10.0, 100, 50), sample(12.0, 110, 4))  # b was recreated: 4 since
    (svc,) = later.services
    assert [ep.rate for ep in svc.endpoints] == [5.0, 2.0] and svc.rate == 7.0 and later.interval == 2.0
    assert svc.shares() == [("10.1.0.1:80", 5 / 7), ("10.1.0.2:80", 2 / 7)]
    assert first.services[0].shares() == [("10.1.0.1:80", 100 / 150), ("10.1.0.2:80", 50 / 150)]


def test_the_json_sample_is_the_documented_schema() -> None:
    sample = Sample("nftables", 1700000000.0, from_nftables(recorded("nftables-nft")))
    doc = json.loads(json.dumps(sample.as_dict()))
    assert set(doc) == {"mode", "time", "interval", "services"}
    (seed,) = [s for s in doc["services"] if s["frontend"] == SEED]
    assert seed == {"service": None, "frontend": SEED, "connections": 40, "rate": None,
                    "endpoints": [{"address": a, "connections": n, "rate": None} for a, n in SEED_COUNTS.items()]}
    assert sample.by_rate()[0].frontend == SEED  # the busiest first (no rates yet: by count)


def _node_with_one_service() -> tuple[ClusterState, NodeContext]:
    name = ServicePortName("default", "web", "http")
    svc = ServicePort(name=name, port=80, target_port=8080, cluster_ips=("10.96.0.10",))
    endpoints = (Endpoint("10.1.0.1", 8080), Endpoint("10.1.0.2", 8080))
    return ClusterState({name: svc}, {name: endpoints}), NodeContext(hostname="n", cluster_cidrs=("10.1.0.0/16",))


def test_counted_elements_are_not_drift_and_a_full_plan_keeps_them() -> None:
    state, node = _node_with_one_service()
    desired = compile_all(state, node)
    fake = FakeNftables()
    empty = plan_full({}, desired, None)
    fake.apply(empty.text)
    for index in (0, 1):
        fake.count("ip", TABLE, backends_map(Protocol.TCP), f"10.96.0.10 . 80 . {index}", packets=5 + index)
    listing = fake.listing("ip", TABLE)
    assert "10.96.0.10 . 80 . 1 counter packets 6 bytes 0 : 10.1.0.2 . 8080" in listing
    kernel = {"ip": table_from_listing("ip", listing), "ip6": table_from_listing("ip6", fake.listing("ip6", TABLE))}
    applied = {r.nft_family: Applied.of(r) for r in desired}
    again = plan_full(kernel, desired, applied)
    assert again.is_empty and again.summary.drift == 0 and again.summary.elements_added == 0
    assert kernel["ip"].elements[backends_map(Protocol.TCP)]["10.96.0.10 . 80 . 0"] == "10.1.0.1 . 8080"
    counted = {m.name: m for m in parse_counted_listing(listing)}[backends_map(Protocol.TCP)]
    assert counted.family == "ip"
    assert [(e.key, e.value, e.packets) for e in counted.elements] == [
        ("10.96.0.10 . 80 . 0", "10.1.0.1 . 8080", 5), ("10.96.0.10 . 80 . 1", "10.1.0.2 . 8080", 6)]


def test_the_live_view_draws_a_bar_per_endpoint_busiest_first() -> None:
    from rich.console import Console

    from kproxy_nft.top.view import sample_view

    (save,) = recorded("iptables-nft")
    # Two seconds later: one more connection to 10.1.0.47, and 10.1.0.48's rule recreated (4 since).
    later = save.replace("[13:780] -A KUBE-SEP-P3XROEENKRGGIBLH", "[14:840] -A KUBE-SEP-P3XROEENKRGGIBLH").replace(
        "[15:900] -A KUBE-SEP-PBPEDKAQGZGBR6PZ", "[4:240] -A KUBE-SEP-PBPEDKAQGZGBR6PZ")
    before = Sample("iptables", 100.0, from_iptables([save]))
    after = with_rates(before, Sample("iptables", 102.0, from_iptables([later])))
    console = Console(width=140, record=True)
    console.print(sample_view(after, limit=2))
    text = console.export_text()
    assert "rates over 2.0 s" in text and "default/sample-clusterip:http-port 10.101.181.214:8080/tcp" in text
    assert "█" in text and text.count("10.1.0.4") == 6  # two service ports (--limit 2) of three endpoints
    assert "0.5/s" in text  # 10.1.0.47: 13 → 14 over 2 s
    assert "2.0/s" in text  # 10.1.0.48: 15 → 4, a restarted counter: 4 over 2 s
    assert text.index("sample-clusterip:http-port") < text.index("sample-clusterip-multi")  # the busy one first


def test_top_without_root_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from kproxy_nft.cli import main

    monkeypatch.setattr("kproxy_nft.top_command.os.geteuid", lambda: 1000)
    result = CliRunner().invoke(main, ["top", "--once", "-o", "json"])
    assert result.exit_code == 2
    assert result.stderr == "kproxy-nft: error: top reads the kernel's rules and counters: run it as root\n"


def test_the_live_view_redraws_with_rates_until_ctrl_c(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from kproxy_nft.cli import main

    (save,) = recorded("iptables-nft")
    later = save.replace("[13:780] -A KUBE-SEP-P3XROEENKRGGIBLH", "[33:1980] -A KUBE-SEP-P3XROEENKRGGIBLH")
    reads = iter([[save], [later]])
    clock = iter([100.0, 102.0])
    sleeps = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) > 1:
            raise KeyboardInterrupt  # the second redraw is not waited for: Ctrl-C

    monkeypatch.setattr("kproxy_nft.top_command.os.geteuid", lambda: 0)

    class Counted:  # the iptables proxier's counters, without a kernel
        def connection_counts(self) -> Sample:
            import time

            return Sample("iptables", time.time(), from_iptables(next(reads)))

        def close(self) -> None:
            pass

    monkeypatch.setattr("kproxy_nft.top_command.make_proxier", lambda settings, netns: Counted())
    monkeypatch.setattr("kproxy_nft.top_command.time.time", lambda: next(clock))
    monkeypatch.setattr("kproxy_nft.top_command.time.sleep", sleep)
    result = CliRunner().invoke(main, ["top", "--proxy-mode", "iptables", "--interval", "2"], terminal_width=140)
    assert result.exit_code == 0, result.output
    assert sleeps == [2.0, 2.0]
    assert "rates over 2.0 s" in result.output and "10.0/s" in result.output  # 13 → 33 over 2 s
