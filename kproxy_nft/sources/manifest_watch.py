"""`run --manifests DIR`: the manifest files as a source for the agent, re-read when they change.

The counterpart of `kube.py`'s reflectors for a node without an API server (tests, demos, a
static cluster). The manifest files (`*.yaml|*.yml|*.json` as `expand_paths` finds them; a log
file written into DIR is never looked at) are polled by size and mtime. The first poll hands
on complete lists (`Replace`); afterwards only the files that changed are parsed again, and
their objects handed on as watch events (`Change`): ADDED/MODIFIED for what a file holds,
DELETED for what it no longer holds. Each problem is a `Rejection`, once while it lasts.
This node's Node object, when a file holds it, is handed on as the API source does
(resource "nodes"): its addresses, zone, podCIDRs and deletion state.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes.client import V1EndpointSlice, V1Node, V1ObjectMeta, V1Service

from kproxy_nft.sources import slim
from kproxy_nft.sources.events import Change, Event, Rejection, Replace
from kproxy_nft.sources.manifests import ManifestError, expand_paths, read_manifests

log = logging.getLogger("kproxy_nft.agent")

Identity = tuple[str, str, str]  # (resource, namespace, name)
Stamp = tuple[int, int]  # (mtime in ns, size)

# A file whose mtime is this close to when it was read may change again within the same
# timestamp tick (file times are coarse: a jiffy, or 2 s on some filesystems), unseen by its
# stamp: such a file is read again on the next poll, and parsed only if its text differs.
RACY_NS = 2_000_000_000

_RESOURCES: dict[type[Any], str] = {
    V1Service: "services", V1EndpointSlice: "endpointslices", V1Node: "nodes",
}
# The manifest reader hands on slim Structs (the client's models only where msgspec cannot judge).
_RESOURCES.update({slim.STRUCTS[model]: resource for model, resource in list(_RESOURCES.items())})


def _identity(obj: Any) -> Identity:
    meta = obj.metadata
    return (_RESOURCES[type(obj)], meta.namespace or "default", meta.name)


def _stamp(path: str) -> Stamp | None:
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def _digest(path: str) -> bytes | None:
    try:
        return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).digest()
    except OSError:
        return None  # gone or unreadable: read_manifests reports it


def _deleted(identity: Identity) -> Any:
    """A stand-in for an object no file holds any more: the agent needs only its kind and name."""
    resource, namespace, name = identity
    cls = next(cls for cls, res in _RESOURCES.items() if res == resource)
    return cls.model_construct(metadata=V1ObjectMeta(name=name, namespace=None if resource == "nodes" else namespace))


@dataclass
class _FileState:
    """What the source remembers of one manifest file (never its typed objects: they are big)."""

    stamp: Stamp | None
    read_at: int  # time.time_ns() of the last read
    digest: bytes | None  # of the text last parsed
    identities: set[Identity] = field(default_factory=set)  # objects it holds (or held at its last clean read)
    problems: set[str] = field(default_factory=set)  # reported, still there
    clean_once: bool = False  # read without problems at least once


@dataclass
class ManifestSource:
    """`--manifests DIR`: hand on the objects of the manifest files, and then their changes.

    Invalid documents are skipped: each problem is emitted once, as a `Rejection` (the agent
    logs and counts it), when it first appears; every valid object is used. A file with
    problems can add and update objects but removes none: what it held at its last clean read
    and lacks now stays until it reads clean again -- so a half-saved edit (not even YAML) or a
    Service edited into an invalid one does not take the services down (the agent keeps the
    previous version of an object no event replaces).

    `node_name`: this node's name; a Node object of another name is ignored.
    """

    paths: list[str]
    emit: Callable[[Event], None]
    stop: threading.Event
    interval: float = 1.0
    node_name: str | None = None
    parses: int = field(default=0, init=False)  # files parsed so far (tests: nothing parsed needlessly)
    _files: dict[str, _FileState] = field(default_factory=dict, init=False, repr=False)
    _listed: bool = field(default=False, init=False, repr=False)

    def due(self, files: list[str]) -> list[str]:
        """Which of `files` to read now: new, changed, or possibly changed unseen (`RACY_NS`)."""
        due = []
        for path in files:
            known = self._files.get(path)
            if known is None or known.stamp != _stamp(path) or (
                    known.stamp is not None and known.read_at - known.stamp[0] < RACY_NS):
                due.append(path)
        return due

    def poll(self) -> None:
        """Read what changed and hand it on: complete lists the first time, then events."""
        files = expand_paths(self.paths)  # manifest files only: a log file next to them is never read
        present = set(files)
        removed = [path for path in self._files if path not in present]
        due = self.due(files)
        if self._listed and not due and not removed:
            return
        found: dict[Identity, Any] = {}
        gone: set[Identity] = set()
        for path in removed:
            gone |= self._files.pop(path).identities
        for path in due:
            gone |= self._read(path, found)
        # An object that left one file but is (still) in another is not gone: read that one too.
        for path, state in self._files.items():
            if path not in due and state.identities & (gone - found.keys()):
                state.digest = None  # parse it even if its text is unchanged
                gone |= self._read(path, found)
        gone -= found.keys()
        gone -= {identity for state in self._files.values() for identity in state.identities}
        if not self._listed:
            self._emit_lists(found.values())
            self._listed = True
            return
        for identity, obj in found.items():
            self.emit(Change(identity[0], "MODIFIED", obj))
        for identity in sorted(gone):
            self.emit(Change(identity[0], "DELETED", _deleted(identity)))

    def _emit_lists(self, objects: Iterable[Any]) -> None:
        lists: dict[str, list[Any]] = {resource: [] for resource in _RESOURCES.values()}
        for obj in objects:
            lists[_RESOURCES[type(obj)]].append(obj)
        for resource, items in lists.items():
            self.emit(Replace(resource, tuple(items)))

    def _read(self, path: str, found: dict[Identity, Any]) -> set[Identity]:
        """Parse one file if its text changed: its objects go into `found`; returns the
        identities it held before and no longer does (none while it has problems)."""
        stamp, now, digest = _stamp(path), time.time_ns(), _digest(path)
        state = self._files.setdefault(path, _FileState(None, 0, None))
        state.stamp, state.read_at = stamp, now
        if digest is not None and digest == state.digest:
            return set()  # touched, not changed
        state.digest = digest
        errors: list[ManifestError] = []
        manifests = read_manifests([path], on_error=errors.append)
        self.parses += 1
        objects = [*manifests.services, *manifests.endpoint_slices,
                   *(node for node in manifests.nodes if node.metadata and node.metadata.name == self.node_name)]
        current = {_identity(obj): obj for obj in objects}
        found.update(current)
        outcome = "skipped; the objects of the file's last valid version stay" if state.clean_once else "skipped"
        problems = {str(e): Rejection(e.kind, str(e), outcome) for e in errors}
        for message, rejection in problems.items():
            if message not in state.problems:
                self.emit(rejection)
        state.problems = set(problems)
        if errors:
            state.identities |= current.keys()
            return set()
        gone = state.identities - current.keys()
        state.identities, state.clean_once = set(current), True
        return gone

    def run(self) -> None:
        while not self.stop.is_set():
            self.poll()
            self.stop.wait(self.interval)
