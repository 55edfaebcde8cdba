"""The agent end to end: the real client against the list/watch test server, rules in a netns."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from kubernetes import client

from kproxy_nft.agent.main import Agent
from kproxy_nft.agent.metrics import new_metrics
from kproxy_nft.model import NodeContext
from kproxy_nft.proxier import Proxier
from kproxy_nft.proxier.iptables import IptablesProxier
from kproxy_nft.proxier.nftables import NftablesProxier
from kproxy_nft.sources.kube import Reflector, list_functions
from tests.fake_apiserver import FakeAPIServer
from tests.helpers import wait_for
from tests.kernel.conftest import run_in
from tests.test_kube_source import endpoint_slice, service

pytestmark = pytest.mark.kernel
NODE = NodeContext(hostname="node1", cluster_cidrs=("10.1.0.0/16",))




class Running:
    def __init__(self, api: FakeAPIServer, backend: Proxier, resources: tuple[str, ...] = ("services",
                                                                                           "endpointslices")):
        self.agent = Agent(backend, new_metrics(), min_sync_period=0.1, sync_period=1.0)
        api_client = client.ApiClient(client.Configuration(host=api.url))
        fns = list_functions(api_client)
        self.threads = [threading.Thread(target=self.agent.run, daemon=True)] + [
            threading.Thread(target=Reflector(r, fns[r], self.agent.events.put, self.agent.stop, watch_timeout=2,
                                              initial_backoff=0.05).run, daemon=True)
            for r in resources
        ]
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.agent.stop.set()
        for t in self.threads:
            t.join(timeout=5)


@pytest.fixture
def api() -> Iterator[FakeAPIServer]:
    with FakeAPIServer() as server:
        server.apply("services", service("web", "10.96.0.10"))
        server.apply("endpointslices", endpoint_slice("web-1", "web", ["10.1.0.1", "10.1.0.2"]))
        yield server
        server.drop_watches()


def nat(netns: str) -> str:
    return run_in(netns, ["iptables-nft-save", "-t", "nat"]).stdout


def test_iptables_agent_follows_the_api_and_repairs_drift(api: FakeAPIServer, netns: str) -> None:
    running = Running(api, IptablesProxier(NODE, iptables_backend="nft", netns=netns))
    try:
        wait_for(lambda: "--to-destination 10.1.0.2:8080" in nat(netns))
        api.apply("endpointslices", endpoint_slice("web-1", "web", ["10.1.0.1", "10.1.0.3"]))
        wait_for(lambda: "10.1.0.3:8080" in nat(netns) and "10.1.0.2:8080" not in nat(netns))
        # Someone flushes our chain: the kernel's notification starts a check that puts it back.
        run_in(netns, ["iptables-nft", "-t", "nat", "-F", "KUBE-SERVICES"])
        wait_for(lambda: "-A KUBE-SERVICES" in nat(netns), timeout=5)
        wait_for(lambda: running.agent.metrics.registry.get_sample_value(
            "kproxy_nft_drift_repairs_total", {"what": "IPv4 nat", "noticed_by": "netlink"}) == 1.0)
        wait_for(lambda: not running.agent.scheduler.checking)  # the repair finished (IPv6 too)
    finally:
        running.stop()
    # Stopped: the rules stay; a restarted agent adopts them without changing anything.
    before = nat(netns)
    assert "10.1.0.3:8080" in before
    backend = IptablesProxier(NODE, iptables_backend="nft", netns=netns)
    assert "chains=0 jumps=0" in backend.sync(running.agent.tracker.snapshot().state, full=True)


def test_no_sync_before_both_resources_are_listed(api: FakeAPIServer, netns: str) -> None:
    running = Running(api, IptablesProxier(NODE, iptables_backend="nft", netns=netns), resources=("services",))
    try:
        wait_for(lambda: "services" in running.agent.listed)
        time.sleep(0.5)
        assert running.agent.syncs == 0 and "KUBE-SERVICES" not in nat(netns)
    finally:
        running.stop()


def test_nftables_agent_follows_the_api(api: FakeAPIServer, netns: str) -> None:
    running = Running(api, NftablesProxier(NODE, netns=netns))
    try:
        def ruleset() -> str:
            return run_in(netns, ["nft", "list", "table", "ip", "kproxy-nft"]).stdout

        wait_for(lambda: "10.1.0.2 . 8080" in ruleset())
        api.delete("endpointslices", "default", "web-1")
        wait_for(lambda: "10.1.0.2 . 8080" not in ruleset())
    finally:
        running.stop()


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_traffic_follows_the_api_survives_outage_and_restart(mode: str) -> None:
    """Slice change → traffic moves; API outage → last rules kept; agent restart → no dropped connection."""
    from kproxy_nft.lab import ClientSpec, Lab, PodSpec

    pods = [PodSpec("pod1", "10.1.0.47"), PodSpec("pod2", "10.1.0.48")]
    with FakeAPIServer() as api, Lab(pods, [ClientSpec("testpod", "10.1.0.50")]) as lab:
        lab.start_servers()
        api.apply("services", service("web", "10.96.0.10"))
        slice_for = {"pod1": endpoint_slice("web-1", "web", ["10.1.0.47"]),
                     "pod2": endpoint_slice("web-1", "web", ["10.1.0.48"])}
        for obj in slice_for.values():  # the test server speaks port 8080; our pods listen on 80
            obj["ports"][0]["port"] = 80
        api.apply("endpointslices", slice_for["pod1"])

        def backend() -> Proxier:
            if mode == "nftables":
                return NftablesProxier(NODE, netns=lab.node_ns)
            return IptablesProxier(NODE, iptables_backend="nft", netns=lab.node_ns)

        def answers() -> dict[str, int]:
            return lab.probe("testpod", "10.96.0.10", 80, count=5, timeout=0.5).counts()

        running = Running(api, backend())
        try:
            wait_for(lambda: answers() == {"pod1": 5})
            api.apply("endpointslices", slice_for["pod2"])
            wait_for(lambda: answers() == {"pod2": 5})
            api.drop_watches()
            api.oldest_watchable = 10**9  # every watch and relist now fails: an outage
            api.httpd.shutdown()
            time.sleep(0.5)
            assert answers() == {"pod2": 5}
        finally:
            running.stop()
        # Restart: the old agent is gone, a new one adopts the rules while connections keep going.
        with FakeAPIServer() as api2:
            api2.apply("services", service("web", "10.96.0.10"))
            api2.apply("endpointslices", slice_for["pod2"])
            loop = lab.start_probe_loop("testpod", "10.96.0.10", 80)
            restarted = Running(api2, backend())
            try:
                wait_for(lambda: restarted.agent.syncs >= 1)
            finally:
                restarted.stop()
                result = loop.stop()
            assert len(result) > 10 and not result.failures and set(result.counts()) == {"pod2"}, result.summary()
