"""`run --metrics-per-endpoint`'s collector: the kernel's per-endpoint counts as Prometheus series, read on scrape.

The reader is replaced by the listings tests/counters_recorded/ holds (see tests/test_top.py).
"""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kproxy_nft.agent.endpoint_metrics import EndpointConnections, SingleFlight
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


def test_scrapes_that_overlap_share_one_read() -> None:
    """A read takes seconds at 30,000 services: scrapes arriving meanwhile wait for it and report
    its counts; the next scrape after it reads afresh."""
    reads, release = [], threading.Event()

    def read() -> Sample:
        reads.append(1)
        release.wait(timeout=10)
        return Sample("nftables", 0.0, from_nftables(recorded("nftables-nft")))

    collector = EndpointConnections("nftables", read)
    results: list[dict[str, dict[tuple[tuple[str, str], ...], float]]] = []
    scrapers = [threading.Thread(target=lambda: results.append(scrape(collector))) for _ in range(3)]
    for scraper in scrapers:
        scraper.start()
    wait = threading.Event()
    while not reads:  # the first scrape is reading; give the others time to join it
        wait.wait(0.01)
    wait.wait(0.2)
    release.set()
    for scraper in scrapers:
        scraper.join(timeout=10)
    assert len(reads) == 1 and len(results) == 3
    assert results[0] == results[1] == results[2]
    assert results[0]["kproxy_nft_endpoint_counters_up"] == {(): 1.0}
    scrape(collector)
    assert len(reads) == 2


def test_a_failure_reaches_every_caller_that_shared_it() -> None:
    calls, release = [], threading.Event()

    def fail() -> int:
        calls.append(1)
        release.wait(timeout=10)
        raise CounterReadError("gone")

    flight: SingleFlight[int] = SingleFlight(fail)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            flight()
        except CounterReadError as e:
            errors.append(e)

    callers = [threading.Thread(target=call) for _ in range(2)]
    for caller in callers:
        caller.start()
    wait = threading.Event()
    while not calls:
        wait.wait(0.01)
    wait.wait(0.2)
    release.set()
    for caller in callers:
        caller.join(timeout=10)
    assert len(calls) == 1 and len(errors) == 2 and errors[0] is errors[1]
