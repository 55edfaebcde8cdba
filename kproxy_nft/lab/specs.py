"""Declarative, immutable descriptions of a netlab topology.

A :class:`PodSpec` is a pod namespace that runs a test server; a :class:`ClientSpec` is a
namespace that only originates traffic.  A client whose IP lies inside the cluster CIDR is
wired exactly like a pod ("pod client", e.g. ``testpod``); any other client is an
"external client" routed through the node.  :class:`Addressing` holds the node-side
addresses shared by the whole lab.

Every pod and client has an IPv4 address (``ip``); an optional IPv6 address (``ip6``) makes
it dual-stack, and a lab with any ``ip6`` is built dual-stack (see ``lab.py``).  There are no
IPv6-only pods: an IPv6-only *service* is one whose endpoints are the pods' IPv6 addresses.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")

#: Name reserved for the node namespace when a probe source is given by name.
NODE = "node"


def validate_name(name: str) -> str:
    """Check that *name* is a DNS-label-like name usable inside a namespace name."""
    if not _NAME_RE.match(name) or name == NODE:
        raise ValueError(f"invalid netlab name {name!r} (lower-case DNS label, not {NODE!r})")
    return name


def _ipv4(ip: str) -> ipaddress.IPv4Address:
    addr = ipaddress.ip_address(ip)
    if not isinstance(addr, ipaddress.IPv4Address):
        raise ValueError(f"expected an IPv4 address (IPv6 goes in ip6), got {ip!r}")
    return addr


def _ipv6(ip: str) -> ipaddress.IPv6Address:
    addr = ipaddress.ip_address(ip)
    if not isinstance(addr, ipaddress.IPv6Address) or addr.ipv4_mapped is not None:
        raise ValueError(f"expected an IPv6 address, got {ip!r}")
    if addr.is_link_local or addr.is_multicast or addr.is_unspecified or addr.is_loopback:
        raise ValueError(f"expected a unicast global or ULA IPv6 address, got {ip!r}")
    return addr


def _validate_host(name: str, ip: str, ip6: str | None) -> None:
    """A pod's or client's name, IPv4 address and optional IPv6 address."""
    validate_name(name)
    _ipv4(ip)
    if ip6 is not None:
        _ipv6(ip6)


def _valid_port(port: int) -> int:
    if not 0 < port < 65536:
        raise ValueError(f"invalid port {port}")
    return port


@dataclass(frozen=True)
class PodSpec:
    """A pod: its own namespace, ``eth0`` with ``ip/32`` (and ``ip6/128``), servers on the ports.

    With ``ip6`` the servers listen on both families.
    """

    name: str
    ip: str
    tcp_ports: tuple[int, ...] = (80,)
    udp_ports: tuple[int, ...] = ()
    ip6: str | None = None

    def __post_init__(self) -> None:
        _validate_host(self.name, self.ip, self.ip6)
        for port in (*self.tcp_ports, *self.udp_ports):
            _valid_port(port)


@dataclass(frozen=True)
class ClientSpec:
    """A traffic source.  Inside the cluster CIDR it is a pod client, else an external client."""

    name: str
    ip: str
    ip6: str | None = None

    def __post_init__(self) -> None:
        _validate_host(self.name, self.ip, self.ip6)


@dataclass(frozen=True)
class Addressing:
    """Node-side addressing of a lab (defaults follow the project's seed scenario).

    ``pod_gateway`` is put (as /32) on the node side of every pod veth; pods use it as
    their on-link default gateway, and it is what pods see as a masquerade source.
    ``node_ip`` is put (as /32) on the node side of every external-client veth and on the
    node's ``uplink0`` veth, whose peer ``upstream`` (in a dead-end "wan" namespace) is the
    node's default gateway -- so locally generated traffic to a service IP finds a route
    before nat OUTPUT DNATs it, and traffic that is not DNATed silently disappears there.

    The ``*6`` fields are the same roles in IPv6 (as /128), used only by a dual-stack lab:
    the external side ``fd00:192:168:100::/64`` mirrors ``192.168.100.0/24``.
    """

    cluster_cidr: str = "10.1.0.0/16"
    pod_gateway: str = "10.1.0.1"
    node_ip: str = "192.168.100.1"
    upstream: str = "192.168.100.254"
    cluster_cidr6: str = "fd00:10:1::/64"
    pod_gateway6: str = "fd00:10:1::1"
    node_ip6: str = "fd00:192:168:100::1"
    upstream6: str = "fd00:192:168:100::fe"

    def __post_init__(self) -> None:
        net = ipaddress.ip_network(self.cluster_cidr)
        if not isinstance(net, ipaddress.IPv4Network):
            raise ValueError(f"cluster_cidr must be IPv4 (IPv6 goes in cluster_cidr6), got {self.cluster_cidr!r}")
        net6 = ipaddress.ip_network(self.cluster_cidr6)
        if not isinstance(net6, ipaddress.IPv6Network):
            raise ValueError(f"cluster_cidr6 must be IPv6, got {self.cluster_cidr6!r}")
        for family, check, cidr, gateway, node_ip, upstream in (
            ("", _ipv4, self.cluster_cidr, self.pod_gateway, self.node_ip, self.upstream),
            ("6", _ipv6, self.cluster_cidr6, self.pod_gateway6, self.node_ip6, self.upstream6),
        ):
            cluster = ipaddress.ip_network(cidr)
            if check(gateway) not in cluster:
                raise ValueError(f"pod_gateway{family} {gateway} not in {cidr}")
            if check(node_ip) in cluster:
                raise ValueError(f"node_ip{family} {node_ip} must be outside {cidr}")
            if check(upstream) in cluster or check(upstream) == check(node_ip):
                raise ValueError(f"upstream{family} {upstream} must be outside the cluster and != node_ip{family}")

    def in_cluster(self, ip: str) -> bool:
        """True when *ip* (either family) belongs to the cluster (pod) CIDR of its family."""
        addr = ipaddress.ip_address(ip)
        cidr = self.cluster_cidr if isinstance(addr, ipaddress.IPv4Address) else self.cluster_cidr6
        return addr in ipaddress.ip_network(cidr)
