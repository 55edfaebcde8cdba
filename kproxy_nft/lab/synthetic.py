"""Synthetic clusters of any size, for benchmarks and scale tests (pure, deterministic).

`synthetic_cluster(10_000, 10)` gives 10,000 ClusterIP services in one namespace-per-hundred
layout, each with 10 ready endpoints, addresses laid out so that none collide:
service i has cluster IP 10.96.0.0/12 + i and endpoints in 10.128.0.0/9.
"""

from __future__ import annotations

import ipaddress

from kproxy_nft.model import ClusterState, Endpoint, Protocol, ServicePort, ServicePortName

SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/12")
POD_CIDR = ipaddress.ip_network("10.128.0.0/9")


def synthetic_name(i: int) -> ServicePortName:
    return ServicePortName(f"ns{i // 100}", f"svc{i}", "http", Protocol.TCP)


def synthetic_endpoints(i: int, count: int, generation: int = 0) -> tuple[Endpoint, ...]:
    """Endpoints of service i; a different `generation` moves them to other addresses."""
    base = int(POD_CIDR.network_address) + (i * 64 + generation * 16 * 64 * 1024) % (POD_CIDR.num_addresses - 64)
    eps = [Endpoint(ip=str(ipaddress.ip_address(base + j)), port=8080, node_name=f"node{j % 3}") for j in range(count)]
    return tuple(sorted(eps, key=lambda ep: ep.address))


def synthetic_cluster(services: int, endpoints_per_service: int) -> ClusterState:
    ports = {}
    endpoints = {}
    for i in range(services):
        name = synthetic_name(i)
        ports[name] = ServicePort(
            name=name,
            port=80,
            target_port=8080,
            cluster_ips=(str(SERVICE_CIDR.network_address + 1 + i),),
        )
        endpoints[name] = synthetic_endpoints(i, endpoints_per_service)
    return ClusterState(services=ports, endpoints=endpoints)
