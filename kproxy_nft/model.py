"""The typed, frozen model every other layer speaks: service ports, endpoints, node context.

This is kube-proxy's view of the cluster, reduced to what a node needs to program NAT rules:
one `ServicePort` per (service, port), the `Endpoint`s behind it, and the `NodeContext` of
the node doing the programming. Everything here is a value: immutable, hashable, comparable,
and free of I/O, so the compilers that consume it are pure functions.

Deliberately not here: reading manifests (`sources.manifests`), choosing which endpoints a
service port uses (`selection`), and anything backend-specific (`compile.*`).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class _CachedHash:
    """Base for frozen dataclasses used as memo keys: hash the fields once, not per lookup.

    The compilers memoize per service port on (ServicePort, endpoints, ...); without this the
    dataclass hash re-hashes every field of every endpoint on every sync. Subclasses assign
    `__hash__ = _CachedHash.__hash__` in their body, or the dataclass decorator replaces it.
    """

    # A slot, not an instance dict entry: reading `__dict__` makes CPython 3.11 build the dict
    # it otherwise keeps inline, 100 bytes more for each of the 200,000 endpoints of 10k
    # Services; with slotted subclasses (Endpoint) there is no dict at all.
    __slots__ = ("_hash",)
    _hash: int

    def __hash__(self) -> int:
        try:
            return self._hash
        except AttributeError:
            value = hash(tuple(getattr(self, f) for f in self.__dataclass_fields__))  # type: ignore[attr-defined]
            object.__setattr__(self, "_hash", value)
            return value


class Protocol(enum.StrEnum):
    """The L4 protocols a Service port may use (the API server allows exactly these)."""

    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"

    @property
    def lowercase(self) -> str:
        """The lower-case spelling iptables, nft and kube-proxy's chain hashes use."""
        return self.value.lower()


class IPFamily(enum.IntEnum):
    """Address family of an IP; the value is the IP version number."""

    V4 = 4
    V6 = 6


def ip_family(ip: str) -> IPFamily:
    """The family of a (validated) IP address or CIDR given as text.

    A colon decides it: only IPv6 text has one. This runs per endpoint per sync, where
    parsing with `ipaddress` would dominate the compile time.
    """
    return IPFamily.V6 if ":" in ip else IPFamily.V4


@dataclass(frozen=True, order=True, slots=True)
class ServicePortName(_CachedHash):
    """Identifies one port of one Service, like kube-proxy's `proxy.ServicePortName`.

    `str()` gives `ns/name:port` (or `ns/name` for an unnamed port), the form kube-proxy puts
    in rule comments and feeds to its chain-name hashes. The protocol is part of the identity
    (a Service may expose port 53 over both TCP and UDP under different names, and endpoint
    slices are matched by name *and* protocol) but not of the string.
    """

    __hash__ = _CachedHash.__hash__

    namespace: str
    name: str
    port: str
    protocol: Protocol = Protocol.TCP

    def __str__(self) -> str:
        base = f"{self.namespace}/{self.name}"
        return f"{base}:{self.port}" if self.port else base

    @property
    def service(self) -> tuple[str, str]:
        """(namespace, name) of the Service this port belongs to."""
        return (self.namespace, self.name)


def sort_key(name: ServicePortName) -> tuple[str, str, str, str]:
    """A plain-tuple key for sorting many service ports (dataclass `<` is ~10x slower).

    The protocol is a StrEnum, so it compares as its text without the enum `.value` lookup
    (slow in Python 3.11).
    """
    return (name.namespace, name.name, name.port, name.protocol)


class TrafficPolicy(enum.StrEnum):
    """`externalTrafficPolicy` / `internalTrafficPolicy` values."""

    CLUSTER = "Cluster"
    LOCAL = "Local"


@dataclass(frozen=True, slots=True)
class ServicePort(_CachedHash):
    """Everything kube-proxy knows about one Service port (its `ServicePort` interface).

    IP lists are tuples in the Service's own order; `cluster_ips` holds one address per family
    the Service has (dual-stack services have two). `session_affinity_seconds` is None when
    affinity is off, else the ClientIP timeout.
    """

    __hash__ = _CachedHash.__hash__

    name: ServicePortName
    port: int
    target_port: int | str
    service_type: str = "ClusterIP"
    cluster_ips: tuple[str, ...] = ()
    node_port: int | None = None
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()
    external_traffic_policy: TrafficPolicy = TrafficPolicy.CLUSTER
    internal_traffic_policy: TrafficPolicy = TrafficPolicy.CLUSTER
    session_affinity_seconds: int | None = None
    health_check_node_port: int | None = None
    traffic_distribution: str | None = None

    @property
    def protocol(self) -> Protocol:
        return self.name.protocol

    def cluster_ip(self, family: IPFamily) -> str | None:
        """The cluster IP of the given family, if the service has one."""
        return next((ip for ip in self.cluster_ips if ip_family(ip) is family), None)

    @property
    def externally_accessible(self) -> bool:
        """Reached from outside the cluster (node port, external or load-balancer IPs)."""
        return bool(self.node_port or self.external_ips or self.load_balancer_ips)

    # The per-family view kube-proxy's proxiers get (its `MapIPsByIPFamily`): each family's
    # rules see only that family's external IPs, load-balancer IPs and source ranges.

    def external_ips_of(self, family: IPFamily) -> tuple[str, ...]:
        return tuple(ip for ip in self.external_ips if ip_family(ip) is family)

    def load_balancer_ips_of(self, family: IPFamily) -> tuple[str, ...]:
        return tuple(ip for ip in self.load_balancer_ips if ip_family(ip) is family)

    def source_ranges_of(self, family: IPFamily) -> tuple[str, ...]:
        return tuple(cidr for cidr in self.load_balancer_source_ranges if ip_family(cidr) is family)

    def externally_accessible_in(self, family: IPFamily) -> bool:
        """`externally_accessible` for one family's rules (kube-proxy's `ExternallyAccessible`)."""
        return bool(self.node_port or self.external_ips_of(family) or self.load_balancer_ips_of(family))

    def source_ranges_admit(self, ips: Iterable[str], family: IPFamily) -> bool:
        """Whether one of `ips` (the node's) lies in a source range of this family.

        Then the load-balancer IPs are allowed as sources too: a VIP-style load balancer often
        makes its IP a local address, so a node reaches it with the VIP as the source (kube-proxy).
        """
        networks = [ipaddress.ip_network(cidr, strict=False) for cidr in self.source_ranges_of(family)]
        return any(ipaddress.ip_address(ip) in net for ip in ips for net in networks)


@dataclass(frozen=True, order=True, slots=True)  # slots: 112 bytes each, was 250 with its dict
class Endpoint(_CachedHash):
    """One backend address:port of a service port, with its EndpointSlice conditions.

    A missing `ready` condition counts as ready and a missing `serving` as equal to `ready`,
    as the API documents; the manifest reader applies those defaults, so here they are plain
    booleans. `zone_hints` / `node_hints` come from `hints.forZones` / `hints.forNodes`.
    """

    __hash__ = _CachedHash.__hash__

    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None
    zone_hints: frozenset[str] = frozenset()
    node_hints: frozenset[str] = frozenset()

    @property
    def address(self) -> str:
        """`ip:port`, with brackets around IPv6 (kube-proxy's `Endpoint.String()`)."""
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"

    @property
    def family(self) -> IPFamily:
        return ip_family(self.ip)


MASQUERADE_BIT_DEFAULT = 14


@dataclass(frozen=True)
class ConntrackSettings:
    """kube-proxy's `conntrack` settings (KubeProxyConntrackConfiguration) with its v1alpha1
    defaults: the node's conntrack table size and timeouts, set once at startup
    (`kernel/sysctl.py`). Durations in seconds; 0 leaves the kernel's value alone, and so does
    `max_per_core` 0 (then `min` is ignored too)."""

    max_per_core: int = 32768
    min: int = 131072
    tcp_established_timeout: float = 24 * 3600.0
    tcp_close_wait_timeout: float = 3600.0
    tcp_be_liberal: bool = False
    udp_timeout: float = 0.0
    udp_stream_timeout: float = 0.0


class LocalMode(enum.StrEnum):
    """kube-proxy's `--detect-local-mode`: how traffic from this node's pods is told apart."""

    CLUSTER_CIDR = "ClusterCIDR"  # source in the cluster CIDR (`--cluster-cidr`)
    NODE_CIDR = "NodeCIDR"  # source in the Node's spec.podCIDRs
    BRIDGE_INTERFACE = "BridgeInterface"  # arrived on the pods' bridge (`--pod-bridge-interface`)
    INTERFACE_NAME_PREFIX = "InterfaceNamePrefix"  # arrived on a pod interface (`--pod-interface-name-prefix`)


@dataclass(frozen=True)
class LocalDetector:
    """One family's test for "from a pod" (kube-proxy's LocalTrafficDetector): a source CIDR,
    or an input interface (`prefix`: any interface whose name starts with it)."""

    cidr: str | None = None
    interface: str | None = None
    prefix: bool = False


@dataclass(frozen=True)
class NodeContext:
    """The node doing the programming and the proxy's settings that shape the rules.

    `cluster_cidrs` is kube-proxy's `--cluster-cidr`; with the default `detect_local_mode` it is
    the local-traffic detector (`local_detector`): traffic from outside it that reaches a service
    is masqueraded. An empty tuple disables that detector, as in kube-proxy. `nodeport_addresses`
    holds CIDRs or the word `primary` (empty: every local address, kube-proxy's iptables-mode
    default). `localhost_nodeports` is kube-proxy's
    `--iptables-localhost-nodeports`, off here by default (CVE-2020-8558). `service_cidrs` are the
    service IP ranges (ServiceCIDR objects / `--service-cidr`), for the nftables mode's drop of
    traffic to unallocated service IPs.
    """

    hostname: str = "localhost"
    node_ips: tuple[str, ...] = ()
    zone: str | None = None
    cluster_cidrs: tuple[str, ...] = ()
    masquerade_all: bool = False
    masquerade_bit: int = MASQUERADE_BIT_DEFAULT
    nodeport_addresses: tuple[str, ...] = ()
    localhost_nodeports: bool = False
    service_cidrs: tuple[str, ...] = ()
    # Every interface address of the node (read by the agent and `apply`; empty for `dump`):
    # `--nodeport-addresses CIDR` selects among these and the node IPs, as kube-proxy does.
    local_addresses: tuple[str, ...] = ()
    # How pod traffic is recognised (`local_detector`): the mode, and what each mode reads.
    detect_local_mode: LocalMode = LocalMode.CLUSTER_CIDR
    pod_cidrs: tuple[str, ...] = ()  # the Node's spec.podCIDRs (NodeCIDR)
    pod_bridge_interface: str = ""  # BridgeInterface
    pod_interface_name_prefix: str = ""  # InterfaceNamePrefix

    def local_detector(self, family: IPFamily) -> LocalDetector | None:
        """This family's test for traffic from this node's pods, or None when there is none.

        kube-proxy (`getLocalDetectors`, cmd/kube-proxy/app/server.go): the first CIDR of the
        family for the CIDR modes; the interface for both families otherwise. Without one, the
        rules that depend on it are left out (no masquerade of off-cluster sources, no
        short-circuit of pod traffic under externalTrafficPolicy Local), as in kube-proxy.
        """
        return _local_detector(self, family)  # asked once per service port by the compilers

    @property
    def masquerade_mark(self) -> str:
        """The fwmark bit that flags a packet for SNAT, as kube-proxy writes it (`0x4000`)."""
        return f"{1 << self.masquerade_bit:#x}"

    def cluster_cidrs_of(self, family: IPFamily) -> tuple[str, ...]:
        return tuple(c for c in self.cluster_cidrs if ip_family(c) is family)

    def service_cidrs_of(self, family: IPFamily) -> tuple[str, ...]:
        return tuple(c for c in self.service_cidrs if ip_family(c) is family)

    def node_ips_of(self, family: IPFamily) -> tuple[str, ...]:
        return tuple(ip for ip in self.node_ips if ip_family(ip) is family)

    def nodeport_ips(self, family: IPFamily, allow_localhost: bool | None = None) -> tuple[str, ...] | None:
        """The addresses NodePorts answer on, or None for "every local address".

        kube-proxy's `NodePortAddresses`: only the entries of this family count; none (or a
        /0) means every local address; `primary` is the node's first IP of the family. CIDRs
        select among the node's IPs, its interface addresses (`local_addresses`, when known) and
        the loopback address (kube-proxy matches interface addresses, and `lo` holds 127.0.0.1).
        IPv6 loopback never serves NodePorts; IPv4 loopback only when `allow_localhost`
        (default: `localhost_nodeports`).
        """
        if allow_localhost is None:
            allow_localhost = self.localhost_nodeports
        primary = self.node_ips_of(family)[:1]
        cidrs: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in self.nodeport_addresses:
            if entry == "primary":
                cidrs += [ipaddress.ip_network(ip) for ip in primary]
            elif ip_family(entry) is family:
                cidrs.append(ipaddress.ip_network(entry, strict=False))
        if not cidrs or any(c.prefixlen == 0 for c in cidrs):
            return None
        loopback = "127.0.0.1" if family is IPFamily.V4 else "::1"
        own = tuple(ip for ip in self.local_addresses if ip_family(ip) is family)
        candidates = [*self.node_ips_of(family), *own, loopback]
        out = []
        for ip in dict.fromkeys(candidates):
            addr = ipaddress.ip_address(ip)
            if addr.is_loopback and (family is IPFamily.V6 or not allow_localhost):
                continue
            if any(addr in c for c in cidrs):
                out.append(str(addr))
        return tuple(out)


# Cached: the compilers ask for it once per service port, and working it out (each CIDR's family,
# a new LocalDetector) was 3% of a cold 10k-service compile; hashing the node is a tenth of that.
@functools.lru_cache(maxsize=16)
def _local_detector(node: NodeContext, family: IPFamily) -> LocalDetector | None:
    """`NodeContext.local_detector`."""
    mode = node.detect_local_mode
    if mode is LocalMode.CLUSTER_CIDR or mode is LocalMode.NODE_CIDR:
        cidrs = node.cluster_cidrs if mode is LocalMode.CLUSTER_CIDR else node.pod_cidrs
        first = next((c for c in cidrs if ip_family(c) is family), None)
        return LocalDetector(cidr=first) if first else None
    if mode is LocalMode.BRIDGE_INTERFACE:
        return LocalDetector(interface=node.pod_bridge_interface) if node.pod_bridge_interface else None
    prefix = node.pod_interface_name_prefix
    return LocalDetector(interface=prefix, prefix=True) if prefix else None


def _frozen_mapping(items: Mapping[K, V]) -> Mapping[K, V]:
    return MappingProxyType(dict(items))


@dataclass(frozen=True)
class ClusterState:
    """All service ports and their endpoints, as a node sees them at one moment.

    `endpoints` is keyed like `services`; a service port with no entry has no endpoints.
    Endpoint tuples are in kube-proxy's order (by `ip:port` text) and hold no duplicates.
    """

    services: Mapping[ServicePortName, ServicePort] = field(default_factory=dict)
    endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "services", _frozen_mapping(self.services))
        object.__setattr__(self, "endpoints", _frozen_mapping(self.endpoints))

    def endpoints_of(self, name: ServicePortName) -> tuple[Endpoint, ...]:
        return self.endpoints.get(name, ())


def node_families(node: NodeContext, ipv6_supported: Callable[[], bool]) -> tuple[IPFamily, ...]:
    """The IP families this node programs (pure; `ipv6_supported` is asked only when needed).

    kube-proxy (cmd/kube-proxy/app/server_linux.go, `platformCheckSupported`) runs dual-stack
    whenever its backend supports both families -- iptables mode: `ip6tables` is present;
    nftables mode: assumed -- "regardless of whether the node is *actually* configured as
    dual-stack" (server.go, `detectNodeIPs`); its node IPs only pick the primary family, the one
    a single-stack proxier uses when the other family is unsupported. We follow that when no node
    IP is given. Node IPs given (`--node-ip`, or `bindAddress`) are taken as the node's
    families instead: a node whose node IPs are all IPv4 is single-stack and its services'
    IPv6 cluster IPs get no rules (kube-proxy would program ip6tables rules that no address of
    the node can receive traffic for), and a node with an IPv4 and an IPv6 node IP programs both.
    """
    given = {ip_family(ip) for ip in node.node_ips}
    if given:
        return tuple(family for family in IPFamily if family in given)
    return (IPFamily.V4, IPFamily.V6) if ipv6_supported() else (IPFamily.V4,)
