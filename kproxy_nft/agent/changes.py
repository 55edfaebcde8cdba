"""Change tracking: watch events in, "what changed since the last sync" out.

Like kube-proxy's `ServiceChangeTracker` / `EndpointsChangeTracker`: every Service and
EndpointSlice event updates the tracker's current view of that object and marks its Service as
changed; a sync takes a `Snapshot` — the whole `ClusterState` plus the set of services that
changed since the previous snapshot — so a partial sync recompiles and rewrites only those.
The rule writers never see events.

The state is kept per object (converted once, when it arrives) and per service, so building a
snapshot costs O(changed services), not O(cluster): unchanged services reuse the ServicePort
records and merged endpoint tuples of the previous snapshot. Pure: no I/O, no clock.

Invalid objects (the API server would have refused them; a manifest, an old API server or a
webhook-free test cluster may still hand one over) never stop the node: a new one is skipped,
and an invalid update of an object that was valid keeps the previous valid version, so nothing
already programmed is lost. Each one becomes a `Rejection`, reported once per distinct reason;
the agent takes them (`take_rejections`) to log and count.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubernetes.client import V1EndpointSlice, V1Service

from kproxy_nft.conflicts import ConflictIndex
from kproxy_nft.convert import (
    SERVICE_NAME_LABEL,
    EndpointsByPort,
    InvalidObject,
    convert_endpoint_slice,
    convert_service,
    merge_endpoints,
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


def _key(obj: V1Service | V1EndpointSlice) -> ServiceKey:
    meta = obj.metadata
    assert meta is not None and meta.name is not None
    return (meta.namespace or "default", meta.name)


def _slice_service(eps: V1EndpointSlice) -> ServiceKey | None:
    meta = eps.metadata
    service = (meta.labels or {}).get(SERVICE_NAME_LABEL) if meta else None
    return (meta.namespace or "default", service) if meta and service else None


class ChangeTracker:
    """Current Services and EndpointSlices, and the services touched since the last snapshot.

    Invalid objects are not applied (see the module docstring): `rejected` holds the reason
    for each object whose latest version is invalid, keyed by (kind, namespace, name).
    """

    def __init__(self) -> None:
        self._ports: dict[ServiceKey, tuple[ServicePort, ...]] = {}
        self._slices: dict[ServiceKey, EndpointsByPort] = {}  # slice key → endpoints by port
        self._slice_owner: dict[ServiceKey, ServiceKey] = {}  # slice key → its service
        self._slices_of: dict[ServiceKey, set[ServiceKey]] = {}  # service → its slice keys
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

    def service_updated(self, svc: V1Service) -> None:
        key = _key(svc)
        self.service_events += 1
        try:
            ports = convert_service(svc).ports
        except InvalidObject as e:
            self._reject("Service", key, e, previous=key in self._ports)
            return
        self.rejected.pop(("Service", *key), None)
        if self._ports.get(key) != ports:
            self._ports[key] = ports
            self._changed.add(key)

    def service_deleted(self, svc: V1Service) -> None:
        key = _key(svc)
        self.service_events += 1
        self.rejected.pop(("Service", *key), None)
        if self._ports.pop(key, None) is not None:
            self._changed.add(key)

    def slice_updated(self, eps: V1EndpointSlice) -> None:
        key = _key(eps)
        self.endpoint_events += 1
        owner = _slice_service(eps)
        try:
            endpoints = convert_endpoint_slice(eps) if owner else {}
        except InvalidObject as e:
            self._reject("EndpointSlice", key, e, previous=key in self._slices)
            return
        self.rejected.pop(("EndpointSlice", *key), None)
        if owner is not None and self._slice_owner.get(key) == owner and self._slices.get(key) == endpoints:
            return  # a resync or no-op update: nothing for the rules
        self._drop_slice(key)
        if owner is not None:
            self._slices[key] = endpoints
            self._slice_owner[key] = owner
            self._slices_of.setdefault(owner, set()).add(key)
            self._changed.add(owner)

    def slice_deleted(self, eps: V1EndpointSlice) -> None:
        self.endpoint_events += 1
        key = _key(eps)
        self.rejected.pop(("EndpointSlice", *key), None)
        self._drop_slice(key)

    def _reject(self, kind: str, key: ServiceKey, error: InvalidObject, previous: bool) -> None:
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
            self._slices_of[owner].discard(key)
            self._changed.add(owner)

    def replace_services(self, services: list[V1Service]) -> None:
        """A relist of Services: these are now all of them; any other was deleted."""
        live = {_key(s) for s in services}
        for key in [k for k in self._ports if k not in live]:
            del self._ports[key]
            self._changed.add(key)
        self._forget_rejected("Service", live)
        for svc in services:
            self.service_updated(svc)

    def replace_slices(self, slices: list[V1EndpointSlice]) -> None:
        """A relist of EndpointSlices: these are now all of them; any other was deleted."""
        live = {_key(s) for s in slices}
        for key in [k for k in self._slices if k not in live]:
            self._drop_slice(key)
        self._forget_rejected("EndpointSlice", live)
        for eps in slices:
            self.slice_updated(eps)

    def _forget_rejected(self, kind: str, live: set[ServiceKey]) -> None:
        for gone in [k for k in self.rejected if k[0] == kind and k[1:] not in live]:
            del self.rejected[gone]

    def replace_all(self, services: list[V1Service], slices: list[V1EndpointSlice]) -> None:
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
