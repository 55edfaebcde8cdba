"""Kubernetes API objects → the proxy model, validated the way the API server would.

Both sources meet here: manifests read from files (`sources.manifests`) and objects from the
API watch arrive as the official client's typed models (`V1Service`, `V1EndpointSlice`), and
the same functions turn them into `ServicePort`s and `Endpoint`s.

Every field read is checked with the API server's rule (`validation`), and the first problem
is reported as an `InvalidObject` naming the field path, e.g. `spec.ports[1].port`.
Pure: no I/O.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes.client import (
    CoreV1EndpointPort,
    V1Endpoints,
    V1EndpointSlice,
    V1Service,
)

from kproxy_nft import validation as v
from kproxy_nft.model import (
    ClusterState,
    Endpoint,
    IPFamily,
    Protocol,
    ServicePort,
    ServicePortName,
    TrafficPolicy,
    ip_family,
)
from kproxy_nft.validation import DNS1035_LABEL, DNS1123_LABEL, DNS1123_SUBDOMAIN, InvalidObject, check, shown

__all__ = [  # InvalidObject is re-exported: callers catch it from here
    "InvalidObject", "ServiceInfo", "NodeInfo", "build_state", "convert_endpoint_slice", "convert_node",
    "convert_service", "convert_service_cidr", "endpoints_to_slice", "merge_endpoints", "service_is_proxied",
]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
ZONE_LABEL = "topology.kubernetes.io/zone"
DEFAULT_AFFINITY_SECONDS = 10800  # v1.DefaultClientIPServiceAffinitySeconds
MAX_AFFINITY_SECONDS = 86400
_SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
_TRAFFIC_DISTRIBUTIONS = ("PreferClose", "PreferSameZone", "PreferSameNode")
_IP_MODES = ("VIP", "Proxy")
# discovery validation: maxEndpoints, maxAddresses, maxPorts.
MAX_SLICE_ENDPOINTS = 1000
MAX_ENDPOINT_ADDRESSES = 100
MAX_SLICE_PORTS = 100


def convert_service_cidr(obj: Any) -> tuple[str, ...]:
    """The CIDRs of a ServiceCIDR (networking.k8s.io/v1): the ranges cluster IPs come from.

    The API server allows one or two, one per family, each a canonical network address
    (`ValidateServiceCIDR`); the proxy only needs them for the nftables mode's drop of traffic
    to unallocated service IPs.
    """
    if obj.metadata is not None and obj.metadata.name is not None:
        v.name(obj.metadata.name, "metadata.name", DNS1123_SUBDOMAIN, "ServiceCIDR name", 253)
    spec = obj.spec
    cidrs = (spec.cidrs if spec is not None else None) or []
    check(bool(cidrs), "spec.cidrs", "required value")
    check(len(cidrs) <= 2, "spec.cidrs", "may hold at most two CIDRs (one per family)")
    checked = tuple(v.cidr(c, f"spec.cidrs[{i}]", strict=True) for i, c in enumerate(cidrs))
    check(len({ip_family(c) for c in checked}) == len(checked), "spec.cidrs", "must hold one CIDR per IP family")
    return checked


_PROTOCOLS = {protocol.value: protocol for protocol in Protocol}  # Protocol(value) is slow in Python 3.11


def _protocol(value: str | None, field: str) -> Protocol:
    if value is None:
        return Protocol.TCP
    protocol = _PROTOCOLS.get(value) if isinstance(value, str) else None
    if protocol is None:
        raise InvalidObject(field, f"unsupported protocol {shown(value)} (TCP, UDP or SCTP)")
    return protocol


def _target_port(value: int | str | None, port: int, field: str) -> int | str:
    if value is None:
        return port  # the API server defaults targetPort to port
    return v.port_name_or_number(value, field)


def _labels(obj: Any) -> Mapping[str, str]:
    return (obj.metadata.labels if obj.metadata else None) or {}


def _namespace(obj: Any) -> str:
    namespace = obj.metadata.namespace or "default"
    return kept_name(v.name(namespace, "metadata.namespace", DNS1123_LABEL, "namespace name", 63))


# ---------------------------------------------------------------------------------------------
# Services
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceInfo:
    """A validated Service: its identity and the per-port proxy records (empty when not proxied)."""

    namespace: str
    name: str
    ports: tuple[ServicePort, ...]
    proxied: bool


def service_is_proxied(svc: V1Service) -> bool:
    """Whether kube-proxy programs rules for this Service at all.

    Headless and ExternalName services only live in DNS, and a `service-proxy-name` label
    hands the Service to another proxy (kube-proxy's informer filters those out).
    """
    spec = svc.spec
    if spec is None:
        return False
    if SERVICE_PROXY_NAME_LABEL in _labels(svc) or HEADLESS_LABEL in _labels(svc):
        return False
    if spec.type == "ExternalName":
        return False
    return spec.cluster_ip not in (None, "", "None")


def convert_service(svc: V1Service) -> ServiceInfo:
    """Validate a Service and turn each of its ports into a `ServicePort`."""
    if svc.metadata is None:
        raise InvalidObject("metadata", "required value")
    name = kept_name(v.name(svc.metadata.name, "metadata.name", DNS1035_LABEL, "Service name (DNS-1035 label)", 63))
    namespace = _namespace(svc)
    spec = svc.spec
    if spec is None:
        raise InvalidObject("spec", "required value")
    svc_type = spec.type or "ClusterIP"
    v.one_of(svc_type, _SERVICE_TYPES, "spec.type")
    external_access = svc_type in ("NodePort", "LoadBalancer")

    cluster_ips = _cluster_ips(spec)
    headless = spec.cluster_ip == "None"
    ports = spec.ports or []
    check(bool(ports) or headless or svc_type == "ExternalName", "spec.ports", "required value")
    _check_port_names(ports)

    external_ips = v.ip_list(spec.external_ips, "spec.externalIPs[{i}]")
    source_ranges = tuple(
        v.cidr(c.strip() if isinstance(c, str) else c, f"spec.loadBalancerSourceRanges[{i}]")
        for i, c in enumerate(spec.load_balancer_source_ranges or [])
    )
    check(not source_ranges or svc_type == "LoadBalancer", "spec.loadBalancerSourceRanges",
          "may only be used when `type` is 'LoadBalancer'")
    lb_ips = _load_balancer_ips(svc)
    affinity = _affinity_seconds(spec)
    external_policy = _policy(spec.external_traffic_policy, "spec.externalTrafficPolicy")
    if not external_access and not spec.external_ips:
        # kube-proxy honours externalTrafficPolicy only for externally accessible services
        # (`apiservice.ExternalPolicyLocal`): node ports, load balancers, or external IPs.
        external_policy = TrafficPolicy.CLUSTER
    internal_policy = _policy(spec.internal_traffic_policy, "spec.internalTrafficPolicy")
    distribution = spec.traffic_distribution
    if distribution is not None:
        v.one_of(distribution, _TRAFFIC_DISTRIBUTIONS, "spec.trafficDistribution", ", ".join(_TRAFFIC_DISTRIBUTIONS))
    health_check = spec.health_check_node_port
    if health_check is not None:
        # The API server's rule: only a LoadBalancer with externalTrafficPolicy Local has one
        # (kube-proxy's `NeedsHealthCheck`).
        check(svc_type == "LoadBalancer" and external_policy is TrafficPolicy.LOCAL, "spec.healthCheckNodePort",
              "may only be set when type is 'LoadBalancer' and externalTrafficPolicy is 'Local'")
        health_check = v.port(health_check, "spec.healthCheckNodePort")

    records = []
    for i, p in enumerate(ports):
        field = f"spec.ports[{i}]"
        port = v.port(p.port, f"{field}.port")
        node_port = None
        if p.node_port is not None:
            node_port = v.port(p.node_port, f"{field}.nodePort")
            check(external_access, f"{field}.nodePort", f"may not be used when `type` is {shown(svc_type)}")
        records.append(
            ServicePort(
                name=ServicePortName(
                    namespace, name, kept_name(p.name or ""), _protocol(p.protocol, f"{field}.protocol")
                ),
                port=port,
                target_port=_target_port(p.target_port, port, f"{field}.targetPort"),
                service_type=svc_type,
                cluster_ips=cluster_ips,
                node_port=node_port,
                external_ips=external_ips,
                load_balancer_ips=lb_ips if svc_type == "LoadBalancer" else (),
                load_balancer_source_ranges=source_ranges,
                external_traffic_policy=external_policy,
                internal_traffic_policy=internal_policy,
                session_affinity_seconds=affinity,
                health_check_node_port=health_check,
                traffic_distribution=distribution,
            )
        )
    # Two ports on one number and protocol would shadow each other ("Duplicate value").
    v.duplicates([(r.port, r.protocol.value) for r in records], "spec.ports[{i}]", "port/protocol")
    v.duplicates([(r.node_port, r.protocol.value) if r.node_port else None for r in records],
                 "spec.ports[{i}].nodePort", "nodePort/protocol")
    proxied = service_is_proxied(svc)
    return ServiceInfo(namespace, name, tuple(records) if proxied else (), proxied)


def _cluster_ips(spec: Any) -> tuple[str, ...]:
    if spec.cluster_ip in (None, "", "None"):
        check(not spec.cluster_ips or spec.cluster_ips == ["None"], "spec.clusterIPs", "must be empty or None")
        return ()
    primary = v.service_ip(spec.cluster_ip, "spec.clusterIP")
    ips = list(spec.cluster_ips or [primary])
    check(ips[0] == primary, "spec.clusterIPs[0]", f"must match spec.clusterIP {shown(primary)}")
    check(len(ips) <= 2, "spec.clusterIPs", "may hold at most two addresses (one per family)")
    checked = v.ip_list(ips, "spec.clusterIPs[{i}]", v.service_ip)
    check(len({ip_family(ip) for ip in checked}) == len(checked), "spec.clusterIPs",
          "must hold one address per IP family")
    return checked


def _check_port_names(ports: Sequence[Any]) -> None:
    names = []
    for i, p in enumerate(ports):
        field = f"spec.ports[{i}].name"
        if len(ports) > 1:
            check(bool(p.name), field, "required when the Service has more than one port")
        v.optional_name(p.name, field, DNS1123_LABEL, "port name (DNS-1123 label)", 63)
        names.append((p.name,) if p.name else None)
    v.duplicates(names, "spec.ports[{i}].name", "port name")


def _load_balancer_ips(svc: V1Service) -> tuple[str, ...]:
    """LoadBalancer ingress IPs that kube-proxy programs: only `ipMode` unset or `VIP`.

    With `ipMode: Proxy` the load balancer delivers traffic to the node with the node as
    destination, so capturing the LB IP on the node would bypass it (KEP-1860).
    """
    status = svc.status
    ingress = (status.load_balancer.ingress if status and status.load_balancer else None) or []
    ips = []
    for i, ing in enumerate(ingress):
        field = f"status.loadBalancer.ingress[{i}]"
        v.one_of(ing.ip_mode, (None, *_IP_MODES), f"{field}.ipMode")
        check(ing.ip_mode is None or bool(ing.ip), f"{field}.ipMode", "may only be set when `ip` is set")
        if ing.ip:
            ip = v.service_ip(ing.ip, f"{field}.ip")
            if ing.ip_mode in (None, "VIP"):
                ips.append(ip)
    return tuple(ips)


def _affinity_seconds(spec: Any) -> int | None:
    affinity = spec.session_affinity or "None"
    v.one_of(affinity, ("None", "ClientIP"), "spec.sessionAffinity")
    if affinity == "None":
        return None
    config = spec.session_affinity_config
    seconds = None
    if config and config.client_ip:
        seconds = config.client_ip.timeout_seconds
    if seconds is None:
        return DEFAULT_AFFINITY_SECONDS
    check(
        isinstance(seconds, int) and 0 < seconds <= MAX_AFFINITY_SECONDS,
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        f"must be between 1 and {MAX_AFFINITY_SECONDS}, got {shown(seconds)}",
    )
    return int(seconds)


def _policy(value: str | None, field: str) -> TrafficPolicy:
    if value is None:
        return TrafficPolicy.CLUSTER
    v.one_of(value, ("Cluster", "Local"), field, "Cluster or Local")
    return TrafficPolicy(value)


# ---------------------------------------------------------------------------------------------
# EndpointSlices
# ---------------------------------------------------------------------------------------------

EndpointsByPort = dict[ServicePortName, tuple[Endpoint, ...]]


def convert_endpoint_slice(eps: V1EndpointSlice) -> EndpointsByPort:
    """Validate an EndpointSlice and give its endpoints per service port.

    Like kube-proxy, only an endpoint's first address is used, ports without a name or a
    number are skipped, and FQDN slices are ignored. Condition defaults follow the API
    documentation: `ready` unset means ready, `serving` unset means the value of `ready`.
    """
    if eps.metadata is None:
        raise InvalidObject("metadata", "required value")
    v.name(eps.metadata.name, "metadata.name", DNS1123_SUBDOMAIN, "EndpointSlice name", 253)
    namespace = _namespace(eps)
    service = _labels(eps).get(SERVICE_NAME_LABEL)
    check(
        bool(service),
        f"metadata.labels[{SERVICE_NAME_LABEL}]",
        "required: kube-proxy matches a slice to its Service by this label",
    )
    service = kept_name(v.name(service, f"metadata.labels[{SERVICE_NAME_LABEL}]", DNS1035_LABEL, "Service name", 63))
    address_type = eps.address_type
    v.one_of(address_type, ("IPv4", "IPv6", "FQDN"), "addressType")
    if address_type == "FQDN":
        return {}

    slice_endpoints = eps.endpoints or []
    ipv6 = address_type == "IPv6"
    check(len(slice_endpoints) <= MAX_SLICE_ENDPOINTS, "endpoints", f"must have at most {MAX_SLICE_ENDPOINTS} items")
    # (ip, conditions and topology) of each endpoint; the port comes from the slice's ports.
    endpoints = [(None if ipv6 else _plain_endpoint(ep)) or _checked_endpoint(ep, i, address_type)
                 for i, ep in enumerate(slice_endpoints)]

    result: EndpointsByPort = {}
    slice_ports = eps.ports or []
    check(len(slice_ports) <= MAX_SLICE_PORTS, "ports", f"must have at most {MAX_SLICE_PORTS} items")
    names = []
    for i, port in enumerate(slice_ports):
        field = f"ports[{i}]"
        protocol = _protocol(port.protocol, f"{field}.protocol")
        v.optional_name(port.name, f"{field}.name", DNS1123_LABEL, "port name (DNS-1123 label)", 63)
        names.append(None if port.name is None else (port.name,))
        if port.port is not None:
            v.port(port.port, f"{field}.port")
        if port.name is None or port.port is None:
            # kube-proxy ignores slice ports without a name (the controller writes "" for an
            # unnamed service port) or without a number; the manifest reader says so.
            continue
        key = ServicePortName(namespace, service, kept_name(port.name), protocol)
        # In kube-proxy's order already (see `merge_endpoints`): a service of one slice, most of
        # them, then uses these very tuples.
        result[key] = tuple(sorted(
            (Endpoint(ip, port.port, ready, serving, terminating, node, zone, zone_hints, node_hints)
             for ip, ready, serving, terminating, node, zone, zone_hints, node_hints in endpoints),
            key=_address,
        ))
    # discovery validation: port names are unique within a slice, whatever the protocol.
    v.duplicates(names, "ports[{i}].name", "port name")
    return result


# (ip, ready, serving, terminating, node name, zone, zone hints, node hints) of one endpoint.
_EndpointFields = tuple[str, bool, bool, bool, str | None, str | None, frozenset[str], frozenset[str]]
_NO_HINTS: frozenset[str] = frozenset()


def _conditions(cond: Any) -> tuple[bool, bool, bool]:
    """(ready, serving, terminating), defaulted as the API documents."""
    if cond is None:
        return True, True, False
    # kube-proxy's slice cache reads an unset `serving` as true (endpointslicecache.go), so
    # a terminating endpoint that never reported serving still carries its connections.
    return (cond.ready is None or bool(cond.ready), cond.serving is None or bool(cond.serving),
            bool(cond.terminating))


def _checked_endpoint(ep: Any, i: int, address_type: str) -> _EndpointFields:
    """One endpoint, every field checked and any problem named (`endpoints[i].…`)."""
    field = f"endpoints[{i}]"
    check(bool(ep.addresses), f"{field}.addresses", "required value")
    if len(ep.addresses) > MAX_ENDPOINT_ADDRESSES:
        raise InvalidObject(f"{field}.addresses", f"must have at most {MAX_ENDPOINT_ADDRESSES} items")
    for j, address in enumerate(ep.addresses):
        v.non_special_ip(address, f"{field}.addresses[{j}]")
        if (ip_family(address) is IPFamily.V6) is not (address_type == "IPv6"):
            raise InvalidObject(f"{field}.addresses[{j}]", f"must be an {address_type} address")
    node_name = _remembered(_NODE_NAMES, v.optional_name(ep.node_name, f"{field}.nodeName", DNS1123_SUBDOMAIN,
                                                         "node name", 253))
    zone = _remembered(_ZONES, v.label_value(ep.zone, f"{field}.zone"))
    v.optional_name(ep.hostname, f"{field}.hostname", DNS1123_LABEL, "hostname (DNS-1123 label)", 63)
    zone_hints, node_hints = _hints(ep.hints, f"{field}.hints")
    return (own_copy(ep.addresses[0]), *_conditions(ep.conditions), node_name, zone, zone_hints, node_hints)


def kept_name(text: str) -> str:
    """A namespace, Service or port name the model keeps: one interned copy per distinct value,
    shared by every object that names it, and not the decoded object's (see `own_copy`)."""
    return sys.intern(own_copy(text))


def own_copy(text: str) -> str:
    """A new string equal to `text`, for one that outlives the decoded object it came from.

    The decoded EndpointSlices of a list (98 MB at 10k Services) are freed once converted; an
    address kept from one would keep the allocator's whole block of that object's memory in
    use, and the agent's resident memory with it. A copy made now sits with the other
    long-lived values.
    """
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "surrogatepass")  # any str, even unpaired surrogates


# Node names and zones already found valid, each mapped to its interned copy: the few distinct
# values 100,000 endpoints repeat are looked up, not matched against their patterns again
# (at 10k Services the per-endpoint checks were most of `dump`'s reading, issue 14).
_NODE_NAMES: dict[str, str] = {}
_ZONES: dict[str, str] = {}
_REMEMBERED = 4096  # per table: a cluster's nodes and zones; beyond that it starts over


def _remembered(known: dict[str, str], value: str | None) -> str | None:
    """`value` (just checked) interned, and remembered as valid."""
    if value is None:
        return None
    if len(known) >= _REMEMBERED:
        known.clear()
    return known.setdefault(value, sys.intern(value))


def _plain_endpoint(ep: Any) -> _EndpointFields | None:
    """The common IPv4 endpoint, without building a field name: plain addresses, a node name and
    zone seen valid before, no hostname or hints. None when anything needs `_checked_endpoint`,
    which gives the same result or names the problem."""
    addresses = ep.addresses
    if not addresses or len(addresses) > MAX_ENDPOINT_ADDRESSES or ep.hostname is not None or ep.hints is not None:
        return None
    if not v.plain_ipv4s(addresses):
        return None
    node_name = ep.node_name if ep.node_name is None else _NODE_NAMES.get(ep.node_name)
    zone = ep.zone if ep.zone is None else _ZONES.get(ep.zone)
    if (node_name is None and ep.node_name is not None) or (zone is None and ep.zone is not None):
        return None
    return (own_copy(addresses[0]), *_conditions(ep.conditions), node_name, zone, _NO_HINTS, _NO_HINTS)


def _hints(hints: Any, field: str) -> tuple[frozenset[str], frozenset[str]]:
    """Topology hints: at most 8 zones (label values) and 8 nodes (node names)."""
    if hints is None:
        return _NO_HINTS, _NO_HINTS  # shared: CPython has no empty frozenset singleton (since 3.10)
    zones = hints.for_zones or []
    nodes = hints.for_nodes or []
    check(len(zones) <= v.MAX_TOPOLOGY_HINTS, f"{field}.forZones", f"must have at most {v.MAX_TOPOLOGY_HINTS} items")
    check(len(nodes) <= v.MAX_TOPOLOGY_HINTS, f"{field}.forNodes", f"must have at most {v.MAX_TOPOLOGY_HINTS} items")
    zone_names = [v.label_value(z.name, f"{field}.forZones[{i}].name") for i, z in enumerate(zones)]
    node_names = [v.optional_name(n.name, f"{field}.forNodes[{i}].name", DNS1123_SUBDOMAIN, "node name", 253)
                  for i, n in enumerate(nodes)]
    return frozenset(z for z in zone_names if z), frozenset(n for n in node_names if n)


def endpoints_to_slice(ep: V1Endpoints) -> V1EndpointSlice:
    """Turn a legacy v1 Endpoints object into the EndpointSlice the mirroring controller makes.

    `addresses` become ready endpoints and `notReadyAddresses` not-ready ones; each subset
    becomes its own group of ports, as the controller would split them.
    """
    if ep.metadata is None:
        raise InvalidObject("metadata", "required value")
    name = v.name(ep.metadata.name, "metadata.name", DNS1035_LABEL, "Endpoints name (its Service's)", 63)
    endpoints: list[dict[str, Any]] = []
    ports: dict[tuple[str, str], CoreV1EndpointPort] = {}
    families: set[int] = set()
    for i, subset in enumerate(ep.subsets or []):
        for ready, key in ((True, "addresses"), (False, "notReadyAddresses")):
            attr = "addresses" if ready else "not_ready_addresses"
            for j, address in enumerate(getattr(subset, attr) or []):
                where = f"subsets[{i}].{key}[{j}]"
                ip = v.non_special_ip(address.ip, f"{where}.ip")
                v.optional_name(address.node_name, f"{where}.nodeName", DNS1123_SUBDOMAIN, "node name", 253)
                v.optional_name(address.hostname, f"{where}.hostname", DNS1123_LABEL, "hostname", 63)
                families.add(ip_family(ip).value)
                endpoints.append(
                    {
                        "addresses": [ip],
                        "conditions": {"ready": ready, "serving": ready, "terminating": False},
                        "nodeName": address.node_name,
                        "hostname": address.hostname,
                        "targetRef": address.target_ref.to_dict() if address.target_ref else None,
                    }
                )
        subset_ports = subset.ports or []
        for j, port in enumerate(subset_ports):
            where = f"subsets[{i}].ports[{j}]"
            v.port(port.port, f"{where}.port")
            _protocol(port.protocol, f"{where}.protocol")
            if len(subset_ports) > 1:
                check(bool(port.name), f"{where}.name", "required when the subset has more than one port")
            v.optional_name(port.name, f"{where}.name", DNS1123_LABEL, "port name (DNS-1123 label)", 63)
            ports[(port.name or "", port.protocol or "TCP")] = port
    check(len(families) <= 1, "subsets", "mixes IPv4 and IPv6 addresses")
    address_type = "IPv6" if families == {6} else "IPv4"
    slice_ = V1EndpointSlice.from_dict(
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": ep.metadata.namespace,
                "labels": {SERVICE_NAME_LABEL: name},
            },
            "addressType": address_type,
            "endpoints": endpoints,
            "ports": [{"name": p.name or "", "port": p.port, "protocol": p.protocol or "TCP"} for p in ports.values()],
        }
    )
    assert slice_ is not None  # from_dict returns None only for None input
    return slice_


# ---------------------------------------------------------------------------------------------
# the whole state
# ---------------------------------------------------------------------------------------------


def _preference(ep: Endpoint) -> tuple[object, ...]:
    """Sort key choosing among duplicate copies of one address (lowest wins).

    kube-proxy keeps a non-terminating copy over a terminating one; among equals its choice
    depends on map order, so here a fixed order of the remaining fields decides.
    """
    return (
        ep.terminating,
        not ep.ready,
        not ep.serving,
        ep.node_name or "",
        ep.zone or "",
        sorted(ep.zone_hints),
        sorted(ep.node_hints),
    )


def _address(endpoint: Endpoint) -> str:
    return endpoint.address


def _in_order(endpoints: tuple[Endpoint, ...]) -> bool:
    """Strictly by `ip:port` text: what `merge_endpoints` would make of them alone."""
    addresses = [ep.address for ep in endpoints]
    return all(a < b for a, b in itertools.pairwise(addresses))


def merge_endpoints(parts: Iterable[EndpointsByPort]) -> dict[ServicePortName, tuple[Endpoint, ...]]:
    """Merge the slices of each service port into one endpoint list, in kube-proxy's order.

    An address:port listed by several slices (briefly true while a controller moves endpoints
    between slices) appears once, preferring a non-terminating copy, as kube-proxy's slice
    cache does.
    The result is sorted by `ip:port` text, kube-proxy's `byEndpoint` order.
    """
    parts = list(parts)
    if len(parts) == 1 and all(map(_in_order, parts[0].values())):
        return dict(parts[0])  # one slice, sorted and without duplicates: its tuples as they are
    merged: dict[ServicePortName, dict[str, Endpoint]] = {}
    for part in parts:
        for key, endpoints in part.items():
            by_address = merged.setdefault(key, {})
            for ep in endpoints:
                old = by_address.get(ep.address)
                if old is None or _preference(ep) < _preference(old):
                    by_address[ep.address] = ep
    return {key: tuple(eps[a] for a in sorted(eps)) for key, eps in merged.items()}


def build_state(services: Iterable[ServiceInfo], slices: Iterable[EndpointsByPort]) -> ClusterState:
    """The ClusterState of converted services and slices (endpoints of unknown ports dropped)."""
    ports = {p.name: p for info in services for p in info.ports}
    endpoints = {k: v for k, v in merge_endpoints(slices).items() if k in ports}
    return ClusterState(services=ports, endpoints=endpoints)


# The taint the Cluster Autoscaler puts on a node it is about to delete; kube-proxy's /healthz
# answers 503 while it is there (KEP-3836; pkg/proxy/healthcheck/proxier_health.go).
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"
_TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


@dataclass(frozen=True)
class NodeInfo:
    """What the proxy takes from its own Node object."""

    ips: tuple[str, ...]
    zone: str | None
    pod_cidrs: tuple[str, ...] = ()
    # deletionTimestamp set, or the ToBeDeletedByClusterAutoscaler taint: load balancers should
    # drain this node (/healthz answers 503), though its rules keep working meanwhile.
    being_deleted: bool = False


def convert_node(node: Any, strict: bool = False) -> NodeInfo:
    """The node's IPs, `topology.kubernetes.io/zone` label, podCIDRs and whether it is going away.

    IPs as kube-proxy's `GetNodeHostIPs`: InternalIPs then ExternalIPs, the first is the
    primary, plus the first one of the other family (dual-stack). Addresses the API server
    would refuse (malformed, with a zone, unspecified or loopback) are skipped, and so is a
    zone label that is not a valid label value. podCIDRs and taints are checked with the API
    server's rules (`ValidateNode`): with `strict` (a manifest someone wrote) a bad one raises
    InvalidObject naming the field; without (the API's own objects) bad podCIDRs are dropped.
    """
    addresses = (node.status.addresses if node.status else None) or []
    ips: list[str] = []
    for kind in ("InternalIP", "ExternalIP"):
        for address in addresses:
            if address.type != kind:
                continue
            try:
                ip = v.non_special_ip(address.address, "status.addresses")
            except InvalidObject:
                continue
            if all(ip_family(ip) is not ip_family(other) for other in ips):
                ips.append(ip)
    try:
        zone = v.label_value(_labels(node).get(ZONE_LABEL), f"metadata.labels[{ZONE_LABEL}]")
    except InvalidObject:
        zone = None
    spec = node.spec
    try:
        pod_cidrs = _pod_cidrs(spec)
    except InvalidObject:
        if strict:
            raise
        pod_cidrs = ()
    taints = (spec.taints if spec is not None else None) or []
    if strict:
        _check_taints(taints)
    deleting = node.metadata is not None and node.metadata.deletion_timestamp is not None
    tainted = any(taint.key == TO_BE_DELETED_TAINT for taint in taints)
    return NodeInfo(tuple(ips), zone, pod_cidrs, deleting or tainted)


def _pod_cidrs(spec: Any) -> tuple[str, ...]:
    """`spec.podCIDRs` (or the older single `spec.podCIDR`): one or two CIDRs, one per family."""
    if spec is None:
        return ()
    listed = spec.pod_cidrs or ([spec.pod_cidr] if spec.pod_cidr else [])
    check(isinstance(listed, list), "spec.podCIDRs", "must be a list")
    cidrs = tuple(v.cidr(c, f"spec.podCIDRs[{i}]") for i, c in enumerate(listed))
    check(len(cidrs) <= 2, "spec.podCIDRs", "may hold at most two CIDRs (one per family)")
    check(len({ip_family(c) for c in cidrs}) == len(cidrs), "spec.podCIDRs", "must hold one CIDR per IP family")
    if spec.pod_cidr and spec.pod_cidrs:
        check(spec.pod_cidr == spec.pod_cidrs[0], "spec.podCIDR", "must equal spec.podCIDRs[0]")
    return cidrs


def _check_taints(taints: Sequence[Any]) -> None:
    """The API server's taint rules: a qualified-name key, a label value, a known effect, and
    no two taints with the same key and effect."""
    seen: set[tuple[str, str]] = set()
    for i, taint in enumerate(taints):
        field = f"spec.taints[{i}]"
        _qualified_name(taint.key, f"{field}.key")
        v.label_value(taint.value, f"{field}.value")
        check(taint.effect in _TAINT_EFFECTS, f"{field}.effect",
              f"{shown(taint.effect)} is not one of {', '.join(_TAINT_EFFECTS)}")
        check((taint.key, taint.effect) not in seen, field, f"duplicate taint {shown(taint.key)} ({taint.effect})")
        seen.add((taint.key, taint.effect))


def _qualified_name(value: object, field: str) -> None:
    """`IsQualifiedName`: an optional DNS-subdomain prefix and `/`, then a name of at most 63
    characters of `[A-Za-z0-9._-]` with alphanumeric ends."""
    check(isinstance(value, str) and bool(value), field, "required value")
    assert isinstance(value, str)
    prefix, _, name = value.rpartition("/")
    if prefix:
        v.name(prefix, field, DNS1123_SUBDOMAIN, "qualified name prefix (a DNS subdomain)", 253)
    v.name(name, field, v.LABEL_VALUE, "qualified name", 63)
