"""A test API server that speaks the Kubernetes list/watch protocol over HTTP, on loopback.

Enough of the real thing for the official client to run unmodified against it: lists with a
resourceVersion, `?watch=true` streams of chunked JSON events from a given version, BOOKMARK
events, `410 Gone` for versions older than what it still remembers, and connections it can be
told to drop. Objects are plain dicts (manifests); the test drives changes with `apply` and
`delete`.

Lists with `limit` come in pages, as the real server's: items in key order (namespace, name),
`metadata.continue` while more remain (with `remainingItemCount` when there is no selector),
and every page of one list at the first page's resourceVersion, whatever changed since. The
continue token carries that version and the last key served; the state at that version is
replayed from the event history. A token from before `oldest_watchable` (after `compact`) gets
`410` with reason `Expired`, as the real server's compacted tokens do. `before_list` lets a test
act between pages or fail one; `before_watch` fails a watch request. Each request's path is kept
in `requests`, its headers (lower-cased names) in `request_headers`.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

PATHS = {
    "/api/v1/services": ("services", "ServiceList", "v1"),
    "/apis/discovery.k8s.io/v1/endpointslices": ("endpointslices", "EndpointSliceList", "discovery.k8s.io/v1"),
    "/api/v1/nodes": ("nodes", "NodeList", "v1"),
    "/apis/networking.k8s.io/v1/servicecidrs": ("servicecidrs", "ServiceCIDRList", "networking.k8s.io/v1"),
}


def _selected(obj: dict[str, Any], query: dict[str, str]) -> bool:
    """The one field selector the agent uses: `metadata.name=<node>`."""
    selector = query.get("fieldSelector", "")
    return not selector.startswith("metadata.name=") or obj["metadata"]["name"] == selector.split("=", 1)[1]


# The Status reason the real server gives with each status (metav1.StatusReason).
REASONS = {401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 410: "Expired", 429: "TooManyRequests",
           500: "InternalError", 503: "ServiceUnavailable"}


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": reason,
            "message": message, "code": code}


def _send_json(req: BaseHTTPRequestHandler, code: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    req.send_response(code)
    req.send_header("Content-Type", "application/json")
    req.send_header("Content-Length", str(len(data)))
    req.end_headers()
    req.wfile.write(data)


class FakeAPIServer:
    def __init__(self) -> None:
        self.version = 100
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {r: {} for r, _, _ in PATHS.values()}
        self.events: list[tuple[int, str, str, dict[str, Any]]] = []  # (version, resource, type, object)
        self.oldest_watchable = 0  # versions below this get 410 Gone
        self.changed = threading.Condition()
        self.drop_generation = 0
        self.open_watches = 0  # watch streams being served now
        self.requests: list[str] = []
        self.first_request_at: float | None = None  # time.perf_counter() when the first request came
        self.request_headers: list[dict[str, str]] = []  # each request's, names lower-cased
        # Called with (resource, query) before each list is served; an HTTP status it returns
        # is served instead, as a Status (a test's fault or change between pages).
        self.before_list: Callable[[str, dict[str, str]], int | None] | None = None
        # The same before each watch request is answered.
        self.before_watch: Callable[[str, dict[str, str]], int | None] | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                server.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeAPIServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.drop_watches()
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- driving it -----------------------------------------------------------------------

    def apply(self, resource: str, obj: dict[str, Any]) -> None:
        with self.changed:
            self.version += 1
            meta = obj.setdefault("metadata", {})
            meta.setdefault("namespace", "default")
            meta["resourceVersion"] = str(self.version)
            key = (meta["namespace"], meta["name"])
            kind = "MODIFIED" if key in self.objects[resource] else "ADDED"
            self.objects[resource][key] = obj
            self.events.append((self.version, resource, kind, obj))
            self.changed.notify_all()

    def delete(self, resource: str, namespace: str, name: str) -> None:
        with self.changed:
            self.version += 1
            obj = self.objects[resource].pop((namespace, name))
            self.events.append((self.version, resource, "DELETED", obj))
            self.changed.notify_all()

    def compact(self, once_open: int = 0) -> None:
        """Forget history: watches from any version before now get 410 Gone (`once_open`: as
        for `drop_watches`; a watch that starts from the current version is still served)."""
        with self.changed:
            self._wait_for_watches(once_open)
            self.oldest_watchable = self.version + 1
            self.drop_watches()

    def drop_watches(self, once_open: int = 0) -> None:
        """Cut every open watch connection mid-stream; with `once_open`, first wait until that
        many watches are open, so that a stream still between its list and its watch (or
        reconnecting after a timeout) cannot slip past the cut."""
        with self.changed:
            self._wait_for_watches(once_open)
            self.drop_generation += 1
            self.changed.notify_all()

    def _wait_for_watches(self, count: int, timeout: float = 5.0) -> None:
        if not self.changed.wait_for(lambda: self.open_watches >= count, timeout):
            raise AssertionError(f"{self.open_watches} watches open, waited for {count}")

    # -- serving --------------------------------------------------------------------------

    def handle(self, req: BaseHTTPRequestHandler) -> None:
        url = urlparse(req.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if self.first_request_at is None:
            self.first_request_at = time.perf_counter()
        self.requests.append(req.path)
        self.request_headers.append({name.lower(): value for name, value in req.headers.items()})
        if url.path not in PATHS:
            req.send_error(404)
            return
        resource, list_kind, api_version = PATHS[url.path]
        watching = query.get("watch") in ("true", "1")
        hook = self.before_watch if watching else self.before_list
        failure = hook(resource, query) if hook else None
        if failure is not None:
            _send_json(req, failure, _status(failure, REASONS.get(failure, "InternalError"), "injected by the test"))
            return
        if watching:
            self._watch(req, resource, api_version, query)
            return
        with self.changed:
            if "limit" in query or "continue" in query:
                body = self._page(resource, query)
                if body is None:
                    _send_json(req, 410, _status(410, "Expired", "The provided continue parameter is too old "
                                                 "to display a consistent list result."))
                    return
            else:
                body = {"metadata": {"resourceVersion": str(self.version)},
                        "items": [obj for obj in self.objects[resource].values() if _selected(obj, query)]}
        _send_json(req, 200, {"kind": list_kind, "apiVersion": api_version, **body})

    def _page(self, resource: str, query: dict[str, str]) -> dict[str, Any] | None:
        """One page of a list (`limit`, `continue`) at the first page's version; None: the token expired."""
        version, after = self.version, None
        if query.get("continue"):
            token = json.loads(base64.urlsafe_b64decode(query["continue"]))
            version, after = token["rv"], tuple(token["start"])
            if version < self.oldest_watchable:
                return None
        state = self.objects[resource] if version == self.version else self._state_at(resource, version)
        keys = sorted(key for key, obj in state.items() if _selected(obj, query) and (after is None or key > after))
        limit = int(query.get("limit") or 0) or len(keys)
        meta: dict[str, Any] = {"resourceVersion": str(version)}
        if len(keys) > limit:
            start = {"rv": version, "start": list(keys[limit - 1])}
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(start).encode()).decode()
            if not query.get("fieldSelector"):
                meta["remainingItemCount"] = len(keys) - limit
        return {"metadata": meta, "items": [state[key] for key in keys[:limit]]}

    def _state_at(self, resource: str, version: int) -> dict[tuple[str, str], dict[str, Any]]:
        """The objects of `resource` as they were at `version`, replayed from the event history."""
        state: dict[tuple[str, str], dict[str, Any]] = {}
        for event_version, event_resource, kind, obj in self.events:
            if event_version > version:
                break
            if event_resource == resource:
                key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
                if kind == "DELETED":
                    state.pop(key, None)
                else:
                    state[key] = obj
        return state

    def _watch(self, req: BaseHTTPRequestHandler, resource: str, api_version: str, query: dict[str, str]) -> None:
        since = int(query.get("resourceVersion") or self.version)
        deadline = time.monotonic() + float(query.get("timeoutSeconds", "30"))
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Transfer-Encoding", "chunked")
        req.end_headers()

        def send(event: dict[str, Any]) -> None:
            line = json.dumps(event).encode() + b"\n"
            req.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
            req.wfile.flush()

        with self.changed:
            generation = self.drop_generation
            if since < self.oldest_watchable - 1:
                send({"type": "ERROR", "object": _status(410, "Expired", f"too old resource version: {since}")})
                req.wfile.write(b"0\r\n\r\n")
                return
            sent = since
            self.open_watches += 1
            self.changed.notify_all()
            try:
                self._stream(req, resource, api_version, query, send, sent, generation, deadline)
            finally:
                self.open_watches -= 1

    def _stream(self, req: BaseHTTPRequestHandler, resource: str, api_version: str, query: dict[str, str],
                send: Callable[[dict[str, Any]], None], sent: int, generation: int, deadline: float) -> None:
        """Send events after `sent` until the watch is dropped or times out (condition held)."""
        while True:
            pending = [e for e in self.events if e[0] > sent and e[1] == resource and _selected(e[3], query)]
            for version, _, kind, obj in pending:
                send({"type": kind, "object": obj})
                sent = version
            if self.drop_generation != generation:
                req.close_connection = True
                return  # no terminating chunk: the client sees a broken stream
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                bookmark = {"kind": "Status", "apiVersion": api_version,
                            "metadata": {"resourceVersion": str(self.version)}}
                send({"type": "BOOKMARK", "object": bookmark})
                req.wfile.write(b"0\r\n\r\n")
                return
            self.changed.wait(min(remaining, 0.2))
