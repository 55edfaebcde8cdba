"""Declarative, immutable descriptions of a netlab topology.

A :class:`PodSpec` is a pod namespace that runs a test server; a :class:`ClientSpec` is a
namespace that only originates traffic.  A client whose IP lies inside the cluster CIDR is
wired exactly like a pod ("pod client", e.g. ``testpod``); any other client is an
"external client" routed through the node.  :class:`Addressing` holds the node-side
addresses shared by the whole lab.
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
        raise ValueError(f"netlab is IPv4 only, got {ip!r}")
    return addr


def _valid_port(port: int) -> int:
    if not 0 < port < 65536:
        raise ValueError(f"invalid port {port}")
    return port


@dataclass(frozen=True)
class PodSpec:
    """A pod: its own namespace, ``eth0`` with ``ip/32`` and servers on the given ports."""

    name: str
    ip: str
    tcp_ports: tuple[int, ...] = (80,)
    udp_ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        validate_name(self.name)
        _ipv4(self.ip)
        for port in (*self.tcp_ports, *self.udp_ports):
            _valid_port(port)


@dataclass(frozen=True)
class ClientSpec:
    """A traffic source.  Inside the cluster CIDR it is a pod client, else an external client."""

    name: str
    ip: str

    def __post_init__(self) -> None:
        validate_name(self.name)
        _ipv4(self.ip)


@dataclass(frozen=True)
class Addressing:
    """Node-side addressing of a lab (defaults follow the project's seed scenario).

    ``pod_gateway`` is put (as /32) on the node side of every pod veth; pods use it as
    their on-link default gateway, and it is what pods see as a masquerade source.
    ``node_ip`` is put (as /32) on the node side of every external-client veth and on the
    node's ``uplink0`` veth, whose peer ``upstream`` (in a dead-end "wan" namespace) is the
    node's default gateway -- so locally generated traffic to a service IP finds a route
    before nat OUTPUT DNATs it, and traffic that is not DNATed silently disappears there.
    """

    cluster_cidr: str = "10.1.0.0/16"
    pod_gateway: str = "10.1.0.1"
    node_ip: str = "192.168.100.1"
    upstream: str = "192.168.100.254"

    def __post_init__(self) -> None:
        net = ipaddress.ip_network(self.cluster_cidr)
        if not isinstance(net, ipaddress.IPv4Network):
            raise ValueError("netlab is IPv4 only")
        if _ipv4(self.pod_gateway) not in net:
            raise ValueError(f"pod_gateway {self.pod_gateway} not in {self.cluster_cidr}")
        if _ipv4(self.node_ip) in net:
            raise ValueError(f"node_ip {self.node_ip} must be outside {self.cluster_cidr}")
        if _ipv4(self.upstream) in net or self.upstream == self.node_ip:
            raise ValueError(f"upstream {self.upstream} must be outside the cluster and != node_ip")

    def in_cluster(self, ip: str) -> bool:
        """True when *ip* belongs to the cluster (pod) CIDR."""
        return _ipv4(ip) in ipaddress.ip_network(self.cluster_cidr)
