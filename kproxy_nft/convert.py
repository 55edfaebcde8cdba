"""Kubernetes API objects → the proxy model, validated the way the API server would.

Both sources meet here: manifests read from files (`sources.manifests`) and, later, objects
from the API watch arrive as the official client's typed models (`V1Service`,
`V1EndpointSlice`), and the same functions turn them into `ServicePort`s and `Endpoint`s.

Validation mirrors the API server's rules that matter to a proxy (names, IPs, ports 1–65535,
protocols, unique port names, the `kubernetes.io/service-name` label on slices) and reports the
first problem as an `InvalidObject` naming the field path, e.g. `spec.ports[1].port`.
Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubernetes.client import (
    CoreV1EndpointPort,
    V1Endpoints,
    V1EndpointSlice,
    V1Service,
)

from kproxy_nft.model import (
    ClusterState,
    Endpoint,
    Protocol,
    ServicePort,
    ServicePortName,
    TrafficPolicy,
    ip_family,
)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
ZONE_LABEL = "topology.kubernetes.io/zone"
DEFAULT_AFFINITY_SECONDS = 10800  # v1.DefaultClientIPServiceAffinitySeconds
MAX_AFFINITY_SECONDS = 86400

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")


class InvalidObject(ValueError):
    """An object the API server would refuse; `field` is a path like `spec.ports[0].port`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# ---------------------------------------------------------------------------------------------
# field validators
# ---------------------------------------------------------------------------------------------


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise InvalidObject(field, message)


def _check_name(value: str | None, field: str, pattern: re.Pattern[str], what: str, max_len: int) -> str:
    _check(bool(value), field, "required value")
    assert value is not None
    _check(len(value) <= max_len, field, f"must be no more than {max_len} characters, got {value!r}")
    _check(bool(pattern.match(value)), field, f"{value!r} is not a valid {what}")
    return value


def _check_ip(value: str, field: str) -> str:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise InvalidObject(field, f"{value!r} is not a valid IP address") from None
    # The API server insists on the canonical spelling (no leading zeros, compressed IPv6).
    _check(str(ip) == value, field, f"{value!r} must be written canonically as {str(ip)!r}")
    return value


def _check_cidr(value: str, field: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise InvalidObject(field, f"{value!r} is not a valid CIDR") from None
    return value


def convert_service_cidr(obj: Any) -> tuple[str, ...]:
    """The CIDRs of a ServiceCIDR (networking.k8s.io/v1): the ranges cluster IPs come from.

    The API server allows one or two (one per family); the proxy only needs them for the
    nftables mode's drop of traffic to unallocated service IPs.
    """
    spec = obj.spec
    cidrs = (spec.cidrs if spec is not None else None) or []
    _check(bool(cidrs), "spec.cidrs", "required value")
    _check(len(cidrs) <= 2, "spec.cidrs", "may hold at most two CIDRs (one per family)")
    return tuple(_check_cidr(c, f"spec.cidrs[{i}]") for i, c in enumerate(cidrs))


def _check_port(value: int | None, field: str) -> int:
    _check(value is not None, field, "required value")
    assert value is not None
    _check(1 <= value <= 65535, field, f"must be between 1 and 65535, inclusive, got {value}")
    return value


def _protocol(value: str | None, field: str) -> Protocol:
    if value is None:
        return Protocol.TCP
    _check(value in Protocol.__members__, field, f"unsupported protocol {value!r} (TCP, UDP or SCTP)")
    return Protocol(value)


def _target_port(value: int | str | None, port: int, field: str) -> int | str:
    if value is None:
        return port  # the API server defaults targetPort to port
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, int):
        return _check_port(value, field)
    _check(
        len(value) <= 15 and bool(_IANA_SVC_NAME.match(value)) and "--" not in value,
        field,
        f"{value!r} is not a valid port number or IANA service name",
    )
    return value


def _labels(obj: Any) -> Mapping[str, str]:
    return (obj.metadata.labels if obj.metadata else None) or {}


def _namespace(obj: Any) -> str:
    namespace = obj.metadata.namespace or "default"
    return _check_name(namespace, "metadata.namespace", _DNS1123_LABEL, "namespace name", 63)


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
    name = _check_name(svc.metadata.name, "metadata.name", _DNS1035_LABEL, "Service name (DNS-1035 label)", 63)
    namespace = _namespace(svc)
    spec = svc.spec
    if spec is None:
        raise InvalidObject("spec", "required value")
    svc_type = spec.type or "ClusterIP"
    _check(svc_type in _SERVICE_TYPES, "spec.type", f"unsupported value {svc_type!r}")

    cluster_ips = _cluster_ips(spec)
    headless = spec.cluster_ip == "None"
    ports = spec.ports or []
    _check(bool(ports) or headless or svc_type == "ExternalName", "spec.ports", "required value")
    _check_port_names(ports)

    external_ips = tuple(_check_ip(ip, f"spec.externalIPs[{i}]") for i, ip in enumerate(spec.external_ips or []))
    source_ranges = tuple(
        _check_cidr(c.strip(), f"spec.loadBalancerSourceRanges[{i}]")
        for i, c in enumerate(spec.load_balancer_source_ranges or [])
    )
    lb_ips = _load_balancer_ips(svc)
    affinity = _affinity_seconds(spec)
    external_policy = _policy(spec.external_traffic_policy, "spec.externalTrafficPolicy")
    if svc_type not in ("NodePort", "LoadBalancer") and not spec.external_ips:
        # kube-proxy honours externalTrafficPolicy only for externally accessible services
        # (`apiservice.ExternalPolicyLocal`): node ports, load balancers, or external IPs.
        external_policy = TrafficPolicy.CLUSTER
    internal_policy = _policy(spec.internal_traffic_policy, "spec.internalTrafficPolicy")
    health_check = spec.health_check_node_port
    if health_check is not None:
        # The API server's rule: only a LoadBalancer with externalTrafficPolicy Local has one
        # (kube-proxy's `NeedsHealthCheck`).
        _check(svc_type == "LoadBalancer" and external_policy is TrafficPolicy.LOCAL, "spec.healthCheckNodePort",
               "may only be set when type is 'LoadBalancer' and externalTrafficPolicy is 'Local'")
        health_check = _check_port(health_check, "spec.healthCheckNodePort")

    records = []
    for i, p in enumerate(ports):
        field = f"spec.ports[{i}]"
        port = _check_port(p.port, f"{field}.port")
        node_port = None
        if p.node_port is not None:
            node_port = _check_port(p.node_port, f"{field}.nodePort")
        records.append(
            ServicePort(
                name=ServicePortName(namespace, name, p.name or "", _protocol(p.protocol, f"{field}.protocol")),
                port=port,
                target_port=_target_port(p.target_port, port, f"{field}.targetPort"),
                service_type=svc_type,
                cluster_ips=cluster_ips,
                node_port=node_port if svc_type in ("NodePort", "LoadBalancer") else None,
                external_ips=external_ips,
                load_balancer_ips=lb_ips if svc_type == "LoadBalancer" else (),
                load_balancer_source_ranges=source_ranges if svc_type == "LoadBalancer" else (),
                external_traffic_policy=external_policy,
                internal_traffic_policy=internal_policy,
                session_affinity_seconds=affinity,
                health_check_node_port=health_check,
                traffic_distribution=spec.traffic_distribution,
            )
        )
    proxied = service_is_proxied(svc)
    return ServiceInfo(namespace, name, tuple(records) if proxied else (), proxied)


def _cluster_ips(spec: Any) -> tuple[str, ...]:
    if spec.cluster_ip in (None, "", "None"):
        _check(not spec.cluster_ips or spec.cluster_ips == ["None"], "spec.clusterIPs", "must be empty or None")
        return ()
    primary = _check_ip(spec.cluster_ip, "spec.clusterIP")
    ips = list(spec.cluster_ips or [primary])
    _check(ips[0] == primary, "spec.clusterIPs[0]", f"must match spec.clusterIP {primary!r}")
    _check(len(ips) <= 2, "spec.clusterIPs", "may hold at most two addresses (one per family)")
    checked = tuple(_check_ip(ip, f"spec.clusterIPs[{i}]") for i, ip in enumerate(ips))
    families = {ipaddress.ip_address(ip).version for ip in checked}
    _check(len(families) == len(checked), "spec.clusterIPs", "must hold one address per IP family")
    return checked


def _check_port_names(ports: Sequence[Any]) -> None:
    seen: set[str] = set()
    for i, p in enumerate(ports):
        field = f"spec.ports[{i}].name"
        if len(ports) > 1:
            _check(bool(p.name), field, "required when the Service has more than one port")
        if p.name:
            _check_name(p.name, field, _DNS1123_LABEL, "port name (DNS-1123 label)", 63)
            _check(p.name not in seen, field, f"duplicate port name {p.name!r}")
            seen.add(p.name)


def _load_balancer_ips(svc: V1Service) -> tuple[str, ...]:
    """LoadBalancer ingress IPs that kube-proxy programs: only `ipMode` unset or `VIP`.

    With `ipMode: Proxy` the load balancer delivers traffic to the node with the node as
    destination, so capturing the LB IP on the node would bypass it (KEP-1860).
    """
    status = svc.status
    ingress = (status.load_balancer.ingress if status and status.load_balancer else None) or []
    ips = []
    for i, ing in enumerate(ingress):
        if ing.ip and ing.ip_mode in (None, "VIP"):
            ips.append(_check_ip(ing.ip, f"status.loadBalancer.ingress[{i}].ip"))
    return tuple(ips)


def _affinity_seconds(spec: Any) -> int | None:
    affinity = spec.session_affinity or "None"
    _check(affinity in ("None", "ClientIP"), "spec.sessionAffinity", f"unsupported value {affinity!r}")
    if affinity == "None":
        return None
    config = spec.session_affinity_config
    seconds = None
    if config and config.client_ip:
        seconds = config.client_ip.timeout_seconds
    if seconds is None:
        return DEFAULT_AFFINITY_SECONDS
    _check(
        0 < seconds <= MAX_AFFINITY_SECONDS,
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        f"must be between 1 and {MAX_AFFINITY_SECONDS}, got {seconds}",
    )
    return int(seconds)


def _policy(value: str | None, field: str) -> TrafficPolicy:
    if value is None:
        return TrafficPolicy.CLUSTER
    _check(value in ("Cluster", "Local"), field, f"unsupported value {value!r} (Cluster or Local)")
    return TrafficPolicy(value)


# ---------------------------------------------------------------------------------------------
# EndpointSlices
# ---------------------------------------------------------------------------------------------

EndpointsByPort = dict[ServicePortName, tuple[Endpoint, ...]]


def convert_endpoint_slice(eps: V1EndpointSlice) -> EndpointsByPort:
    """Validate an EndpointSlice and give its endpoints per service port.

    Like kube-proxy, only an endpoint's first address is used, ports without a number are
    skipped, and FQDN slices are ignored. Condition defaults follow the API documentation:
    `ready` unset means ready, `serving` unset means the value of `ready`.
    """
    if eps.metadata is None:
        raise InvalidObject("metadata", "required value")
    _check_name(eps.metadata.name, "metadata.name", _DNS1123_SUBDOMAIN, "EndpointSlice name", 253)
    namespace = _namespace(eps)
    service = _labels(eps).get(SERVICE_NAME_LABEL)
    _check(
        bool(service),
        f"metadata.labels[{SERVICE_NAME_LABEL}]",
        "required: kube-proxy matches a slice to its Service by this label",
    )
    assert service is not None
    address_type = eps.address_type
    _check(address_type in ("IPv4", "IPv6", "FQDN"), "addressType", f"unsupported value {address_type!r}")
    if address_type == "FQDN":
        return {}

    # (ip, conditions and topology) of each endpoint; the port comes from the slice's ports.
    endpoints: list[tuple[str, bool, bool, bool, str | None, str | None, frozenset[str], frozenset[str]]] = []
    for i, ep in enumerate(eps.endpoints or []):
        field = f"endpoints[{i}]"
        _check(bool(ep.addresses), f"{field}.addresses", "required value")
        for j, address in enumerate(ep.addresses):
            _check_ip(address, f"{field}.addresses[{j}]")
            version = ipaddress.ip_address(address).version
            _check(f"IPv{version}" == address_type, f"{field}.addresses[{j}]", f"must be an {address_type} address")
        cond = ep.conditions
        ready = cond is None or cond.ready is None or bool(cond.ready)
        # kube-proxy's slice cache reads an unset `serving` as true (endpointslicecache.go), so
        # a terminating endpoint that never reported serving still carries its connections.
        serving = cond is None or cond.serving is None or bool(cond.serving)
        terminating = bool(cond and cond.terminating)
        hints = ep.hints
        zone_hints = frozenset(z.name for z in (hints.for_zones or [])) if hints else frozenset()
        node_hints = frozenset(n.name for n in (hints.for_nodes or [])) if hints else frozenset()
        endpoints.append((ep.addresses[0], ready, serving, terminating, ep.node_name, ep.zone, zone_hints, node_hints))

    result: EndpointsByPort = {}
    seen_names: set[tuple[str, Protocol]] = set()
    for i, port in enumerate(eps.ports or []):
        field = f"ports[{i}]"
        protocol = _protocol(port.protocol, f"{field}.protocol")
        if port.name is None or port.port in (None, 0):
            # kube-proxy ignores slice ports without a name (the controller writes "" for an
            # unnamed service port) or without a number; the manifest reader says so.
            continue
        name = port.name
        if name:
            _check_name(name, f"{field}.name", _DNS1123_LABEL, "port name (DNS-1123 label)", 63)
        _check((name, protocol) not in seen_names, f"{field}.name", f"duplicate port name {name!r}")
        seen_names.add((name, protocol))
        number = _check_port(port.port, f"{field}.port")
        key = ServicePortName(namespace, service, name, protocol)
        result[key] = tuple(
            Endpoint(ip, number, ready, serving, terminating, node, zone, zone_hints, node_hints)
            for ip, ready, serving, terminating, node, zone, zone_hints, node_hints in endpoints
        )
    return result


def endpoints_to_slice(ep: V1Endpoints) -> V1EndpointSlice:
    """Turn a legacy v1 Endpoints object into the EndpointSlice the mirroring controller makes.

    `addresses` become ready endpoints and `notReadyAddresses` not-ready ones; each subset
    becomes its own group of ports, as the controller would split them.
    """
    if ep.metadata is None or not ep.metadata.name:
        raise InvalidObject("metadata.name", "required value")
    name = ep.metadata.name
    endpoints: list[dict[str, Any]] = []
    ports: dict[tuple[str, str], CoreV1EndpointPort] = {}
    families: set[int] = set()
    for i, subset in enumerate(ep.subsets or []):
        for ready, key in ((True, "addresses"), (False, "notReadyAddresses")):
            attr = "addresses" if ready else "not_ready_addresses"
            for j, address in enumerate(getattr(subset, attr) or []):
                ip = _check_ip(address.ip, f"subsets[{i}].{key}[{j}].ip")
                families.add(ipaddress.ip_address(ip).version)
                endpoints.append(
                    {
                        "addresses": [ip],
                        "conditions": {"ready": ready, "serving": ready, "terminating": False},
                        "nodeName": address.node_name,
                        "hostname": address.hostname,
                        "targetRef": address.target_ref.to_dict() if address.target_ref else None,
                    }
                )
        for j, port in enumerate(subset.ports or []):
            _check_port(port.port, f"subsets[{i}].ports[{j}].port")
            _protocol(port.protocol, f"subsets[{i}].ports[{j}].protocol")
            ports[(port.name or "", port.protocol or "TCP")] = port
    _check(len(families) <= 1, "subsets", "mixes IPv4 and IPv6 addresses")
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


def merge_endpoints(parts: Iterable[EndpointsByPort]) -> dict[ServicePortName, tuple[Endpoint, ...]]:
    """Merge the slices of each service port into one endpoint list, in kube-proxy's order.

    An address:port listed by several slices (briefly true while a controller moves endpoints
    between slices) appears once, preferring a non-terminating copy, as kube-proxy's slice
    cache does.
    The result is sorted by `ip:port` text, kube-proxy's `byEndpoint` order.
    """
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


@dataclass(frozen=True)
class NodeInfo:
    """What the proxy takes from its own Node object: addresses and topology zone."""

    ips: tuple[str, ...]
    zone: str | None


def convert_node(node: Any) -> NodeInfo:
    """The node's IPs and its `topology.kubernetes.io/zone` label.

    IPs as kube-proxy's `GetNodeHostIPs`: InternalIPs then ExternalIPs, the first is the
    primary, plus the first one of the other family (dual-stack); malformed ones are skipped.
    """
    addresses = (node.status.addresses if node.status else None) or []
    ips: list[str] = []
    for kind in ("InternalIP", "ExternalIP"):
        for address in addresses:
            if address.type != kind:
                continue
            try:
                ip = str(ipaddress.ip_address(address.address))
            except ValueError:
                continue
            if all(ip_family(ip) is not ip_family(other) for other in ips):
                ips.append(ip)
    zone = _labels(node).get(ZONE_LABEL) or None
    return NodeInfo(tuple(ips), zone)
