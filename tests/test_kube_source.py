"""The Kubernetes source against a list/watch test server, with the real official client."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from kproxy_nft.agent.changes import PREPARE, ChangeTracker
from kproxy_nft.sources.events import Change, Replace
from kproxy_nft.sources.kube import Reflector, list_functions
from tests.fake_apiserver import FakeAPIServer


def service(name: str, ip: str) -> dict:  # type: ignore[type-arg]
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]}}


def endpoint_slice(name: str, service_name: str, ips: list[str]) -> dict:  # type: ignore[type-arg]
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [ip]} for ip in ips]}


class Harness:
    """Reflectors (by default for Services and EndpointSlices) feeding one queue, drained into a
    tracker on demand, each item also kept in `seen`; running while the harness is entered."""

    def __init__(self, api: FakeAPIServer, resources: tuple[str, ...] = ("services", "endpointslices"),
                 prepared: bool = False, **options: Any) -> None:
        cfg = client.Configuration(host=api.url)
        self.api = api
        self.api_client = client.ApiClient(cfg)
        self.events: queue.Queue[Replace | Change] = queue.Queue()
        self.seen: list[Replace | Change] = []
        self.stop = threading.Event()
        self.tracker = ChangeTracker()
        options = {"watch_timeout": 2, "initial_backoff": 0.05, "jitter": lambda: 0.0, **options}
        # `prepared`: as the agent runs them, converting each object on the reflector's thread.
        self.reflectors = [Reflector(name, fn, self.events.put, self.stop,
                                     **{"prepare": PREPARE.get(name) if prepared else None, **options})
                           for name, fn in list_functions(self.api_client).items() if name in resources]
        self.threads = [threading.Thread(target=r.run, daemon=True) for r in self.reflectors]

    def __enter__(self) -> Harness:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.api.drop_watches()
        for t in self.threads:
            t.join(timeout=5)

    def drain(self) -> None:
        while True:
            try:
                item = self.events.get_nowait()
            except queue.Empty:
                return
            self.seen.append(item)
            apply_to(self.tracker, item)

    def wait_for(self, predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.drain()
            if predicate():
                return
            time.sleep(0.02)
        raise AssertionError("condition not reached")

    def ips(self, name: str) -> list[str]:
        state = self.tracker.snapshot().state
        for port, eps in state.endpoints.items():
            if port.name == name:
                return [ep.ip for ep in eps]
        return []


def apply_to(tracker: ChangeTracker, item: Replace | Change) -> None:
    if isinstance(item, Replace):
        if item.resource == "services":
            tracker.replace_services(list(item.items))
        else:
            tracker.replace_slices(list(item.items))
    elif item.resource == "services":
        (tracker.service_deleted if item.type == "DELETED" else tracker.service_updated)(item.obj)
    else:
        (tracker.slice_deleted if item.type == "DELETED" else tracker.slice_updated)(item.obj)


@pytest.fixture(params=["raw", "prepared"])
def harness(request: pytest.FixtureRequest) -> Iterator[tuple[FakeAPIServer, Harness]]:
    with FakeAPIServer() as api:
        api.apply("services", service("web", "10.96.0.10"))
        api.apply("endpointslices", endpoint_slice("web-1", "web", ["10.1.0.1"]))
        with Harness(api, prepared=request.param == "prepared") as h:
            yield api, h


def test_initial_list_then_watch_events(harness: tuple[FakeAPIServer, Harness]) -> None:
    api, h = harness
    h.wait_for(lambda: all(r.synced.is_set() for r in h.reflectors))
    h.wait_for(lambda: h.ips("web") == ["10.1.0.1"])
    api.apply("endpointslices", endpoint_slice("web-1", "web", ["10.1.0.1", "10.1.0.2"]))
    h.wait_for(lambda: h.ips("web") == ["10.1.0.1", "10.1.0.2"])
    api.delete("endpointslices", "default", "web-1")
    h.wait_for(lambda: h.ips("web") == [])
    assert any("watch=true" in r and "allowWatchBookmarks=true" in r for r in api.requests)


def test_dropped_stream_relists_and_catches_up(harness: tuple[FakeAPIServer, Harness]) -> None:
    api, h = harness
    h.wait_for(lambda: h.ips("web") == ["10.1.0.1"])
    relists = sum(r.relists for r in h.reflectors)
    api.drop_watches(once_open=2)  # both streams, once both are watching
    api.apply("endpointslices", endpoint_slice("web-1", "web", ["10.1.0.3"]))
    h.wait_for(lambda: sum(r.relists for r in h.reflectors) >= relists + 2)  # both streams were cut
    h.wait_for(lambda: h.ips("web") == ["10.1.0.3"])


def test_gone_resource_version_relists(harness: tuple[FakeAPIServer, Harness]) -> None:
    api, h = harness
    h.wait_for(lambda: h.ips("web") == ["10.1.0.1"])
    # Once both are watching: a reflector still between its list and its watch would resume
    # from the current version, which compacting keeps, and never relist.
    api.compact(once_open=2)  # the next watch resumes from a version the server has forgotten: 410
    api.apply("services", service("db", "10.96.0.11"))
    api.apply("endpointslices", endpoint_slice("db-1", "db", ["10.1.0.9"]))
    h.wait_for(lambda: h.ips("db") == ["10.1.0.9"])
    h.wait_for(lambda: h.reflectors[1].relists >= 2)


def test_only_this_nodes_node_object_is_listed_and_watched() -> None:
    from kproxy_nft.convert import convert_node

    def node(name: str, ip: str) -> dict[str, object]:
        return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {}},
                "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}

    with FakeAPIServer() as api:
        api.apply("nodes", node("node1", "10.0.0.1"))
        api.apply("nodes", node("node2", "10.0.0.2"))
        seen: list[Replace | Change] = []
        stop = threading.Event()
        fns = list_functions(client.ApiClient(client.Configuration(host=api.url)), "node1")
        reflector = Reflector("nodes", fns["nodes"], seen.append, stop, watch_timeout=2, initial_backoff=0.05)
        thread = threading.Thread(target=reflector.run, daemon=True)
        thread.start()
        try:
            assert reflector.synced.wait(10)
            deadline = time.monotonic() + 10
            api.apply("nodes", node("node2", "10.0.0.22"))
            api.apply("nodes", node("node1", "10.0.0.11"))
            while time.monotonic() < deadline and not any(isinstance(i, Change) for i in seen):
                time.sleep(0.02)
        finally:
            stop.set()
            api.drop_watches()
            thread.join(timeout=5)
    listed = next(i for i in seen if isinstance(i, Replace))
    assert [convert_node(n).ips for n in listed.items] == [("10.0.0.1",)]
    changes = [convert_node(i.obj).ips for i in seen if isinstance(i, Change)]
    assert changes == [("10.0.0.11",)]  # node2's change never arrives
