"""The Kubernetes API as a source: list, then watch, Services, EndpointSlices, ServiceCIDRs, our Node.

A `Reflector` per resource runs in its own thread, as client-go's reflector does: it lists
(everything, with the list's resourceVersion), hands the full list on as one `Replace`, then
watches from that resourceVersion with bookmarks on, handing on each event. When the watch
ends it resumes from the last resourceVersion seen; on `410 Gone` (the version is too old) it
lists again at once; on any other failure (a dropped connection, an API error) it lists again
after a jittered, doubling backoff.

The list comes in pages (`limit`, then each page's `continue` token), as client-go's pager
gives its reflector: every page is at the first page's resourceVersion (the server's promise),
each page's raw body is decoded straight into slim Structs (`slim.api_list`: the client's
attribute names, checked against its schema in C) and dropped before the next is fetched, so
a 10,000-Service list's tens of MB of JSON are never held at once with their decoded objects.
Only the complete list is handed on; a failed page fails the whole list. Each watch event's
object is decoded the same way (`_SlimWatch`); the official client keeps the connection, auth
and the watch protocol.

Events are not applied here: they are put on a queue that the agent's loop drains into the
change tracker, so all state lives in one thread.
"""

from __future__ import annotations

import functools
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


def list_functions(api: client.ApiClient, node_name: str | None = None) -> dict[str, Callable[..., Any]]:
    """The list calls kproxy-nft watches, by resource name.

    ServiceCIDRs give the service IP ranges. With `node_name`, also this node's own Node
    object (a field selector: the watch sees only it), for its addresses and topology zone.
    """
    functions: dict[str, Callable[..., Any]] = {
        "services": client.CoreV1Api(api).list_service_for_all_namespaces,
        "endpointslices": client.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces,
        "servicecidrs": client.NetworkingV1Api(api).list_service_cidr,
    }
    if node_name:
        functions["nodes"] = functools.partial(client.CoreV1Api(api).list_node,
                                               field_selector=f"metadata.name={node_name}")
    return functions


class _SlimWatch(watch.Watch):
    """The client's watch (its 410 handling, bookmarks, resourceVersion), with the object of each
    ADDED/MODIFIED/DELETED event decoded straight into a slim Struct (`slim.watch_event`)."""

    def __init__(self, kind: tuple[str, str] | None) -> None:
        super().__init__()
        self._kind = kind

    def unmarshal_event(self, data: Any, return_type: Any) -> Any:
        event = slim.watch_event(self._kind, data) if self._kind and data and not data.isspace() else None
        if event is None:  # BOOKMARK, ERROR, garbage: the client's own reading
            return super().unmarshal_event(data, return_type)
        kind, obj = event
        if obj.metadata is not None and obj.metadata.resource_version:
            self.resource_version = obj.metadata.resource_version
        return {"type": kind, "object": obj}


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
    ) -> None:
        self.resource = resource
        self._list = list_fn
        self._emit = emit
        self._stop = stop
        self._watch_timeout = watch_timeout
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._jitter = jitter
        self._page_size = page_size  # 0: one request for the whole list
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
        """
        items: list[Any] = []
        token = ""
        while True:
            try:
                page, version, token_next = self._list_page(self._page_size, token)
            except ApiException as e:
                if not token or not _expired(e):
                    raise
                log.info("%s: list's continue token expired (410 Expired); listing whole", self.resource)
                items.clear()  # the pages so far are of a snapshot that is gone
                page, version, _ = self._list_page(0, "")
                return page, version
            items += page
            del page
            token = token_next
            if not token:
                return items, version
            if self._stop.is_set():  # as the pager checks its context between pages
                raise _Stopped

    def _list_page(self, limit: int, token: str) -> tuple[list[Any], str, str]:
        """One list request: its items, resourceVersion and continue token ("" on the last page)."""
        options: dict[str, Any] = {}
        if limit:
            options["limit"] = limit
        if token:
            options["_continue"] = token
        kind = RESOURCE_KINDS.get(self.resource)
        if kind is None:  # a resource without a slim Struct: the client's typed objects
            result = self._list(**options)
            meta = result.metadata
            return list(result.items or ()), str(meta.resource_version), meta.var_continue or ""
        # The raw body decoded straight into slim Structs (`slim.api_list`): the client's
        # typed objects of a 10,000-Service list were most of the agent's first-list peak.
        # The body goes with `response` when this returns, before the next page is fetched.
        response = self._list(_preload_content=False, **options)
        try:
            return slim.api_list(kind, response.data)
        finally:
            response.release_conn()

    def _watch_from(self, version: str) -> None:
        """Watch until the server ends the stream, resuming from the last version seen."""
        while not self._stop.is_set():
            w = _SlimWatch(RESOURCE_KINDS.get(self.resource))
            stream = w.stream(self._list, resource_version=version, allow_watch_bookmarks=True,
                              timeout_seconds=self._watch_timeout)
            for event in stream:
                if self._stop.is_set():
                    w.stop()
                    return
                if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                    self._emit(Change(self.resource, event["type"], event["object"]))
            version = w.resource_version or version
