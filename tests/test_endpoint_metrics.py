"""`run --metrics-per-endpoint`'s collector: the kernel's per-endpoint counts as Prometheus series, read on scrape.

The reader is replaced by the listings tests/counters_recorded/ holds (see tests/test_top.py).
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kproxy_nft.agent.endpoint_metrics import EndpointConnections
from kproxy_nft.kernel.counters import CounterReadError
from kproxy_nft.top import Sample, from_iptables, from_nftables
from tests.test_top import IPTABLES_COUNTS, SEED_COUNTS, recorded


def scrape(collector: EndpointConnections) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    registry = CollectorRegistry()
    registry.register(collector)
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.mark.parametrize(("mode", "prefix", "service", "expected"), [
    ("nftables", "nftables-nft", "", SEED_COUNTS),
    ("iptables", "iptables-nft", "default/sample-clusterip:http-port", IPTABLES_COUNTS["nft"]),
])
def test_each_endpoint_is_a_series_with_the_kernel_count(mode: str, prefix: str, service: str,
                                                         expected: dict[str, int]) -> None:
    reads = []

    def read() -> Sample:
        reads.append(mode)
        listings = recorded(prefix)
        return Sample(mode, 0.0, from_nftables(listings) if mode == "nftables" else from_iptables(listings))

    collector = EndpointConnections(mode, read)
    registry = CollectorRegistry()
    registry.register(collector)
    assert reads == []  # registering reads nothing; only a scrape does
    series = scrape(collector)["kproxy_nft_endpoint_new_connections_total"]
    seed = {dict(labels)["endpoint"]: value for labels, value in series.items()
            if dict(labels)["frontend"] == "10.101.181.214:8080/tcp"}
    assert seed == expected
    assert {dict(labels)["service_port"] for labels, _ in series.items()
            if dict(labels)["frontend"] == "10.101.181.214:8080/tcp"} == {service}
    assert reads == [mode]


def test_a_failed_read_is_up_0_and_no_series(caplog: pytest.LogCaptureFixture) -> None:
    def read() -> Sample:
        raise CounterReadError("nft: Operation not permitted")

    collector = EndpointConnections("nftables", read)
    got = scrape(collector)
    assert got["kproxy_nft_endpoint_counters_up"] == {(): 0.0}
    assert "kproxy_nft_endpoint_new_connections_total" not in got
    scrape(collector)
    assert caplog.text.count("cannot read the nftables counters") == 1  # logged once, not per scrape
