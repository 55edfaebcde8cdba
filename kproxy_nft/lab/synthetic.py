"""Synthetic clusters of any size, for benchmarks and scale tests (pure, deterministic).

`synthetic_cluster(10_000, 10)` gives 10,000 ClusterIP services in one namespace-per-hundred
layout, each with 10 ready endpoints, addresses laid out so that none collide:
service i has cluster IP 10.96.0.0/12 + i and endpoints in 10.128.0.0/9.
`synthetic_objects` gives the same cluster as the API objects `kubectl get svc,endpointslices
-A -o json` prints (the fields kubectl shows), for the readers' benchmarks and tests.
"""

from __future__ import annotations

import ipaddress
from typing import Any

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


def _service_object(i: int) -> dict[str, Any]:
    name = synthetic_name(i)
    ip = str(SERVICE_CIDR.network_address + 1 + i)
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name.name, "namespace": name.namespace, "uid": f"00000000-0000-4000-8000-{i:012d}",
                     "resourceVersion": str(1000 + i), "creationTimestamp": "2026-01-01T00:00:00Z",
                     "labels": {"app": name.name}},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                 "internalTrafficPolicy": "Cluster", "sessionAffinity": "None", "type": "ClusterIP",
                 "selector": {"app": name.name},
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
        "status": {"loadBalancer": {}},
    }


def _slice_object(i: int, endpoints: int) -> dict[str, Any]:
    name = synthetic_name(i)
    owner_uid = f"00000000-0000-4000-8000-{i:012d}"
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": f"{name.name}-abcde", "namespace": name.namespace, "generateName": f"{name.name}-",
                     "uid": f"00000000-0000-4000-9000-{i:012d}", "resourceVersion": str(2000 + i),
                     "creationTimestamp": "2026-01-01T00:00:00Z",
                     "labels": {"kubernetes.io/service-name": name.name,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                     "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name.name, "uid": owner_uid,
                                          "blockOwnerDeletion": True, "controller": True}]},
        "endpoints": [
            {"addresses": [ep.ip], "conditions": {"ready": True, "serving": True, "terminating": False},
             "nodeName": ep.node_name, "zone": f"zone-{j % 3}",
             "targetRef": {"kind": "Pod", "name": f"{name.name}-pod-{j}", "namespace": name.namespace,
                           "uid": f"00000000-0000-4000-a000-{i:08d}{j:04d}"}}
            for j, ep in enumerate(synthetic_endpoints(i, endpoints))
        ],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def synthetic_objects(services: int, endpoints_per_service: int) -> dict[str, Any]:
    """`synthetic_cluster` as a `List` of Services then EndpointSlices, as kubectl prints it."""
    items = [_service_object(i) for i in range(services)]
    items += [_slice_object(i, endpoints_per_service) for i in range(services)]
    return {"apiVersion": "v1", "kind": "List", "items": items, "metadata": {"resourceVersion": ""}}
