"""The API source's own list/watch calls (`ListWatch`, issue 14) in place of the client's generated API classes.

They make the request the generated `list_*` methods make (path, query, headers, auth), answer
as they do (the raw response, a typed list, `ApiException` for a non-2xx status), work with the
client's `watch.Watch` unchanged, and leave the generated API modules unimported: importing
them cost the agent +22 MB RSS and +0.35 s at start.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException, ForbiddenException, ServiceException

from kproxy_nft.sources.kube import ListWatch, Reflector, Replace, list_functions
from tests.fake_apiserver import FakeAPIServer
from tests.test_kube_source import service

TOKEN = "Bearer sekret-token"


def _api(url: str = "http://127.0.0.1:1", token: str | None = TOKEN) -> client.ApiClient:
    cfg = client.Configuration(host=url)
    if token:
        cfg.api_key = {"authorization": token}  # what the kubeconfig and in-cluster loaders set
    return client.ApiClient(cfg)


def test_building_the_list_functions_imports_no_generated_api_class() -> None:
    # In a fresh interpreter: this test process may have imported them for the other tests.
    code = textwrap.dedent("""
        import sys
        import kproxy_nft.cli, kproxy_nft.agent.runtime
        from kubernetes import client
        from kproxy_nft.sources.kube import list_functions
        fns = list_functions(client.ApiClient(client.Configuration(host="http://127.0.0.1:1")), "node1")
        assert sorted(fns) == ["endpointslices", "nodes", "servicecidrs", "services"], fns
        assert "kubernetes.client.api.core_v1_api" not in sys.modules
        print(sorted(m for m in sys.modules if m.startswith("kubernetes.client.api.")))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


class _Sent(Exception):
    pass


def _request(fn: Any, api: client.ApiClient, monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> tuple[Any, ...]:
    """What `fn(**kwargs)` hands `api.call_api`: (method, url, headers, body, post_params, timeout);
    no form parameters as None (the generated method's `[]`, the same to the REST client)."""
    sent: list[tuple[Any, ...]] = []

    def call_api(method: str, url: str, header_params: Any = None, body: Any = None, post_params: Any = None,
                 _request_timeout: Any = None) -> Any:
        sent.append((method, url, header_params, body, post_params or None, _request_timeout))
        raise _Sent

    monkeypatch.setattr(api, "call_api", call_api)
    with pytest.raises(_Sent):
        fn(**kwargs)
    return sent[0]


CALLS: list[dict[str, Any]] = [
    {},
    {"_preload_content": False, "limit": 500},
    {"_preload_content": False, "limit": 500, "_continue": "eyJydiI6MTB9"},
    {"_preload_content": False, "resource_version": "123", "allow_watch_bookmarks": True, "timeout_seconds": 300,
     "watch": True},
    {"_preload_content": False, "label_selector": "a=b", "resource_version": "0", "resource_version_match":
     "NotOlderThan", "send_initial_events": True, "watch": True, "_request_timeout": (5, 60)},
]


@pytest.mark.parametrize("kwargs", CALLS)
def test_the_request_is_the_generated_methods(kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    api = _api()
    ours = list_functions(api, "node1")
    core, discovery, networking = client.CoreV1Api(api), client.DiscoveryV1Api(api), client.NetworkingV1Api(api)
    generated = {
        "services": core.list_service_for_all_namespaces,
        "endpointslices": discovery.list_endpoint_slice_for_all_namespaces,
        "servicecidrs": networking.list_service_cidr,
        "nodes": lambda **kw: core.list_node(**{"field_selector": "metadata.name=node1", **kw}),
    }
    for resource, fn in ours.items():
        mine = _request(fn, api, monkeypatch, **kwargs)
        theirs = _request(generated[resource], api, monkeypatch, **kwargs)
        assert mine == theirs, resource
        assert mine[2]["authorization"] == TOKEN and mine[2]["Accept"] == "application/json"


def test_a_field_selector_given_replaces_the_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    api = _api()
    nodes = list_functions(api, "node1")["nodes"]
    assert "fieldSelector=metadata.name%3Dnode1" in _request(nodes, api, monkeypatch)[1]
    assert "fieldSelector=metadata.name%3Dnode2" in _request(nodes, api, monkeypatch,
                                                            field_selector="metadata.name=node2")[1]


def test_the_bearer_token_goes_with_every_list_and_watch() -> None:
    with FakeAPIServer() as server:
        server.apply("services", service("web", "10.96.0.10"))
        seen: list[Any] = []
        stop = threading.Event()
        fns = list_functions(_api(server.url), "node1")
        reflector = Reflector("services", fns["services"], seen.append, stop, watch_timeout=1, page_size=1)
        thread = threading.Thread(target=reflector.run, daemon=True)
        thread.start()
        try:
            assert reflector.synced.wait(5)
            server.apply("services", service("db", "10.96.0.11"))  # the watch is open and serving
            for _ in range(250):
                if any("watch=true" in path for path in server.requests):
                    break
                threading.Event().wait(0.02)
        finally:
            stop.set()
            server.drop_watches()
            thread.join(5)
        requests = list(zip(server.requests, server.request_headers, strict=True))
    assert any("watch=true" in path for path, _ in requests) and any("limit=1" in path for path, _ in requests)
    for path, headers in requests:
        assert headers.get("authorization") == TOKEN, path
        assert headers.get("accept") == "application/json", path
    assert [obj.metadata.name for obj in next(e for e in seen if isinstance(e, Replace)).items] == ["web"]


def test_no_token_no_authorization_header() -> None:
    with FakeAPIServer() as server:
        list_functions(_api(server.url, token=None))["services"](_preload_content=False).release_conn()
        assert "authorization" not in server.request_headers[0]


@pytest.mark.parametrize(("status", "exception"), [(403, ForbiddenException), (500, ServiceException),
                                                   (410, ApiException)])
@pytest.mark.parametrize("preload", [False, True])
def test_an_api_error_raises_the_clients_api_exception(status: int, exception: type[ApiException],
                                                      preload: bool) -> None:
    with FakeAPIServer() as server:
        server.before_list = lambda resource, query: status
        fn = list_functions(_api(server.url))["services"]
        with pytest.raises(ApiException) as raised:
            fn(_preload_content=preload, limit=500)
    assert type(raised.value) is exception
    assert raised.value.status == status
    assert f'"code": {status}' in (raised.value.body or "")  # the Status body, as the generated methods keep it


def test_a_refused_watch_raises_from_the_watch_stream() -> None:
    with FakeAPIServer() as server:
        server.before_watch = lambda resource, query: 403
        fn = list_functions(_api(server.url))["services"]
        with pytest.raises(ForbiddenException) as raised:
            list(watch.Watch().stream(fn, resource_version="1", timeout_seconds=1))
    assert raised.value.status == 403


def test_a_preloaded_list_is_the_clients_typed_list() -> None:
    with FakeAPIServer() as server:
        server.apply("services", service("web", "10.96.0.10"))
        result = list_functions(_api(server.url))["services"](limit=10)
    assert isinstance(result, client.V1ServiceList)
    assert [s.spec.cluster_ip for s in result.items] == ["10.96.0.10"]
    assert result.metadata.resource_version == str(server.version)


def test_the_clients_own_watch_reads_it_unchanged() -> None:
    """`watch.Watch().stream` with no return type finds the item type from the docstring's `:rtype:`,
    sets `watch=True` (no `follow` parameter), reads BOOKMARKs' versions and raises ERROR events."""
    fn = list_functions(_api())["services"]
    assert isinstance(fn, ListWatch)
    w = watch.Watch()
    assert w.get_return_type(fn) == "V1Service" and w.get_watch_argument_name(fn) == "watch"
    with FakeAPIServer() as server:
        server.apply("services", service("web", "10.96.0.10"))
        fn = list_functions(_api(server.url))["services"]
        start = str(server.version)
        timer = threading.Timer(0.3, server.apply, ("services", service("db", "10.96.0.11")))
        timer.start()
        w = watch.Watch()
        events = list(w.stream(fn, resource_version=start, allow_watch_bookmarks=True, timeout_seconds=1))
        timer.join()
        assert [(e["type"], type(e["object"]).__name__) for e in events] == [("ADDED", "V1Service"),
                                                                             ("BOOKMARK", "dict")]
        assert events[0]["object"].metadata.name == "db"
        assert w.resource_version == str(server.version)  # the BOOKMARK's
        server.compact()
        with pytest.raises(ApiException) as raised:  # the ERROR event of a forgotten version
            list(watch.Watch().stream(fn, resource_version=start, timeout_seconds=1))
    assert raised.value.status == 410
