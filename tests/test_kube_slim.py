"""The API source's lists decoded straight into slim Structs (issue 14), against the test API server.

A list's raw body becomes msgspec Structs (`slim.api_list`), not the client's pydantic models;
they convert to the same model; a truncated or garbage body is a relist after a backoff.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

import msgspec
from kubernetes import client

from kproxy_nft.convert import convert_endpoint_slice, convert_service
from kproxy_nft.sources.kube import Change, Reflector, Replace, list_functions
from tests.fake_apiserver import FakeAPIServer
from tests.test_kube_source import endpoint_slice, service


def _first_list(api: FakeAPIServer, resource: str) -> tuple[Replace, Reflector]:
    functions = list_functions(client.ApiClient(client.Configuration(host=api.url)))
    seen: list[Any] = []
    stop = threading.Event()
    reflector = Reflector(resource, functions[resource], seen.append, stop, watch_timeout=1, initial_backoff=0.05,
                          jitter=lambda: 0.0)
    thread = threading.Thread(target=reflector.run, daemon=True)
    thread.start()
    try:
        assert reflector.synced.wait(5)
    finally:
        stop.set()
        thread.join(5)
    return next(event for event in seen if isinstance(event, Replace)), reflector


def test_a_list_becomes_structs_that_convert_like_the_clients_models() -> None:
    with FakeAPIServer() as api:
        api.apply("services", service("web", "10.96.0.10"))
        api.apply("endpointslices", endpoint_slice("web-1", "web", ["10.1.0.1", "10.1.0.2"]))
        services, _ = _first_list(api, "services")
        slices, _ = _first_list(api, "endpointslices")
    assert all(isinstance(obj, msgspec.Struct) for obj in (*services.items, *slices.items))
    assert convert_service(services.items[0]) == convert_service(client.V1Service.model_validate(
        service("web", "10.96.0.10")))
    assert convert_endpoint_slice(slices.items[0]) == convert_endpoint_slice(client.V1EndpointSlice.model_validate(
        endpoint_slice("web-1", "web", ["10.1.0.1", "10.1.0.2"])))


def test_a_truncated_list_is_listed_again() -> None:
    with FakeAPIServer() as api:
        api.apply("services", service("web", "10.96.0.10"))
        serve = api.handle
        truncated = []

        def first_list_truncated(req: BaseHTTPRequestHandler) -> None:
            if "watch" not in req.path and not truncated:
                truncated.append(req.path)
                data = b'{"kind": "ServiceList", "items": [{"metadata": {"na'
                req.send_response(200)
                req.send_header("Content-Type", "application/json")
                req.send_header("Content-Length", str(len(data)))
                req.end_headers()
                req.wfile.write(data)
                return
            serve(req)

        api.handle = first_list_truncated  # type: ignore[method-assign]
        started = time.monotonic()
        services, reflector = _first_list(api, "services")
    assert truncated and reflector.relists >= 1
    assert [obj.metadata.name for obj in services.items] == ["web"]
    assert time.monotonic() - started < 5


def test_watch_events_bring_structs_and_move_the_resource_version() -> None:
    with FakeAPIServer() as api:
        functions = list_functions(client.ApiClient(client.Configuration(host=api.url)))
        seen: list[Any] = []
        stop = threading.Event()
        reflector = Reflector("services", functions["services"], seen.append, stop, watch_timeout=1)
        thread = threading.Thread(target=reflector.run, daemon=True)
        thread.start()
        try:
            assert reflector.synced.wait(5)
            api.apply("services", service("web", "10.96.0.10"))
            deadline = time.monotonic() + 5
            while not any(isinstance(event, Change) for event in seen) and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            stop.set()
            thread.join(5)
    change = next(event for event in seen if isinstance(event, Change))
    assert change.type == "ADDED" and isinstance(change.obj, msgspec.Struct)
    assert convert_service(change.obj).ports[0].cluster_ips == ("10.96.0.10",)
    assert reflector.relists == 1  # the watch went on from the event's version: no relist
