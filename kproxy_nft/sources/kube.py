"""The Kubernetes API as a source: list, then watch, Services, EndpointSlices, ServiceCIDRs, our Node.

A `Reflector` per resource runs in its own thread, as client-go's reflector does: it lists
(everything, with the list's resourceVersion), hands the full list on as one `Replace`, then
watches from that resourceVersion with bookmarks on, handing on each event. When the watch
ends it resumes from the last resourceVersion seen; on `410 Gone` (the version is too old) it
lists again at once; on any other failure (a dropped connection, an API error) it lists again
after a jittered, doubling backoff.

The list comes in pages (`limit`, then each page's `continue` token), as client-go's pager
gives its reflector: every page is at the first page's resourceVersion (the server's promise),
each page's items are decoded straight into slim Structs (`slim.api_item`: the client's
attribute names, checked against its schema in C) and its body dropped once they are, so a
10,000-Service list's tens of MB of JSON are never held at once with their decoded objects;
only the next page's body is fetched meanwhile (`_Fetch`), so that decoding does not wait
for the server. Only the complete list is handed on; a failed page fails the whole list.
While a list is decoded the cyclic collector is paused (`no_cyclic_gc`). Each watch event's
object is decoded the same way (`_SlimWatch`); the official client keeps the connection, auth
and the watch protocol.

A reflector given `prepare` (the agent's, for Services and EndpointSlices: its change tracker's
pure conversion) hands on what that makes of each object instead of the object: each page is
prepared as it arrives, each decoded Struct replaced by its small value, so no page's Structs
outlive it. Kept whole until the list was complete, the 10,000 EndpointSlice Structs of 10,000
Services × 10 endpoints were ~98 MiB at once; preparing page by page took the agent's peak
from 267 to 217 MiB and its steady RSS from 216 to 166 MiB (pymalloc arenas 164 → 114: the
converted values kept are no longer scattered among freed Structs). The list is still handed
on whole, as one `Replace` of every item: the tracker deletes the keys not in it.

The requests themselves are made by `ListWatch`, a small callable per resource that does what
the client's generated `list_*` method does, through the same `ApiClient` (kubeconfig, auth,
TLS, transport), without importing the generated API classes (`client.CoreV1Api` and the
rest): `core_v1_api` alone imports every core/v1 model and wraps hundreds of methods in
pydantic `validate_call`; the three classes cost the agent +22 MB RSS and +0.35 s at start
(71.5 MB / 0.67 s without them, 93 MB / 1.01 s with them; 1.3 s of a start under load).
Importing the agent and building its list calls went from 91.0 to 69.9 MiB RSS with this.

Events are not applied here: they are put on a queue that the agent's loop drains into the
change tracker, so all state lives in one thread (`prepare` is pure: it keeps none).
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from kproxy_nft.sources import slim
from kproxy_nft.sources.events import Change, Replace
from kproxy_nft.sources.manifests import no_cyclic_gc

log = logging.getLogger(__name__)

HTTP_GONE = 410

# client-go's reflector lists through a pager (tools/cache/reflector.go, `Reflector.list`:
# `pager.New`) whose page size is `defaultPageSize` = 500 (tools/pager/pager.go).
DEFAULT_PAGE_SIZE = 500


Emit = Callable[[Replace | Change], None]

# The kind of each listed resource's items (the API's lists leave it off the items).
RESOURCE_KINDS: dict[str, tuple[str, str]] = {
    "services": ("v1", "Service"),
    "endpointslices": ("discovery.k8s.io/v1", "EndpointSlice"),
    "servicecidrs": ("networking.k8s.io/v1", "ServiceCIDR"),
    "nodes": ("v1", "Node"),
}


def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """An API client from a kubeconfig (flag, KUBECONFIG, ~/.kube/config) or in-cluster config."""
    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException:
        return config.new_client_from_config()  # KUBECONFIG or ~/.kube/config


class ListWatch:
    """The list/watch call of one resource collection, as the client's generated `list_*` method
    makes it (`CoreV1Api.list_service_for_all_namespaces` and `_list_service_for_all_namespaces_serialize`,
    kubernetes 37.0.2) but without importing the generated API class (see the module's docstring).

    The same request: `GET <path>`, the set keyword arguments as query parameters in the generated
    method's order and names, `Accept: application/json` (what its `select_header_accept` picks,
    for lists and watches alike), the client's default headers and the `BearerToken` auth
    setting, through `ApiClient.param_serialize` and `call_api`. The same answer (its
    `ApiClient._call_with_legacy_options`): with `_preload_content=False` the raw urllib3 response
    (what `Reflector` and `watch.Watch.stream` read), after a non-2xx status is raised as the
    client's `ApiException` (its subclass for the status, the body read into it); otherwise the
    body deserialized into the client's typed list (`V1ServiceList`, ...), a non-2xx status raised
    by `response_deserialize`.

    For `watch.Watch`: its signature has no `follow` (so `watch=True` is what it sets), and its
    docstring's `:rtype:` names the list type, from which the watch finds the item type when not
    given one; `item_type` names it for `Watch(return_type=...)`.
    """

    def __init__(self, api: client.ApiClient, path: str, list_type: str, field_selector: str | None = None) -> None:
        self.api = api
        self.path = path
        self.list_type = list_type
        self.item_type = list_type.removesuffix("List")
        self.field_selector = field_selector  # used when the call gives none (as a partial's keyword)
        self.__doc__ = f"list or watch {path}\n\n:rtype: {list_type}"

    def __repr__(self) -> str:
        selector = f" fieldSelector={self.field_selector}" if self.field_selector else ""
        return f"<ListWatch {self.path}{selector}>"

    def __call__(
        self,
        *,
        allow_watch_bookmarks: bool | None = None,
        _continue: str | None = None,
        field_selector: str | None = None,
        label_selector: str | None = None,
        limit: int | None = None,
        resource_version: str | None = None,
        resource_version_match: str | None = None,
        send_initial_events: bool | None = None,
        timeout_seconds: int | None = None,
        watch: bool | None = None,
        _preload_content: bool = True,
        _request_timeout: float | tuple[float, float] | None = None,
    ) -> Any:
        if field_selector is None:
            field_selector = self.field_selector
        # The generated serializer's order (its `_query_params`), each only when set.
        query = [(name, value) for name, value in (
            ("allowWatchBookmarks", allow_watch_bookmarks),
            ("continue", _continue),
            ("fieldSelector", field_selector),
            ("labelSelector", label_selector),
            ("limit", limit),
            ("resourceVersion", resource_version),
            ("resourceVersionMatch", resource_version_match),
            ("sendInitialEvents", send_initial_events),
            ("timeoutSeconds", timeout_seconds),
            ("watch", watch),
        ) if value is not None]
        method, url, headers, body, post_params = self.api.param_serialize(
            method="GET",
            resource_path=self.path,
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(method, url, header_params=headers, body=body, post_params=post_params,
                                     _request_timeout=_request_timeout)
        if not _preload_content:
            if not 200 <= response.status <= 299:
                response.read()
                raise ApiException.from_response(http_resp=response, body=None, data=None)
            return response.response
        response.read()
        return self.api.response_deserialize(response, {"200": self.list_type, "401": None}).data


def list_functions(api: client.ApiClient, node_name: str | None = None) -> dict[str, Callable[..., Any]]:
    """The list calls kproxy-nft watches, by resource name (a `ListWatch` each).

    ServiceCIDRs give the service IP ranges. With `node_name`, also this node's own Node
    object (a field selector: the watch sees only it), for its addresses and topology zone.
    """
    functions: dict[str, Callable[..., Any]] = {
        "services": ListWatch(api, "/api/v1/services", "V1ServiceList"),
        "endpointslices": ListWatch(api, "/apis/discovery.k8s.io/v1/endpointslices", "V1EndpointSliceList"),
        "servicecidrs": ListWatch(api, "/apis/networking.k8s.io/v1/servicecidrs", "V1ServiceCIDRList"),
    }
    if node_name:
        functions["nodes"] = ListWatch(api, "/api/v1/nodes", "V1NodeList", field_selector=f"metadata.name={node_name}")
    return functions


class _SlimWatch(watch.Watch):
    """The client's watch (its 410 handling, bookmarks, resourceVersion), with the object of each
    ADDED/MODIFIED/DELETED event decoded straight into a slim Struct (`slim.watch_event`).

    `return_type` (the item's model name, `ListWatch.item_type`) is what the client's own reading
    of the other lines needs; without it the client finds it from the list function's signature
    and docstring (its `get_return_type`)."""

    def __init__(self, kind: tuple[str, str] | None, return_type: str | None = None) -> None:
        super().__init__(return_type)
        self._kind = kind

    def unmarshal_event(self, data: Any, return_type: Any) -> Any:
        event = slim.watch_event(self._kind, data) if self._kind and data and not data.isspace() else None
        if event is None:  # BOOKMARK, ERROR, garbage: the client's own reading
            return super().unmarshal_event(data, return_type)
        kind, obj = event
        if obj.metadata is not None and obj.metadata.resource_version:
            self.resource_version = obj.metadata.resource_version
        return {"type": kind, "object": obj}


def _as_is(obj: Any) -> Any:
    return obj


class _Fetch:
    """`fetch(*args)` run on a daemon thread of its own; `result()` waits for it, then returns
    what it returned or raises what it raised. A fetch abandoned (the agent stopping, a page
    that failed) ends on its own with its request; being a daemon, it never holds up an exit."""

    def __init__(self, fetch: Callable[..., Any], *args: Any, name: str) -> None:
        self._outcome: tuple[bool, Any] = (False, None)
        self._thread = threading.Thread(target=self._run, args=(fetch, args), name=name, daemon=True)
        self._thread.start()

    def _run(self, fetch: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            self._outcome = (True, fetch(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread, which raises it
            self._outcome = (False, e)

    def result(self) -> Any:
        self._thread.join()
        done, value = self._outcome
        if not done:
            raise value
        return value


class _Stopped(Exception):
    """`stop` was set between two pages of a list: the list is abandoned, nothing is emitted."""


def _expired(e: ApiException) -> bool:
    """client-go's `errors.IsResourceExpired`, which its pager tests: a Status whose reason is `Expired`."""
    try:
        return e.status == HTTP_GONE and json.loads(e.body or "{}").get("reason") == "Expired"
    except (ValueError, AttributeError):
        return False


class Reflector:
    """List-then-watch one resource forever (until `stop` is set), emitting what it sees."""

    def __init__(
        self,
        resource: str,
        list_fn: Callable[..., Any],
        emit: Emit,
        stop: threading.Event,
        watch_timeout: int = 300,
        initial_backoff: float = 0.5,
        max_backoff: float = 30.0,
        jitter: Callable[[], float] = random.random,
        page_size: int = DEFAULT_PAGE_SIZE,
        prepare: Callable[[Any], Any] | None = None,
    ) -> None:
        """`prepare`: applied to each object (each of a page as it arrives, each watch event's)
        before it is handed on; the agent's converts it into what its change tracker keeps
        (see the module docstring). None: the objects as decoded."""
        self.resource = resource
        self._list = list_fn
        self._emit = emit
        self._stop = stop
        self._watch_timeout = watch_timeout
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._jitter = jitter
        self._page_size = page_size  # 0: one request for the whole list
        self._prepare: Callable[[Any], Any] = prepare or _as_is
        self.relists = 0
        self.synced = threading.Event()  # set after the first complete list

    def run(self) -> None:
        backoff = self._initial_backoff
        while not self._stop.is_set():
            try:
                version = self._list_all()
                backoff = self._initial_backoff
                self._watch_from(version)
            except _Stopped:
                return
            except ApiException as e:
                if e.status == HTTP_GONE:
                    log.info("%s: resourceVersion expired (410 Gone); relisting", self.resource)
                    continue
                log.warning("%s: API error %s %s; relisting in %.1fs", self.resource, e.status, e.reason, backoff)
                backoff = self._sleep(backoff)
            except Exception as e:  # noqa: BLE001 - dropped connections etc.: relist after a pause
                log.warning("%s: %s: %s; relisting in %.1fs", self.resource, type(e).__name__, e, backoff)
                backoff = self._sleep(backoff)

    def _sleep(self, backoff: float) -> float:
        # Full jitter in [backoff/2, backoff): many nodes restarting together don't relist in step.
        self._stop.wait(backoff * (0.5 + self._jitter() / 2))
        return min(backoff * 2, self._max_backoff)

    def _list_all(self) -> str:
        # Decoding and preparing a list builds many objects and no cycles; the collector's passes
        # over all those kept so far took a fifth of a 10k-Service list (see `no_cyclic_gc`).
        with no_cyclic_gc():
            items, version = self._list_pages()
        self.relists += 1
        self._emit(Replace(self.resource, tuple(items)))
        del items
        self.synced.set()
        return version

    def _list_pages(self) -> tuple[list[Any], str]:
        """Every item and the list's resourceVersion, a page at a time; any failure fails it all.

        As client-go's `ListPager.List` (tools/pager/pager.go): the first request adds
        `limit`, each next one the previous page's `continue` token, until a page has none. The
        server serves every page at the first page's resourceVersion, so the last page's is the
        list's. An `Expired` error on a later page (the server compacted the snapshot the token
        points into) falls back to one full list without `limit` or `continue`, as the pager's
        `FullListIfExpired` (set by `pager.New`) does; an `Expired` first page, or any other
        error, is the caller's (`run`: at once for 410, as client-go's `Reflector.list` retries
        an expired list at once; after a backoff for the rest).

        The requests are the pager's, one after the other; but each next page is fetched (on a
        thread of its own, `_Fetch`) while this one's objects are decoded and prepared, which
        otherwise waited for the server in turn: at 10,000 Services the list of EndpointSlices
        spent 0.6 of its 1.5 s waiting (issue 14). At most one page is fetched ahead.
        """
        items: list[Any] = []
        token = ""
        upcoming = _Fetch(self._fetch_page, self._page_size, token, name=f"{self.resource}-page")
        while True:
            try:
                page, version, token_next = upcoming.result()
            except ApiException as e:
                if not token or not _expired(e):
                    raise
                log.info("%s: list's continue token expired (410 Expired); listing whole", self.resource)
                items.clear()  # the pages so far are of a snapshot that is gone
                page, version, _ = self._fetch_page(0, "")
                return self._decoded(page), version
            token = token_next
            if not token:
                items += self._decoded(page)
                return items, version
            if self._stop.is_set():  # as the pager checks its context between pages
                raise _Stopped
            upcoming = _Fetch(self._fetch_page, self._page_size, token, name=f"{self.resource}-page")
            items += self._decoded(page)
            del page

    def _fetch_page(self, limit: int, token: str) -> tuple[list[Any], str, str]:
        """One list request: its items (still JSON text, for a resource with a slim Struct),
        resourceVersion and continue token ("" on the last page)."""
        options: dict[str, Any] = {}
        if limit:
            options["limit"] = limit
        if token:
            options["_continue"] = token
        if self.resource not in RESOURCE_KINDS:  # a resource without a slim Struct: the client's typed objects
            result = self._list(**options)
            meta = result.metadata
            return list(result.items or ()), str(meta.resource_version), meta.var_continue or ""
        response = self._list(_preload_content=False, **options)
        try:
            return slim.api_list_page(response.data)
        finally:
            response.release_conn()

    def _decoded(self, page: list[Any]) -> list[Any]:
        """A page's items as what is handed on: each decoded straight into its slim Struct
        (`slim.api_item`; the client's typed objects of a 10,000-Service list were most of the
        agent's first-list peak), then prepared, in place, so that no page's Structs outlive it."""
        kind = RESOURCE_KINDS.get(self.resource)
        for i, obj in enumerate(page):
            page[i] = self._prepare(obj if kind is None else slim.api_item(kind, obj))
        return page

    def _watch_from(self, version: str) -> None:
        """Watch until the server ends the stream, resuming from the last version seen."""
        while not self._stop.is_set():
            w = _SlimWatch(RESOURCE_KINDS.get(self.resource), getattr(self._list, "item_type", None))
            stream = w.stream(self._list, resource_version=version, allow_watch_bookmarks=True,
                              timeout_seconds=self._watch_timeout)
            for event in stream:
                if self._stop.is_set():
                    w.stop()
                    return
                if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                    self._emit(Change(self.resource, event["type"], self._prepare(event["object"])))
            version = w.resource_version or version
