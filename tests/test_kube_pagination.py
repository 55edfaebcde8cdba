"""The initial list in pages (issue 14), against the test API server's `limit` and `continue`.

Seven Services in pages of three: three list requests make one list. Only the complete list is
handed on (one `Replace`), at the first page's snapshot; an expired continue token falls back
to one whole list, as client-go's pager does; a page that fails fails the list, which is
listed again from its start after the backoff.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from kproxy_nft.sources.kube import Change, Replace
from tests.fake_apiserver import FakeAPIServer
from tests.test_kube_source import Harness, service

NAMES = [f"svc{i}" for i in range(7)]
PAGE = 3


@pytest.fixture
def api() -> Iterator[FakeAPIServer]:
    with FakeAPIServer() as server:
        for i, name in enumerate(NAMES):
            server.apply("services", service(name, f"10.96.0.{10 + i}"))
        yield server


@contextlib.contextmanager
def listed(api: FakeAPIServer, **options: Any) -> Iterator[Harness]:
    """A running harness for Services listing in pages of `PAGE`, once it has synced."""
    with Harness(api, ("services",), page_size=PAGE, **options) as h:
        h.wait_for(lambda: h.reflectors[0].synced.is_set())
        yield h


def replaces(h: Harness) -> list[Replace]:
    h.drain()
    return [item for item in h.seen if isinstance(item, Replace)]


def names(replace: Replace) -> list[str]:
    return [obj.metadata.name for obj in replace.items]


def list_queries(api: FakeAPIServer) -> list[dict[str, str]]:
    """The query of each list request (not watch) the server saw, in order."""
    queries = [{k: v[0] for k, v in parse_qs(urlparse(path).query).items()} for path in api.requests]
    return [q for q in queries if "watch" not in q]


def on_first_continue(action: Callable[[], int | None]) -> Callable[[str, dict[str, str]], int | None]:
    """A `before_list` hook that runs `action` when the first page after the first is asked for."""
    done: list[bool] = []

    def hook(resource: str, query: dict[str, str]) -> int | None:
        if "continue" not in query or done:
            return None
        done.append(True)
        return action()

    return hook


def test_a_list_of_several_pages_is_one_replace_with_every_item_once(api: FakeAPIServer) -> None:
    version = api.version
    with listed(api) as h:
        api.apply("services", service("late", "10.96.0.99"))
        h.wait_for(lambda: any(isinstance(item, Change) for item in h.seen))
    [replace] = replaces(h)
    assert names(replace) == NAMES  # each exactly once, in the server's key order
    queries = list_queries(api)
    assert [q.get("limit") for q in queries] == [str(PAGE)] * 3
    assert ["continue" in q for q in queries] == [False, True, True]
    # The watch goes on from the list's version: the change after it arrives, with no relist.
    assert any(f"resourceVersion={version}" in r and "watch=true" in r for r in api.requests)
    assert h.reflectors[0].relists == 1


def test_changes_between_pages_are_not_in_the_list_but_follow_it(api: FakeAPIServer) -> None:
    def change() -> None:
        api.apply("services", service("svc5", "10.96.0.55"))  # on a page not served yet
        api.delete("services", "default", "svc6")
        api.apply("services", service("svc9", "10.96.0.59"))  # after every key served so far

    api.before_list = on_first_continue(change)
    with listed(api) as h:
        h.wait_for(lambda: len(h.seen) >= 4)
    [replace, *changes] = h.seen
    assert isinstance(replace, Replace)
    assert names(replace) == NAMES  # the first page's snapshot, not a mix
    assert next(o for o in replace.items if o.metadata.name == "svc5").spec.cluster_ip == "10.96.0.15"
    assert [(c.type, c.obj.metadata.name) for c in changes if isinstance(c, Change)] == [
        ("MODIFIED", "svc5"), ("DELETED", "svc6"), ("ADDED", "svc9")]


def test_an_expired_continue_token_falls_back_to_one_whole_list(api: FakeAPIServer) -> None:
    def change_and_compact() -> None:
        api.delete("services", "default", "svc0")  # on a page already served
        api.apply("services", service("svc9", "10.96.0.59"))
        api.compact()  # the token's snapshot is gone: 410 Expired

    api.before_list = on_first_continue(change_and_compact)
    with listed(api) as h:
        pass
    [replace] = replaces(h)
    assert names(replace) == [*NAMES[1:], "svc9"]  # the whole list as it is now, each item once
    queries = list_queries(api)
    assert ["continue" in q for q in queries] == [False, True, False]
    assert "limit" not in queries[-1]  # client-go's pager: a full list, without limit
    assert h.reflectors[0].relists == 1


def test_a_failed_page_emits_nothing_and_the_list_starts_over_after_the_backoff(api: FakeAPIServer) -> None:
    failed: list[float] = []

    def fail() -> int:
        failed.append(time.monotonic())
        return 500

    api.before_list = on_first_continue(fail)
    with listed(api, initial_backoff=0.4) as h:
        relisted_after = time.monotonic() - failed[0]
    [replace] = replaces(h)
    assert names(replace) == NAMES
    queries = list_queries(api)
    assert ["continue" in q for q in queries] == [False, True, False, True, True]
    assert relisted_after >= 0.2  # the backoff (0.4 s, halved by a zero jitter) came first


def test_a_stop_between_pages_abandons_the_list(api: FakeAPIServer) -> None:
    h = Harness(api, ("services",), page_size=PAGE)
    api.before_list = on_first_continue(lambda: h.stop.set())
    with h:
        h.threads[0].join(5)
        assert not h.threads[0].is_alive()
    assert replaces(h) == [] and not h.reflectors[0].synced.is_set()
    assert len(list_queries(api)) == 2


def test_the_next_page_is_asked_for_while_this_one_is_still_being_prepared(api: FakeAPIServer) -> None:
    """The fetch ahead (issue 14): the request for page 2 reaches the server while page 1's first
    object is in `prepare`, which waits for that request; one page at a time, it would time out."""
    second_page_asked = threading.Event()
    waited: list[bool] = []

    def hook(resource: str, query: dict[str, str]) -> None:
        if "continue" in query:
            second_page_asked.set()

    def prepare(obj: Any) -> Any:
        if not waited:
            waited.append(second_page_asked.wait(5))
        return obj

    api.before_list = hook
    with listed(api, prepare=prepare) as h:
        pass
    assert waited == [True]
    [replace] = replaces(h)
    assert names(replace) == NAMES  # in order, each once
    assert ["continue" in q for q in list_queries(api)] == [False, True, True]  # still one after the other


def test_the_cyclic_collector_is_paused_while_a_list_is_decoded_and_back_on_after(api: FakeAPIServer) -> None:
    """Its passes over every object kept so far were a fifth of a 10k-Service list (issue 14)."""
    collecting: list[bool] = []

    def prepare(obj: Any) -> Any:
        collecting.append(gc.isenabled())
        return obj

    assert gc.isenabled()
    with listed(api, prepare=prepare) as h:
        api.apply("services", service("late", "10.96.0.99"))
        h.wait_for(lambda: len(collecting) > len(NAMES))  # the watch event's, too
    assert collecting == [False] * len(NAMES) + [True]  # listed with it paused; the event with it on
    assert gc.isenabled()
