"""What a change of Services and EndpointSlices does on this node, in Service terms (pure).

`kproxy-nft diff OLD NEW` answers, in CI, "what will this manifest change do to the node?".
Per service port this module computes:

* the fields that differ (type, traffic policies, IPs, node port, affinity, …), by their API
  names; a port only in OLD or only in NEW is `removed` or `added`;
* per IP family, the endpoints `selection.categorize_endpoints` picks on this node (its
  `all_reachable` set: every endpoint that gets a rule), added and removed;
* the frontends (cluster IP, external IPs, load-balancer IPs, node port) that start or stop
  answering: "answering" is `conntrack`'s "served", so a node port under
  externalTrafficPolicy Local answers only while this node has a local endpoint;
* the UDP/SCTP flows the change will clear (`conntrack.stale_flow_filters`, as the agent's
  cleanup after the sync).

Node-level differences (a Node object or ServiceCIDR among the manifests that changed) are
listed too. A port whose objects changed without any visible effect (say, a remote endpoint's
zone) is left out: the report says what the node will do differently, and nothing else.

Deliberately not here: reading manifests, and the rule-level change, which needs a kernel or
its fake (`diff_command` computes it and hands it in as `RuleChange`); rendering is `diff.render`.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from kproxy_nft.conntrack import FlowFilter, Frontend, canonical_ip, served_frontends, stale_flow_filters
from kproxy_nft.model import ClusterState, IPFamily, NodeContext, ServicePort, ServicePortName, sort_key
from kproxy_nft.selection import categorize_endpoints, endpoints_of_family

# A field's value as JSON shows it: enums as their text, tuples as lists.
Value = str | int | bool | list[str] | None

# ServicePort field → the name the Service API (or `kubectl describe`) gives it. Every field but
# `name` is listed: a test checks it, so a new model field cannot be silently left out of diffs.
SERVICE_FIELDS: Mapping[str, str] = {
    "service_type": "type",
    "cluster_ips": "clusterIPs",
    "port": "port",
    "target_port": "targetPort",
    "node_port": "nodePort",
    "external_ips": "externalIPs",
    "load_balancer_ips": "loadBalancer ingress IPs",
    "load_balancer_source_ranges": "loadBalancerSourceRanges",
    "external_traffic_policy": "externalTrafficPolicy",
    "internal_traffic_policy": "internalTrafficPolicy",
    "session_affinity_seconds": "sessionAffinity ClientIP timeout",
    "health_check_node_port": "healthCheckNodePort",
    "traffic_distribution": "trafficDistribution",
}

# NodeContext field → its flag or object name. The settings flags are the same for OLD and NEW,
# so these differ only through the manifests (a Node object, ServiceCIDR objects).
NODE_FIELDS: Mapping[str, str] = {
    "hostname": "hostname",
    "node_ips": "node IPs",
    "zone": "zone",
    "cluster_cidrs": "cluster CIDRs",
    "masquerade_all": "masquerade-all",
    "masquerade_bit": "masquerade bit",
    "nodeport_addresses": "nodeport-addresses",
    "localhost_nodeports": "localhost nodeports",
    "service_cidrs": "service CIDRs",
    "local_addresses": "local addresses",
    "detect_local_mode": "detect-local-mode",
    "pod_cidrs": "pod CIDRs",
    "pod_bridge_interface": "pod bridge interface",
    "pod_interface_name_prefix": "pod interface name prefix",
}


class Status(enum.StrEnum):
    ADDED = "added"
    REMOVED = "removed"
    CHANGED = "changed"


class Answering(enum.StrEnum):
    STARTS = "starts answering"
    STOPS = "stops answering"


@dataclass(frozen=True)
class FieldChange:
    field: str
    old: Value
    new: Value


@dataclass(frozen=True)
class EndpointChange:
    """The endpoints of one family that gain or lose their rule on this node (`ip:port` text)."""

    family: IPFamily
    added: tuple[str, ...]
    removed: tuple[str, ...]


@dataclass(frozen=True)
class FrontendChange:
    """A frontend that starts or stops answering; `kind`: cluster IP, external IP, load-balancer IP or node port."""

    frontend: Frontend
    kind: str
    change: Answering


@dataclass(frozen=True)
class ServicePortDiff:
    """What changes for one service port on this node. `service_type`: NEW's (OLD's when removed)."""

    name: ServicePortName
    status: Status
    service_type: str
    fields: tuple[FieldChange, ...] = ()
    endpoints: tuple[EndpointChange, ...] = ()
    frontends: tuple[FrontendChange, ...] = ()
    stale_flows: tuple[FlowFilter, ...] = ()

    @property
    def is_visible(self) -> bool:
        """Something the node does differently (an added or removed port always is)."""
        return self.status is not Status.CHANGED or bool(
            self.fields or self.endpoints or self.frontends or self.stale_flows)


@dataclass(frozen=True)
class StateDiff:
    """The Service-level change, service ports in name order."""

    node: tuple[FieldChange, ...] = ()
    services: tuple[ServicePortDiff, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.node and not self.services


@dataclass(frozen=True)
class RuleChange:
    """The rule-level change as `apply --dry-run` prints it: its summary lines and payload.

    `source`: "offline" (OLD applied to an in-memory kernel, NEW planned against it) or
    "live" (NEW planned against the rules the kernel holds now).
    """

    mode: str
    source: str
    is_empty: bool
    lines: tuple[str, ...]
    payload: str


@dataclass(frozen=True)
class DiffReport:
    """Everything `kproxy-nft diff` shows; `state` is None with --live (the kernel holds rules,
    not Services, so there is no OLD to compare Services with)."""

    state: StateDiff | None
    rules: RuleChange

    @property
    def differs(self) -> bool:
        return (self.state is not None and not self.state.is_empty) or not self.rules.is_empty


def as_value(value: object) -> Value:
    """A model value as JSON shows it (enums are str subclasses and pass as their text)."""
    if isinstance(value, tuple):
        return [str(v) for v in value]
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


def field_changes(old: object, new: object, names: Mapping[str, str]) -> tuple[FieldChange, ...]:
    """The `names` fields of two dataclass values that differ, in `names` order."""
    return tuple(
        FieldChange(label, as_value(getattr(old, attr)), as_value(getattr(new, attr)))
        for attr, label in names.items()
        if getattr(old, attr) != getattr(new, attr)
    )


def _reachable(svc: ServicePort | None, state: ClusterState, node: NodeContext, family: IPFamily) -> tuple[str, ...]:
    """The `ip:port` of every endpoint that gets a rule of `family` on this node, in order."""
    if svc is None or svc.cluster_ip(family) is None:
        return ()  # the compilers program nothing for a family without a cluster IP
    endpoints = endpoints_of_family(state.endpoints_of(svc.name), family)
    return tuple(ep.address for ep in categorize_endpoints(svc, endpoints, node, family).all_reachable)


def _endpoint_changes(name: ServicePortName, old: ClusterState, new: ClusterState, old_node: NodeContext,
                      new_node: NodeContext, families: Collection[IPFamily]) -> tuple[EndpointChange, ...]:
    changes = []
    for family in sorted(families):
        before = _reachable(old.services.get(name), old, old_node, family)
        after = _reachable(new.services.get(name), new, new_node, family)
        had, has = frozenset(before), frozenset(after)
        added = tuple(a for a in after if a not in had)
        removed = tuple(b for b in before if b not in has)
        if added or removed:
            changes.append(EndpointChange(family, added, removed))
    return tuple(changes)


def _frontend_kind(svc: ServicePort, frontend: Frontend) -> str:
    if frontend.ip is None:
        return "node port"
    cluster_ip = svc.cluster_ip(frontend.family)
    if cluster_ip is not None and frontend.ip == canonical_ip(cluster_ip):
        return "cluster IP"
    if frontend.ip in {canonical_ip(ip) for ip in svc.external_ips_of(frontend.family)}:
        return "external IP"
    return "load-balancer IP"


def _answering(svc: ServicePort | None, state: ClusterState, node: NodeContext,
               families: Collection[IPFamily]) -> dict[Frontend, tuple[str, bool]]:
    """Frontend → (kind, answered on this node) for one service port of `state` (none when missing)."""
    if svc is None:
        return {}
    served = served_frontends(svc, state.endpoints_of(svc.name), node)
    return {fe: (_frontend_kind(svc, fe), answers) for fe, answers in served.items() if fe.family in families}


def _frontend_changes(before: Mapping[Frontend, tuple[str, bool]],
                      after: Mapping[Frontend, tuple[str, bool]]) -> tuple[FrontendChange, ...]:
    """Frontends whose answering differs (one that exists on one side only does not answer on the other)."""
    changes = []
    for fe in sorted(before.keys() | after.keys(), key=Frontend.sort_key):
        kind, was = before.get(fe, ("", False))
        kind, now = after.get(fe, (kind, False))
        if was != now:
            changes.append(FrontendChange(fe, kind, Answering.STARTS if now else Answering.STOPS))
    return tuple(changes)


def _changed_names(old: ClusterState, new: ClusterState, node_changed: bool) -> list[ServicePortName]:
    """Service ports whose Service or endpoints differ, in name order: all of them when the node
    changed (its name, zone or addresses decide which endpoints are local or hinted for it)."""
    names = old.services.keys() | new.services.keys()
    return sorted(
        (n for n in names
         if node_changed or old.services.get(n) != new.services.get(n) or old.endpoints_of(n) != new.endpoints_of(n)),
        key=sort_key,
    )


def diff_states(old: ClusterState, new: ClusterState, old_node: NodeContext, new_node: NodeContext,
                families: Collection[IPFamily]) -> StateDiff:
    """The Service-level change from `old` to `new` on this node (see the module docstring).

    Each side is seen with its own node (a Node object among the manifests may differ); the
    flows cleared are those the agent, running with NEW's node, would delete after the sync.
    Only `families` (the ones the node programs) are looked at.
    """
    names = _changed_names(old, new, old_node != new_node)
    flows = [f for f in stale_flow_filters(old, new, new_node, names) if f.frontend.family in families]
    services = []
    for name in names:
        old_svc, new_svc = old.services.get(name), new.services.get(name)
        before = _answering(old_svc, old, old_node, families)
        after = _answering(new_svc, new, new_node, families)
        own = before.keys() | after.keys()  # a flow is this port's when it goes to one of its frontends
        shown = new_svc or old_svc
        assert shown is not None  # a changed name is in one state at least
        entry = ServicePortDiff(
            name=name,
            status=Status.REMOVED if new_svc is None else Status.ADDED if old_svc is None else Status.CHANGED,
            service_type=shown.service_type,
            fields=() if old_svc is None or new_svc is None else field_changes(old_svc, new_svc, SERVICE_FIELDS),
            endpoints=_endpoint_changes(name, old, new, old_node, new_node, families),
            frontends=_frontend_changes(before, after),
            stale_flows=tuple(f for f in flows if f.frontend in own),
        )
        if entry.is_visible:
            services.append(entry)
    return StateDiff(field_changes(old_node, new_node, NODE_FIELDS), tuple(services))

