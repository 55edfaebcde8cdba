"""The DNS view of a cluster: what cluster DNS knows about Services and their ready endpoints.

A `RecordSet` is the immutable input of the DNS resolver (`discovery.resolver`) and of the
zone listing (`discovery.zonefile`): the Services (ClusterIP, headless, ExternalName) and
the *ready* endpoint addresses of their EndpointSlices, reduced to exactly the fields
CoreDNS's `kubernetes` plugin keeps (`plugin/kubernetes/object/service.go` and
`object/endpoint.go`), plus the zone, TTL and the name server's own addresses.

Everything here is pure (no I/O). The server takes a *provider*, a `Callable[[], RecordSet]`,
and asks it for the current set on every query, so a manifest watcher (`discovery.server`)
or, later, the agent's live model can swap in a new set at any time.

The records themselves follow the Kubernetes DNS-Based Service Discovery specification,
schema 1.1.0 (kubernetes/dns `docs/specification.md`), as CoreDNS serves it.
"""

from __future__ import annotations

import enum
import ipaddress
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import dns.exception
import dns.name
from kubernetes.client import V1EndpointSlice, V1Service

from kproxy_nft import validation
from kproxy_nft.convert import SERVICE_NAME_LABEL, InvalidObject

SCHEMA_VERSION = "1.1.0"  # spec §2.2: `dns-version.<zone>. IN TXT "1.1.0"`
SCHEMA_TTL = 28800  # CoreDNS answers dns-version with this fixed TTL (kubernetes.go, Services)
DEFAULT_ZONE = "cluster.local"
DEFAULT_TTL = 5  # CoreDNS's `defaultTTL`
# CoreDNS's default Corefile makes the kubernetes plugin authoritative for the reverse zones too.
REVERSE_ZONES = (dns.name.from_text("in-addr.arpa."), dns.name.from_text("ip6.arpa."))
# The API server creates these namespaces in every cluster; CoreDNS answers NODATA (not
# NXDOMAIN) for `<ns>.svc.<zone>` only when the Namespace exists (namespace.go).
SYSTEM_NAMESPACES = frozenset({"default", "kube-system", "kube-public", "kube-node-lease"})



class ServiceKind(enum.StrEnum):
    """How DNS answers for a Service: its cluster IPs, its endpoints, or a CNAME."""

    CLUSTER_IP = "ClusterIP"  # also NodePort and LoadBalancer: all have cluster IPs
    HEADLESS = "Headless"
    EXTERNAL_NAME = "ExternalName"


@dataclass(frozen=True)
class Port:
    """A Service or EndpointSlice port as DNS sees it (`name` is "" for an unnamed port)."""

    name: str
    protocol: str
    number: int


# CoreDNS gives objects without ports this sentinel so that a plain A query still matches one
# "port"; it never turns into an SRV record (backend_lookup.go skips port -1).
NO_PORT = Port("", "", -1)


@dataclass(frozen=True)
class DnsService:
    """A Service reduced to what DNS needs (CoreDNS's `object.Service`)."""

    namespace: str
    name: str
    kind: ServiceKind
    cluster_ips: tuple[str, ...] = ()
    ports: tuple[Port, ...] = ()
    external_name: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)


@dataclass(frozen=True)
class EndpointAddress:
    """One ready endpoint address and its explicit hostname ("" when it has none)."""

    ip: str
    hostname: str = ""

    @property
    def label(self) -> str:
        """The endpoint's _hostname_ (spec §2.1): its hostname, else the dashed IP.

        The spec leaves the fallback identifier to the implementation; this is CoreDNS's
        (`endpointHostname`): 10.1.0.47 → 10-1-0-47, fd00::1 → fd00--1.
        """
        if self.hostname:
            return self.hostname
        return self.ip.replace(".", "-") if "." in self.ip else self.ip.replace(":", "-")


@dataclass(frozen=True)
class EndpointGroup:
    """One EndpointSlice: its ready addresses and its ports (CoreDNS's single `EndpointSubset`)."""

    namespace: str
    service: str
    name: str
    addresses: tuple[EndpointAddress, ...]
    ports: tuple[Port, ...]

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.service)


@dataclass(frozen=True)
class RecordOptions:
    """Settings of the DNS view that do not come from the cluster objects."""

    zone: str = DEFAULT_ZONE
    ttl: int = DEFAULT_TTL
    nameservers: tuple[str, ...] = ("127.0.0.1",)  # this server's own addresses (NS glue)


@dataclass(frozen=True)
class RecordSet:
    """Everything the DNS server answers from; build it with `build_record_set`."""

    zone: dns.name.Name
    ttl: int
    services: tuple[DnsService, ...]
    endpoints: tuple[EndpointGroup, ...]
    nameservers: tuple[str, ...]
    namespaces: frozenset[str]
    serial: int = field(default=0)

    # ---- indexes, built once per set (cached_property writes past the frozen __setattr__)
    @cached_property
    def zones(self) -> tuple[dns.name.Name, ...]:
        """The zones served: the cluster domain and the reverse zones."""
        return (self.zone, *REVERSE_ZONES)

    @cached_property
    def _service_index(self) -> Mapping[tuple[str, str], DnsService]:
        return {svc.key: svc for svc in self.services}

    @cached_property
    def _group_index(self) -> Mapping[tuple[str, str], tuple[EndpointGroup, ...]]:
        index: dict[tuple[str, str], list[EndpointGroup]] = {}
        for group in self.endpoints:
            index.setdefault(group.key, []).append(group)
        return {key: tuple(groups) for key, groups in index.items()}

    @cached_property
    def _cluster_ip_index(self) -> Mapping[str, DnsService]:
        index: dict[str, DnsService] = {}
        for svc in self.services:
            for ip in svc.cluster_ips:
                index.setdefault(ip, svc)  # CoreDNS answers with the first match only
        return index

    @cached_property
    def _address_index(self) -> Mapping[str, tuple[EndpointGroup, ...]]:
        index: dict[str, list[EndpointGroup]] = {}
        for group in self.endpoints:
            for ip in dict.fromkeys(a.ip for a in group.addresses):
                index.setdefault(ip, []).append(group)
        return {ip: tuple(groups) for ip, groups in index.items()}

    def service(self, namespace: str, name: str) -> DnsService | None:
        return self._service_index.get((namespace, name))

    def groups(self, namespace: str, service: str) -> tuple[EndpointGroup, ...]:
        """The slices labelled with this Service's name (whether or not the Service exists)."""
        return self._group_index.get((namespace, service), ())

    def groups_with_address(self, ip: str) -> tuple[EndpointGroup, ...]:
        return self._address_index.get(ip, ())

    def service_with_cluster_ip(self, ip: str) -> DnsService | None:
        return self._cluster_ip_index.get(ip)

    def service_name(self, namespace: str, name: str, zone: dns.name.Name | None = None) -> dns.name.Name:
        """`<service>.<ns>.svc.<zone>.` (the zone as given, e.g. in the case the client used)."""
        return dns.name.Name((name, namespace, "svc")).concatenate(self.zone if zone is None else zone)

    def ptr_targets(self, ip: str) -> tuple[dns.name.Name, ...]:
        """Names a reverse lookup of `ip` answers with (CoreDNS `serviceRecordForIP`).

        A cluster IP names its Service (spec §2.3.3); otherwise every ready endpoint with that
        address names `<hostname>.<service>.<ns>.svc.<zone>` (§2.4.3), for every Service the
        address backs, headless or not: CoreDNS indexes all endpoints by IP.
        """
        svc = self.service_with_cluster_ip(ip)
        if svc is not None:
            return (self.service_name(svc.namespace, svc.name),)
        names = {
            dns.name.Name((address.label,)).concatenate(self.service_name(group.namespace, group.service)): None
            for group in self.groups_with_address(ip)
            for address in group.addresses
            if address.ip == ip
        }
        return tuple(names)


# ---------------------------------------------------------------------------------------------
# Kubernetes objects → the DNS model
# ---------------------------------------------------------------------------------------------


def dns_service(svc: V1Service) -> DnsService:
    """The DNS view of a Service already validated by `read_manifests`.

    Raises `InvalidObject` for what only DNS cares about: an ExternalName Service needs a
    valid DNS name in `spec.externalName`.
    """
    assert svc.metadata is not None and svc.spec is not None  # read_manifests checked both
    spec = svc.spec
    namespace, name = svc.metadata.namespace or "default", str(svc.metadata.name)
    # The API server defaults protocol to TCP; CoreDNS compares against the stored value.
    ports = tuple(Port(p.name or "", p.protocol or "TCP", int(p.port)) for p in spec.ports or [])
    if spec.type == "ExternalName":
        target = spec.external_name or ""
        if not target:
            raise InvalidObject("spec.externalName", "required for type ExternalName")
        try:
            dns.name.from_text(target)
        except dns.exception.DNSException as e:
            raise InvalidObject("spec.externalName", f"{target!r} is not a valid DNS name: {e}") from None
        return DnsService(namespace, name, ServiceKind.EXTERNAL_NAME, ports=ports, external_name=target.lower())
    # CoreDNS's object.Service: clusterIPs when set, else [clusterIP]; headless when the first is "None".
    ips = tuple(spec.cluster_ips or ([spec.cluster_ip] if spec.cluster_ip else []))
    if ips[:1] == ("None",):
        return DnsService(namespace, name, ServiceKind.HEADLESS, ports=ports)
    return DnsService(namespace, name, ServiceKind.CLUSTER_IP, cluster_ips=ips, ports=ports)


def endpoint_group(eps: V1EndpointSlice) -> EndpointGroup | None:
    """The ready addresses and ports of an EndpointSlice (None for an FQDN slice, as kube-proxy).

    Readiness follows CoreDNS (`endpointsliceReady`): `ready` unset counts as ready. The
    EndpointSlice controller already folds `publishNotReadyAddresses` into `ready`.
    """
    assert eps.metadata is not None  # read_manifests checked it
    if eps.address_type == "FQDN":
        return None
    addresses: list[EndpointAddress] = []
    for i, ep in enumerate(eps.endpoints or []):
        if ep.conditions is not None and ep.conditions.ready is False:
            continue
        hostname = validation.optional_name(ep.hostname, f"endpoints[{i}].hostname", validation.DNS1123_LABEL,
                                            "DNS-1123 label", 63) or ""
        addresses.extend(EndpointAddress(ip, hostname) for ip in ep.addresses)
    # CoreDNS keeps a slice port without a number as -1 (never an SRV record) and one without
    # a name as "" (no SRV name); protocol defaults to TCP as the API server would default it.
    ports = tuple(
        Port(p.name or "", p.protocol or "TCP", -1 if p.port is None else int(p.port)) for p in eps.ports or []
    )
    labels = eps.metadata.labels or {}
    return EndpointGroup(
        namespace=eps.metadata.namespace or "default",
        service=labels.get(SERVICE_NAME_LABEL, ""),
        name=str(eps.metadata.name),
        addresses=tuple(addresses),
        ports=ports or (NO_PORT,),
    )


def build_record_set(
    services: Iterable[DnsService], groups: Iterable[EndpointGroup], options: RecordOptions = RecordOptions()
) -> RecordSet:
    """A RecordSet from converted objects; a later object with the same name replaces an earlier one.

    The SOA serial is a checksum of the content, so it is the same for the same objects and
    changes when they change (CoreDNS uses the time of the last change instead).
    """
    by_service = {svc.key: svc for svc in services}
    by_slice = {(g.namespace, g.name): g for g in groups}
    ordered_services = tuple(by_service[k] for k in sorted(by_service))
    ordered_groups = tuple(by_slice[k] for k in sorted(by_slice))
    namespaces = SYSTEM_NAMESPACES | {s.namespace for s in ordered_services} | {g.namespace for g in ordered_groups}
    zone = zone_name(options.zone)
    content = repr((zone.to_text(), options.ttl, options.nameservers, ordered_services, ordered_groups))
    return RecordSet(
        zone=zone,
        ttl=options.ttl,
        services=ordered_services,
        endpoints=ordered_groups,
        nameservers=options.nameservers,
        namespaces=frozenset(namespaces),
        serial=zlib.crc32(content.encode()) or 1,
    )


def records_from_objects(
    services: Iterable[V1Service], slices: Iterable[V1EndpointSlice], options: RecordOptions = RecordOptions()
) -> RecordSet:
    """The RecordSet of the client's typed objects (e.g. an agent's informer caches).

    Raises `InvalidObject` (see `dns_service`, `endpoint_group`).
    """
    groups = (endpoint_group(eps) for eps in slices)
    return build_record_set(map(dns_service, services), (g for g in groups if g is not None), options)


def zone_name(text: str) -> dns.name.Name:
    """The absolute, lower-case name of a cluster domain given as text (raises ValueError)."""
    try:
        name = dns.name.from_text(text.strip().rstrip(".") + ".")
    except dns.exception.DNSException as e:
        raise ValueError(f"{text!r} is not a valid domain name: {e}") from None
    if name == dns.name.root:
        raise ValueError("the cluster domain cannot be the root zone")
    if any(name.is_subdomain(reverse) for reverse in REVERSE_ZONES):
        raise ValueError(f"{text!r} is a reverse zone; the cluster domain must be a forward zone")
    return name.canonicalize()


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
