"""Services and EndpointSlices converted where they arrive (issue 14: the agent's memory).

The API's reflectors run `changes.PREPARE` on each object, a page at a time: a list's decoded
objects are dropped page by page instead of all being alive until the loop has converted the
whole list. The change tracker takes the prepared values or raw objects alike (it prepares
what it is handed; a prepared value prepares to itself): both must give the same state and the
same rejections, word for word.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from kubernetes import client

from kproxy_nft.agent.changes import (
    PREPARE,
    TRIGGER_TIME,
    ChangeTracker,
    PreparedService,
    PreparedSlice,
    prepare_service,
    prepare_slice,
)
from kproxy_nft.sources import slim
from kproxy_nft.sources.events import Change, Replace
from kproxy_nft.sources.kube import Reflector, list_functions
from tests.fake_apiserver import FakeAPIServer

SERVICE_KIND = ("v1", "Service")
SLICE_KIND = ("discovery.k8s.io/v1", "EndpointSlice")


def service_doc(name: str, ip: int, port: int = 80) -> dict[str, Any]:
    """A Service; `port` 70000 makes it invalid."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": f"10.96.0.{ip}", "ports": [{"name": "http", "port": port}]}}


def slice_doc(name: str, service: str | None, ips: list[str], trigger: str | None = None) -> dict[str, Any]:
    """An EndpointSlice of `service` (None: no service label); an address "not-an-ip" makes it invalid."""
    metadata: dict[str, Any] = {"name": name, "namespace": "default"}
    if service is not None:
        metadata["labels"] = {"kubernetes.io/service-name": service}
    if trigger is not None:
        metadata["annotations"] = {TRIGGER_TIME: trigger}
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": metadata,
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [ip]} for ip in ips]}


def as_api_gives(doc: dict[str, Any]) -> Any:
    """The slim Struct the reflectors decode the API's JSON into."""
    return slim.to_struct(SLICE_KIND if doc["kind"] == "EndpointSlice" else SERVICE_KIND, doc)


# -- the reflector: each decoded object is gone before the next is decoded -------------------

PAGE = 3
SLICES = [f"paged-{i}" for i in range(8)]


def decoded_slices_alive() -> int:
    """EndpointSlice Structs of this test held by any list, tuple or dict (Structs are gc=False,
    so they are found through their containers, which the cyclic collector tracks)."""
    struct = slim.STRUCTS[client.V1EndpointSlice]
    found = set()
    for container in gc.get_objects():
        if isinstance(container, list | tuple):
            values: Any = container
        elif isinstance(container, dict):
            values = container.values()
        else:
            continue
        for value in values:
            if type(value) is struct and value.metadata.name.startswith("paged-"):
                found.add(id(value))
    return len(found)


def list_in_pages(prepare: Any) -> tuple[list[Replace | Change], list[int]]:
    """List `SLICES` in pages of `PAGE` through a Reflector with `prepare` (None: none), then see
    one watch event: what it emitted, and how many of the decoded slices were held by anything
    as each listed one was handed to `prepare` (the one in hand is only an argument then)."""
    alive: list[int] = []
    emitted: list[Replace | Change] = []
    stop = threading.Event()
    listing = True  # count only while listing

    def counting(obj: Any) -> Any:
        if listing:
            alive.append(decoded_slices_alive())
        return obj if prepare is None else prepare(obj)

    with FakeAPIServer() as api:
        for i, name in enumerate(SLICES):
            api.apply("endpointslices", slice_doc(name, "web", [f"10.1.0.{i + 1}"]))
        fn = list_functions(client.ApiClient(client.Configuration(host=api.url)))["endpointslices"]
        reflector = Reflector("endpointslices", fn, emitted.append, stop, watch_timeout=2, initial_backoff=0.05,
                              page_size=PAGE, prepare=counting)
        thread = threading.Thread(target=reflector.run, daemon=True)
        thread.start()
        try:
            assert reflector.synced.wait(10)
            listing = False
            api.apply("endpointslices", slice_doc(SLICES[0], "web", ["10.1.0.99"]))
            for _ in range(500):
                if any(isinstance(e, Change) for e in emitted):
                    break
                stop.wait(0.02)
        finally:
            stop.set()
            api.drop_watches()
            thread.join(timeout=5)
    return emitted, alive


def test_without_prepare_a_lists_decoded_objects_pile_up() -> None:
    """The control: the count above sees every object decoded so far (what the agent did before)."""
    _, alive = list_in_pages(None)
    assert alive == list(range(len(SLICES)))


def test_each_listed_object_is_prepared_and_dropped_before_the_next_is_decoded() -> None:
    """So no page's decoded objects pile up, though the next page is fetched meanwhile (as bytes)."""
    emitted, alive = list_in_pages(prepare_slice)
    assert alive == [0] * len(SLICES)
    replace, change = emitted[0], emitted[-1]
    assert isinstance(replace, Replace) and isinstance(change, Change)
    # Every item is in the list (the tracker deletes the keys that are not), each prepared once.
    assert all(type(v) is PreparedSlice for v in replace.items)
    assert [v.key for v in replace.items] == [("default", name) for name in SLICES]
    assert type(change.obj) is PreparedSlice and change.obj.key == ("default", SLICES[0])
    assert change.obj.endpoints is not None
    assert [ep.ip for eps in change.obj.endpoints.values() for ep in eps] == ["10.1.0.99"]


def test_the_agent_prepares_services_and_slices_only() -> None:
    assert set(PREPARE) == {"services", "endpointslices"}  # nodes and servicecidrs: as decoded
    assert PREPARE["services"] is prepare_service and PREPARE["endpointslices"] is prepare_slice


# -- the tracker: prepared values and raw objects, the same state and rejections --------------

NAMES = ["a", "b", "c"]


def a_service(name: str, valid: bool) -> Any:
    return as_api_gives(service_doc(name, 10 + NAMES.index(name), 80 if valid else 70000))


def a_slice(service: str, n: int, hosts: list[int], owned: bool, valid: bool) -> Any:
    ips = [f"10.1.0.{h}" for h in hosts] + ([] if valid else ["not-an-ip"])
    return as_api_gives(slice_doc(f"{service}-{n}", service if owned else None, ips))


services = st.builds(a_service, st.sampled_from(NAMES), st.booleans())
slices = st.builds(a_slice, st.sampled_from(NAMES), st.integers(1, 2),
                   st.lists(st.integers(1, 5), max_size=3, unique=True), st.booleans(), st.integers(0, 4).map(bool))
operations = st.one_of(
    st.tuples(st.just("service"), services),
    st.tuples(st.just("service deleted"), services),
    st.tuples(st.just("slice"), slices),
    st.tuples(st.just("slice deleted"), slices),
    st.tuples(st.just("services"), st.lists(services, max_size=4)),
    st.tuples(st.just("slices"), st.lists(slices, max_size=4)),
    st.tuples(st.just("snapshot"), st.none()),
)


def apply(tracker: ChangeTracker, operation: str, arg: Any, prepare: bool) -> None:
    def prep(obj: Any) -> Any:
        if not prepare:
            return obj
        return prepare_slice(obj) if type(obj).__name__.endswith("EndpointSlice") else prepare_service(obj)

    calls: dict[str, Callable[[Any], None]] = {
        "service": tracker.service_updated, "service deleted": tracker.service_deleted,
        "slice": tracker.slice_updated, "slice deleted": tracker.slice_deleted}
    if operation in calls:
        calls[operation](prep(arg))
    elif operation == "services":
        tracker.replace_services([prep(o) for o in arg])
    elif operation == "slices":
        tracker.replace_slices([prep(o) for o in arg])


@settings(max_examples=150, deadline=None)
@given(st.lists(operations, max_size=20))
def test_prepared_values_give_the_same_state_and_rejections_as_raw_objects(ops) -> None:  # type: ignore[no-untyped-def]
    raw, prepared = ChangeTracker(), ChangeTracker()
    for operation, arg in [*ops, ("snapshot", None)]:
        apply(raw, operation, arg, prepare=False)
        apply(prepared, operation, arg, prepare=True)
        assert raw.take_rejections() == prepared.take_rejections()
        assert raw.rejected == prepared.rejected and raw.pending == prepared.pending
        if operation == "snapshot":
            assert raw.snapshot() == prepared.snapshot()
            assert raw.take_conflicts() == prepared.take_conflicts()
    assert (raw.service_events, raw.endpoint_events) == (prepared.service_events, prepared.endpoint_events)


def test_rejection_messages_are_word_for_word_those_of_the_raw_path() -> None:
    bad_service = as_api_gives(service_doc("a", 10, 70000))
    bad_slice = as_api_gives(slice_doc("a-1", "a", ["not-an-ip"]))
    taken = []
    for prepare in (False, True):
        t = ChangeTracker()
        apply(t, "services", [bad_service], prepare)
        apply(t, "slices", [bad_slice], prepare)
        taken.append(t.take_rejections())
    assert taken[0] == taken[1]
    assert [r.message for r in taken[1]] == [
        "Service default/a: spec.ports[0].port: must be between 1 and 65535, inclusive, got 70000",
        "EndpointSlice default/a-1: endpoints[0].addresses[0]: 'not-an-ip' is not a valid IP address",
    ]


def test_a_prepared_value_keeps_no_exception_and_prepares_to_itself() -> None:
    prepared = prepare_service(as_api_gives(service_doc("a", 10, 70000)))
    assert prepared == PreparedService(("default", "a"), None, prepared.error) and prepared.error
    assert prepare_service(prepared) is prepared
    unowned = prepare_slice(as_api_gives(slice_doc("x", None, ["not-an-ip"])))
    assert unowned == PreparedSlice(("default", "x"), None, {})  # a slice of no service is not converted
    assert prepare_slice(unowned) is unowned


def test_trigger_times_are_read_when_prepared() -> None:
    stamped = prepare_slice(as_api_gives(slice_doc("a-1", "a", ["10.1.0.1"], "2024-05-01T10:00:00Z")))
    assert stamped.trigger_time == 1714557600.0
    assert prepare_slice(as_api_gives(slice_doc("a-1", "a", ["10.1.0.1"], "yesterday"))).trigger_time is None
    assert prepare_slice(as_api_gives(slice_doc("a-1", "a", ["10.1.0.1"]))).trigger_time is None


def test_names_with_a_lone_surrogate_are_rejected_not_a_crash() -> None:
    """The key is copied out of the decoded object before any check (`convert.own_copy`): a
    string JSON's `\\ud800` escape gives (no UTF-8 form) must still come out as a rejection."""
    service = service_doc("a", 10)
    service["metadata"]["name"] = "web\ud800"
    prepared = prepare_service(as_api_gives(service))
    assert prepared.key == ("default", "web\ud800") and prepared.ports is None and "metadata.name" in prepared.error
    piece = slice_doc("a-1", "web\ud800", ["10.1.0.1"])
    piece["metadata"]["namespace"] = "ns\ud800"
    sliced = prepare_slice(as_api_gives(piece))
    assert sliced.key == ("ns\ud800", "a-1") and sliced.endpoints is None and "metadata.namespace" in sliced.error
