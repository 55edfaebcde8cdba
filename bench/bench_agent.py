"""Benchmark: the agent's event-to-kernel latency and memory at N services × M endpoints.

The agent runs as `kproxy-nft run` does (tracker → runner → backend) against a throwaway network
namespace; events are fed to its queue as the reflectors would. After the initial full sync, one
EndpointSlice changes at a time and we time from the event entering the queue to the sync that
put it in the kernel having finished. Prints p50/p99 per backend and the process's peak RSS.
Not a test. Needs root. Usage:
    python bench/bench_agent.py [--services 10000] [--endpoints 10] [--changes 50] [--modes nftables,iptables]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import threading
import time

from kubernetes.client import V1EndpointSlice, V1Service

from kproxy_nft.agent.main import Agent
from kproxy_nft.agent.metrics import new_metrics
from kproxy_nft.config import ProxySettings
from kproxy_nft.lab.netns import throwaway_netns
from kproxy_nft.lab.synthetic import SERVICE_CIDR, synthetic_endpoints
from kproxy_nft.model import NodeContext
from kproxy_nft.proxier import make_proxier
from kproxy_nft.sources.events import Change, Replace

NODE = NodeContext(hostname="node0", cluster_cidrs=("10.128.0.0/9",))


def service(i: int) -> V1Service:
    return V1Service.model_validate({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": f"svc{i}", "namespace": f"ns{i // 100}"},
        "spec": {"clusterIP": str(SERVICE_CIDR.network_address + 1 + i), "ports": [{"name": "http", "port": 80}]},
    })


def endpoint_slice(i: int, endpoints: int, generation: int = 0) -> V1EndpointSlice:
    return V1EndpointSlice.model_validate({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"svc{i}-abc", "namespace": f"ns{i // 100}",
                     "labels": {"kubernetes.io/service-name": f"svc{i}"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ep.ip], "nodeName": ep.node_name}
                      for ep in synthetic_endpoints(i, endpoints, generation)],
    })


def resident_mb() -> float:
    """VmRSS now (the peak, ru_maxrss, includes the transient objects of the initial list)."""
    with open("/proc/self/status", encoding="ascii") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def run(mode: str, services: int, endpoints: int, changes: int) -> None:
    with throwaway_netns() as netns:
        proxier = make_proxier(ProxySettings(mode=mode, node=NODE), netns=netns, iptables_backend="nft")
        agent = Agent(proxier, new_metrics(), min_sync_period=0.0, sync_period=3600.0)
        thread = threading.Thread(target=agent.run, daemon=True)
        t0 = time.perf_counter()
        agent.events.put(Replace("services", tuple(service(i) for i in range(services))))
        agent.events.put(Replace("endpointslices", tuple(endpoint_slice(i, endpoints) for i in range(services))))
        thread.start()
        while agent.syncs < 1:
            time.sleep(0.01)
        print(f"{mode}: initial full sync of {services} services × {endpoints} endpoints: "
              f"{time.perf_counter() - t0:.1f} s (objects built, converted, compiled, loaded)")
        latencies = []
        for n in range(changes):
            done = agent.syncs
            i = (n * 7919) % services
            # The object is built first: the clock starts when the event arrives, as from a watch.
            event = Change("endpointslices", "MODIFIED", endpoint_slice(i, endpoints, generation=n + 1))
            start = time.perf_counter()
            agent.events.put(event)
            while agent.syncs == done:
                time.sleep(0.002)  # poll gently: the agent thread needs the GIL
            latencies.append((time.perf_counter() - start) * 1000)
        agent.stop.set()
        thread.join(timeout=10)
        print(f"{mode}: resident memory with the cluster loaded (after the changes): {resident_mb():.0f} MB")
        latencies.sort()
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        print(f"{mode}: one EndpointSlice change → kernel, {changes} changes: "
              f"p50 {statistics.median(latencies):.1f} ms, p99 {p99:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--modes", default="nftables,iptables")
    args = parser.parse_args()
    for mode in args.modes.split(","):
        run(mode, args.services, args.endpoints, args.changes)
    print(f"peak resident memory of this process (initial list included): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
