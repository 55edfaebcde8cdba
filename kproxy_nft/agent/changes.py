"""Change tracking: watch events in, "what changed since the last sync" out.

Like kube-proxy's `ServiceChangeTracker` / `EndpointsChangeTracker`: every Service and
EndpointSlice event updates the tracker's current view of that object and marks its Service as
changed; a sync takes a `Snapshot` — the whole `ClusterState` plus the set of services that
changed since the previous snapshot — so a partial sync recompiles and rewrites only those.
The rule writers never see events.

The state is kept per object (converted once, when it arrives) and per service, so building a
snapshot costs O(changed services), not O(cluster): unchanged services reuse the ServicePort
records and merged endpoint tuples of the previous snapshot. Pure: no I/O, no clock.

Converting is `prepare_service` / `prepare_slice`: an object → the small frozen value the tracker
keeps of it (its key, its owning service, its converted ports or endpoints, or why it is invalid,
and the trigger-time annotation the agent reads). They are pure, so the API's reflectors call
them on their own threads, on each object of a list as it is decoded (`Reflector(prepare=...)`),
and each decoded object is dropped before the next is decoded: at 10,000
Services × 10 endpoints the EndpointSlice Structs were ~98 MiB, all alive at once until the
loop had converted the whole list. The tracker prepares whatever it is handed, and a prepared
value prepares to itself, so callers with raw objects (manifests, tests) go the same one way;
its state stays in the loop's thread.

Invalid objects (the API server would have refused them; a manifest, an old API server or a
webhook-free test cluster may still hand one over) never stop the node: a new one is skipped,
and an invalid update of an object that was valid keeps the previous valid version, so nothing
already programmed is lost. Each one becomes a `Rejection`, reported once per distinct reason;
the agent takes them (`take_rejections`) to log and count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubernetes.client import V1EndpointSlice, V1Service

from kproxy_nft.conflicts import ConflictIndex
from kproxy_nft.convert import (
    SERVICE_NAME_LABEL,
    EndpointsByPort,
    InvalidObject,
    convert_endpoint_slice,
    convert_service,
    kept_name,
    merge_endpoints,
    own_copy,
)
from kproxy_nft.model import ClusterState, Endpoint, ServicePort, ServicePortName
from kproxy_nft.sources.events import Rejection

ServiceKey = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class Snapshot:
    """The cluster as of one sync, and which services changed since the previous snapshot."""

    state: ClusterState
    changed: frozenset[ServiceKey]
    full: bool  # the first snapshot, or one after `mark_all_changed`
    # The service ports of `changed` services, before and after: what a partial sync recompiles.
    changed_ports: frozenset[ServicePortName] = frozenset()


TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"


@dataclass(frozen=True, slots=True)
class PreparedService:
    """What the tracker keeps of a Service: its converted ports, or why it is invalid."""

    key: ServiceKey
    ports: tuple[ServicePort, ...] | None  # None: invalid
    # The `InvalidObject`'s text, not the exception: its traceback's frames hold the object.
    error: str = ""


@dataclass(frozen=True, slots=True)
class PreparedSlice:
    """What the tracker (and the agent) keep of an EndpointSlice."""

    key: ServiceKey
    service: ServiceKey | None  # its `kubernetes.io/service-name`; None: not converted, not applied
    endpoints: EndpointsByPort | None  # None: invalid
    error: str = ""
    trigger_time: float | None = None  # `TRIGGER_TIME`, as a Unix time (network programming latency)


def _object_key(obj: Any, shared_name: bool = False) -> ServiceKey:
    """(namespace, name), kept as long as the object: not the decoded object's strings (see
    `convert.own_copy`). A Service's name is interned (`shared_name`): its `ServicePortName`s
    and its slices' keys hold the same string."""
    meta = obj.metadata
    assert meta is not None and meta.name is not None
    name = kept_name(meta.name) if shared_name else own_copy(meta.name)
    return (kept_name(meta.namespace or "default"), name)


def _key(obj: Any) -> ServiceKey:
    return obj.key if isinstance(obj, PreparedService | PreparedSlice) else _object_key(obj)


def _slice_service(eps: V1EndpointSlice) -> ServiceKey | None:
    meta = eps.metadata
    service = (meta.labels or {}).get(SERVICE_NAME_LABEL) if meta else None
    return (kept_name(meta.namespace or "default"), kept_name(service)) if meta and service else None


def _trigger_time(eps: V1EndpointSlice) -> float | None:
    meta = eps.metadata
    stamp = (meta.annotations or {}).get(TRIGGER_TIME) if meta else None
    if stamp:
        with contextlib.suppress(ValueError):  # a malformed annotation is not worth a failed sync
            return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    return None


def prepare_service(svc: V1Service | PreparedService) -> PreparedService:
    """A Service converted (pure; a prepared one is returned as it is)."""
    if isinstance(svc, PreparedService):
        return svc
    key = _object_key(svc, shared_name=True)
    try:
        return PreparedService(key, convert_service(svc).ports)
    except InvalidObject as e:
        return PreparedService(key, None, str(e))


def prepare_slice(eps: V1EndpointSlice | PreparedSlice) -> PreparedSlice:
    """An EndpointSlice converted (pure; a prepared one is returned as it is). A slice of no
    service is not converted: nothing would use it."""
    if isinstance(eps, PreparedSlice):
        return eps
    key, owner, trigger_time = _object_key(eps), _slice_service(eps), _trigger_time(eps)
    try:
        return PreparedSlice(key, owner, convert_endpoint_slice(eps) if owner else {}, "", trigger_time)
    except InvalidObject as e:
        return PreparedSlice(key, owner, None, str(e), trigger_time)


# By resource name: what the API's reflectors run on each object they hand on (`run_agent`).
PREPARE: dict[str, Callable[[Any], Any]] = {"services": prepare_service, "endpointslices": prepare_slice}


class ChangeTracker:
    """Current Services and EndpointSlices, and the services touched since the last snapshot.

    Invalid objects are not applied (see the module docstring): `rejected` holds the reason
    for each object whose latest version is invalid, keyed by (kind, namespace, name).
    """

    def __init__(self) -> None:
        self._ports: dict[ServiceKey, tuple[ServicePort, ...]] = {}
        self._slices: dict[ServiceKey, EndpointsByPort] = {}  # slice key → endpoints by port
        self._slice_owner: dict[ServiceKey, ServiceKey] = {}  # slice key → its service
        # service → its slice keys; a tuple, since most services have one slice (a set each: 2 MiB at 10k)
        self._slices_of: dict[ServiceKey, tuple[ServiceKey, ...]] = {}
        self._changed: set[ServiceKey] = set()
        self._full = True
        self._services: dict[ServicePortName, ServicePort] = {}
        self._endpoints: dict[ServicePortName, tuple[Endpoint, ...]] = {}
        self._names_of: dict[ServiceKey, tuple[ServicePortName, ...]] = {}  # in the last snapshot
        self._conflicts = ConflictIndex()
        self._conflicts_reported: set[str] = set()
        self._new_conflicts: list[str] = []
        self.rejected: dict[tuple[str, str, str], str] = {}
        self._rejections: list[Rejection] = []  # not yet taken
        self.service_events = 0
        self.endpoint_events = 0

    # -- events -----------------------------------------------------------------------------

    def service_updated(self, svc: V1Service | PreparedService) -> None:
        prepared = prepare_service(svc)
        key = prepared.key
        self.service_events += 1
        if prepared.ports is None:
            self._reject("Service", key, prepared.error, previous=key in self._ports)
            return
        self.rejected.pop(("Service", *key), None)
        if self._ports.get(key) != prepared.ports:
            self._ports[key] = prepared.ports
            self._changed.add(key)

    def service_deleted(self, svc: V1Service | PreparedService) -> None:
        key = _key(svc)
        self.service_events += 1
        self.rejected.pop(("Service", *key), None)
        if self._ports.pop(key, None) is not None:
            self._changed.add(key)

    def slice_updated(self, eps: V1EndpointSlice | PreparedSlice) -> None:
        prepared = prepare_slice(eps)
        key, owner, endpoints = prepared.key, prepared.service, prepared.endpoints
        self.endpoint_events += 1
        if endpoints is None:
            self._reject("EndpointSlice", key, prepared.error, previous=key in self._slices)
            return
        self.rejected.pop(("EndpointSlice", *key), None)
        if owner is not None and self._slice_owner.get(key) == owner and self._slices.get(key) == endpoints:
            return  # a resync or no-op update: nothing for the rules
        self._drop_slice(key)
        if owner is not None:
            self._slices[key] = endpoints
            self._slice_owner[key] = owner
            self._slices_of[owner] = (*self._slices_of.get(owner, ()), key)  # dropped just before
            self._changed.add(owner)

    def slice_deleted(self, eps: V1EndpointSlice | PreparedSlice) -> None:
        self.endpoint_events += 1
        key = _key(eps)
        self.rejected.pop(("EndpointSlice", *key), None)
        self._drop_slice(key)

    def _reject(self, kind: str, key: ServiceKey, error: str, previous: bool) -> None:
        """Leave the object as it was (its previous valid version, or absent); report a new reason once."""
        message = f"{kind} {key[0]}/{key[1]}: {error}"
        if self.rejected.get((kind, *key)) != message:  # a relist repeats it: no news
            self.rejected[(kind, *key)] = message
            self._rejections.append(Rejection(kind, message, "kept its previous version" if previous else "skipped"))

    def take_rejections(self) -> list[Rejection]:
        """The rejections since the last call (each distinct reason of each object once)."""
        taken, self._rejections = self._rejections, []
        return taken

    def _drop_slice(self, key: ServiceKey) -> None:
        owner = self._slice_owner.pop(key, None)
        self._slices.pop(key, None)
        if owner is not None:
            others = tuple(k for k in self._slices_of.pop(owner, ()) if k != key)
            if others:
                self._slices_of[owner] = others
            self._changed.add(owner)

    def replace_services(self, services: Iterable[V1Service | PreparedService]) -> None:
        """A relist of Services: these are now all of them; any other was deleted."""
        prepared = [prepare_service(s) for s in services]
        live = {p.key for p in prepared}
        for key in [k for k in self._ports if k not in live]:
            del self._ports[key]
            self._changed.add(key)
        self._forget_rejected("Service", live)
        for p in prepared:
            self.service_updated(p)

    def replace_slices(self, slices: Iterable[V1EndpointSlice | PreparedSlice]) -> None:
        """A relist of EndpointSlices: these are now all of them; any other was deleted."""
        prepared = [prepare_slice(s) for s in slices]
        live = {p.key for p in prepared}
        for key in [k for k in self._slices if k not in live]:
            self._drop_slice(key)
        self._forget_rejected("EndpointSlice", live)
        for p in prepared:
            self.slice_updated(p)

    def _forget_rejected(self, kind: str, live: set[ServiceKey]) -> None:
        for gone in [k for k in self.rejected if k[0] == kind and k[1:] not in live]:
            del self.rejected[gone]

    def replace_all(self, services: Iterable[V1Service | PreparedService],
                    slices: Iterable[V1EndpointSlice | PreparedSlice]) -> None:
        self.replace_services(services)
        self.replace_slices(slices)

    def mark_all_changed(self) -> None:
        """Make the next snapshot a full one (after a failed sync, or a periodic full resync)."""
        self._full = True

    @property
    def pending(self) -> int:
        """Services changed since the last snapshot."""
        return len(self._changed)

    # -- snapshots --------------------------------------------------------------------------

    def _resolve_conflicts(self, changed: set[ServicePortName]) -> set[ServicePortName]:
        """Give each contested destination to one service port (`conflicts`), in O(changed).

        `self._services` holds the ports as converted for the changed names; they go through
        the index, and every port whose programmed form the change affected is replaced by its
        resolved one. Returns the other service ports whose rules changed that way.
        """
        affected: set[ServicePortName] = set()
        for name in changed:
            affected |= self._conflicts.update(name, self._services.get(name))
        also_changed = set()
        for name in affected:
            resolved = self._conflicts.resolved(name)
            if resolved is not None and self._services.get(name) != resolved:
                also_changed.add(name)
                self._services[name] = resolved
        if self._conflicts.contested or self._conflicts_reported:
            current = {str(c) for c in self._conflicts.conflicts()}
            self._new_conflicts += sorted(current - self._conflicts_reported)
            self._conflicts_reported = current
        return also_changed - changed

    def take_conflicts(self) -> list[str]:
        """Destinations claimed twice that appeared since the last call (one warning each)."""
        found, self._new_conflicts = self._new_conflicts, []
        return found

    def snapshot(self) -> Snapshot:
        """The current state and the services changed since the previous snapshot.

        Only changed services are re-merged; the dicts are copied (O(n) pointer copies, no
        conversion) so earlier snapshots stay valid for whoever still holds them.
        """
        changed_ports: set[ServicePortName] = set()
        for key in self._changed:
            for name in self._names_of.pop(key, ()):
                changed_ports.add(name)
                del self._services[name]
                self._endpoints.pop(name, None)
            ports = self._ports.get(key, ())
            changed_ports.update(port.name for port in ports)
            self._names_of[key] = tuple(port.name for port in ports)
            merged = merge_endpoints(self._slices[s] for s in sorted(self._slices_of.get(key, ())))
            for port in ports:
                self._services[port.name] = port
                if port.name in merged:
                    self._endpoints[port.name] = merged[port.name]
        changed_ports |= self._resolve_conflicts(changed_ports)
        changed, full = frozenset(self._changed), self._full
        self._changed.clear()
        self._full = False
        state = ClusterState(dict(self._services), dict(self._endpoints))
        return Snapshot(state, changed, full, frozenset(changed_ports))
