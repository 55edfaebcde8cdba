"""`run --manifests DIR`: the manifest files as a source for the agent, re-read when they change.

The counterpart of `kube.py`'s reflectors for a node without an API server (tests, demos, a
static cluster): the files are polled, and each change hands on the complete lists
(`Replace`), plus a `Rejection` for each problem seen for the first time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes.client import V1EndpointSlice, V1Service

from kproxy_nft.sources.events import Event, Rejection, Replace
from kproxy_nft.sources.manifests import ManifestError, expand_paths, load_document, parse_documents, read_manifests

log = logging.getLogger("kproxy_nft.agent")

Identity = tuple[str, str, str]  # (kind, namespace, name)


def _identity(obj: Any) -> Identity:
    meta = obj.metadata
    return (type(obj).__name__, meta.namespace or "default", meta.name)


def _file_stamp(path: str) -> tuple[int, int] | None:
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


@dataclass
class ManifestSource:
    """`--manifests DIR`: re-read the files when any of them changes (polled by mtime).

    Invalid documents are skipped: each problem is emitted once, as a `Rejection` (the agent
    logs and counts it), when it first appears; every valid object is used. A file with
    problems can add and update objects but removes none: what it held at its last clean read
    and lacks now stays until it reads clean again — so a half-saved edit (not even YAML) or a
    Service edited into an invalid one does not take the services down. For that, only the
    text of each file's last clean version is kept (the typed objects are ~30x bigger) and
    parsed again while the file has problems.
    """

    paths: list[str]
    emit: Callable[[Event], None]
    stop: threading.Event
    interval: float = 1.0
    _clean: dict[str, str] = field(default_factory=dict, init=False, repr=False)  # file → last clean text
    _reported: set[str] = field(default_factory=set, init=False, repr=False)  # problems emitted, still there

    def fingerprint(self) -> tuple[tuple[str, float, int], ...]:
        files = []
        for path in self.paths:
            p = Path(path)
            candidates = sorted(p.rglob("*")) if p.is_dir() else [p]
            for f in candidates:
                if f.is_file():
                    st = f.stat()
                    files.append((str(f), st.st_mtime, st.st_size))
        return tuple(files)

    def read(self) -> tuple[list[V1Service], list[V1EndpointSlice], list[Rejection]]:
        """The objects to use now, and the problems not reported before."""
        objects: list[V1Service | V1EndpointSlice] = []
        problems: dict[str, Rejection] = {}
        files = expand_paths(self.paths)
        for path in files:
            stamp = _file_stamp(path)
            try:
                text: str | None = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                text = None  # read_manifests reports it
            errors: list[ManifestError] = []
            manifests = read_manifests([path], on_error=errors.append)
            found: list[V1Service | V1EndpointSlice] = [*manifests.services, *manifests.endpoint_slices]
            del manifests
            if not errors:
                if text is not None and _file_stamp(path) == stamp:  # else: changed meanwhile, read again soon
                    self._clean[path] = text
                objects += found
                continue
            clean = self._clean.get(path)
            if clean is not None:
                present = {_identity(obj) for obj in found}
                found += [obj for obj in _usable_objects(clean, path) if _identity(obj) not in present]
            outcome = "skipped" if clean is None else "skipped; the objects of the file's last valid version stay"
            for error in errors:
                problems[str(error)] = Rejection(error.kind, str(error), outcome)
            objects += found
        for gone in set(self._clean) - set(files):
            del self._clean[gone]
        new = [rejection for message, rejection in problems.items() if message not in self._reported]
        self._reported = set(problems)
        services = [obj for obj in objects if isinstance(obj, V1Service)]
        slices = [obj for obj in objects if isinstance(obj, V1EndpointSlice)]
        return services, slices, new

    def poll(self) -> None:
        """Read the files and hand on what they hold (always a complete list of each resource)."""
        services, slices, rejections = self.read()
        for rejection in rejections:
            self.emit(rejection)
        self.emit(Replace("services", tuple(services)))
        self.emit(Replace("endpointslices", tuple(slices)))

    def run(self) -> None:
        seen: tuple[tuple[str, float, int], ...] | None = None
        while not self.stop.is_set():
            current = self.fingerprint()
            if current != seen:
                seen = current
                self.poll()  # the typed objects are big: none are kept until the next change
            self.stop.wait(self.interval)


def _usable_objects(text: str, source: str) -> list[V1Service | V1EndpointSlice]:
    """The Services and EndpointSlices in a file's text that `read_manifests` accepted before."""
    objects: list[V1Service | V1EndpointSlice] = []
    try:
        for doc in parse_documents(text, source):
            obj = load_document(doc)
            if isinstance(obj, V1Service | V1EndpointSlice):
                objects.append(obj)
    except ManifestError as e:  # not expected: this text read clean before
        log.warning("manifests: %s: its last valid version no longer reads: %s", source, e)
        return []
    return objects


