"""Benchmark: the flat nftables layout against kube-proxy's, in a throwaway network namespace.

Prints figures; not a test. Needs root. Usage:
    python bench/bench_nftables.py [--sizes 2500,10000,30000] [--endpoints 10] [--changes 30]
                                   [--kube-proxy-size 10000]

1. Full load (compile + render + one transaction) of N services × M endpoints, per size.
2. At the middle size: one service's endpoints moved, 30 times; plan and apply latency,
   median and p99, in-process (libnftables) and through the `nft` command.
3. The same cluster in kube-proxy's layout (`pkg/proxy/nftables/proxier.go`: a chain per service
   port and per endpoint, `numgen random mod N vmap { i : goto endpoint-… }`), generated here,
   loaded in the same namespace, then the same one-service change as one transaction.

The namespace is `kpn-<random>`, never connected to anything, and deleted even on failure.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
from collections.abc import Callable

from kproxy_nft.compile.nftables import TABLE, compile_ruleset, render_script
from kproxy_nft.kernel.libnftables import Nftables
from kproxy_nft.kernel.nftables import NftablesBackend
from kproxy_nft.lab.netns import throwaway_netns
from kproxy_nft.lab.synthetic import synthetic_cluster, synthetic_endpoints, synthetic_name
from kproxy_nft.model import ClusterState, Endpoint, NodeContext, ServicePort

NODE = NodeContext(hostname="node0", cluster_cidrs=("10.128.0.0/9",))
KP_TABLE = "kube-proxy"





def timed(func: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    func()
    return time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def moved(state: ClusterState, i: int, generation: int, endpoints: int) -> ClusterState:
    name = synthetic_name(i)
    return ClusterState(state.services, {**state.endpoints, name: synthetic_endpoints(i, endpoints, generation)})


# ---------------------------------------------------------------------------------------------
# the flat layout
# ---------------------------------------------------------------------------------------------


def bench_full_loads(netns: str, sizes: list[int], endpoints: int) -> None:
    print(f"full load, {endpoints} endpoints per service (libnftables, one transaction)")
    print(f"{'services':>10} {'elements':>10} {'compile s':>10} {'render s':>10} {'load s':>10} {'total s':>10}")
    for n in sizes:
        state = synthetic_cluster(n, endpoints)
        t0 = time.perf_counter()
        ruleset = compile_ruleset(state, NODE)
        t1 = time.perf_counter()
        script = render_script(ruleset)
        t2 = time.perf_counter()
        with Nftables(netns) as nft:
            result = nft.run(script)
            t3 = time.perf_counter()
            assert result.returncode == 0, result.stderr[:2000]
            nft.run(f"delete table ip {TABLE}")
        elements = sum(len(v) for v in ruleset.elements().values())
        print(f"{n:>10} {elements:>10} {t1 - t0:>10.3f} {t2 - t1:>10.3f} {t3 - t2:>10.3f} {t3 - t0:>10.3f}")


def bench_changes(netns: str, n: int, endpoints: int, changes: int) -> None:
    state = synthetic_cluster(n, endpoints)
    print(f"\none service's {endpoints} endpoints moved, {changes} times, at {n} services")
    print(f"{'transport':>12} {'plan med ms':>12} {'plan p99 ms':>12} {'apply med ms':>13} {'apply p99 ms':>13}"
          f" {'elements/tx':>12}")
    for use_lib in (True, False):
        with NftablesBackend(netns, use_libnftables=use_lib) as backend:
            backend.full_sync(compile_ruleset(state, NODE))
            plans, applies, sizes = [], [], []
            current = state
            for k in range(changes):
                i = (k * 7919) % n
                current = moved(current, i, k + 1, endpoints)
                desired = compile_ruleset(current, NODE)
                t0 = time.perf_counter()
                plan = backend.plan(desired)
                t1 = time.perf_counter()
                backend.apply(plan)
                t2 = time.perf_counter()
                plans.append((t1 - t0) * 1e3)
                applies.append((t2 - t1) * 1e3)
                sizes.append(plan.summary.elements_added + plan.summary.elements_deleted)
            assert backend.full_sync(compile_ruleset(current, NODE)).summary.drift == 0
            backend.cleanup()
        print(f"{backend.transport.name:>12} {statistics.median(plans):>12.2f} {pct(plans, 0.99):>12.2f}"
              f" {statistics.median(applies):>13.2f} {pct(applies, 0.99):>13.2f} {statistics.median(sizes):>12.0f}")
    # The compile that feeds the plan, for the record: all services, memoized per service port.
    t = timed(lambda: compile_ruleset(moved(state, 1, 99, endpoints), NODE))
    print(f"(compile of the whole changed cluster before each plan: {t * 1e3:.1f} ms at {n} services)")


# ---------------------------------------------------------------------------------------------
# kube-proxy's layout, for comparison
# ---------------------------------------------------------------------------------------------


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8].upper()


def kp_service_chain(svc: ServicePort) -> str:
    return f"service-{_hash(str(svc.name))}-{svc.name.namespace}/{svc.name.name}/tcp/{svc.name.port}"


def kp_endpoint_chain(svc: ServicePort, ep: Endpoint) -> str:
    return f"endpoint-{_hash(str(svc.name) + ep.address)}-{svc.name.namespace}/{svc.name.name}/tcp/__{ep.ip}/{ep.port}"


def kp_service_commands(svc: ServicePort, eps: tuple[Endpoint, ...]) -> list[str]:
    """kube-proxy's chains for one service port (ClusterIP, cluster policy, no affinity)."""
    t = f"ip {KP_TABLE}"
    chain = kp_service_chain(svc)
    vip = svc.cluster_ips[0]
    lines = [f"add chain {t} {chain}", f"flush chain {t} {chain}"]
    lines.append(f"add rule {t} {chain} ip daddr {vip} tcp dport {svc.port} ip saddr != 10.128.0.0/9 "
                 "jump mark-for-masquerade")
    vmap = ", ".join(f"{i} : goto {kp_endpoint_chain(svc, ep)}" for i, ep in enumerate(eps))
    for ep in eps:
        sep = kp_endpoint_chain(svc, ep)
        lines += [f"add chain {t} {sep}", f"flush chain {t} {sep}",
                  f"add rule {t} {sep} ip saddr {ep.ip} jump mark-for-masquerade",
                  f"add rule {t} {sep} meta l4proto tcp dnat to {ep.ip}:{ep.port}"]
    lines.append(f"add rule {t} {chain} numgen random mod {len(eps)} vmap {{ {vmap} }}")
    lines.append(f"add element {t} service-ips {{ {vip} . tcp . {svc.port} : goto {chain} }}")
    return lines


def kp_script(state: ClusterState) -> str:
    t = f"ip {KP_TABLE}"
    lines = [
        f"add table {t}",
        f"add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; }}",
        f"add chain {t} mark-for-masquerade",
        f"add rule {t} mark-for-masquerade mark set mark or 0x4000",
        f"add chain {t} services",
        f"add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips",
        f"add chain {t} nat-prerouting {{ type nat hook prerouting priority -100 ; }}",
        f"add rule {t} nat-prerouting jump services",
    ]
    for name, svc in state.services.items():
        lines += kp_service_commands(svc, state.endpoints_of(name))
    return "\n".join(lines) + "\n"


def bench_kube_proxy_layout(netns: str, n: int, endpoints: int, changes: int) -> None:
    state = synthetic_cluster(n, endpoints)
    script = kp_script(state)
    chains = script.count("\nadd chain ")
    print(f"\nkube-proxy layout at {n} services × {endpoints} endpoints ({chains} chains), libnftables")
    with Nftables(netns) as nft:
        t = time.perf_counter()
        result = nft.run(script)
        load = time.perf_counter() - t
        assert result.returncode == 0, result.stderr[:2000]
        print(f"  full load: {load:.2f} s")
        applies = []
        for k in range(changes):
            i = (k * 7919) % n
            name = synthetic_name(i)
            svc = state.services[name]
            old = state.endpoints_of(name)
            new = synthetic_endpoints(i, endpoints, k + 1)
            tx = kp_service_commands(svc, new)
            # kube-proxy flushes the old endpoint chains now and deletes them a second later;
            # flushing is what the sync transaction pays for.
            tx += [f"flush chain ip {KP_TABLE} {kp_endpoint_chain(svc, ep)}" for ep in old]
            tx.insert(0, f"delete element ip {KP_TABLE} service-ips {{ {svc.cluster_ips[0]} . tcp . {svc.port} }}")
            text = "\n".join(tx) + "\n"
            t = time.perf_counter()
            result = nft.run(text)
            applies.append((time.perf_counter() - t) * 1e3)
            assert result.returncode == 0, result.stderr[:2000]
            state = ClusterState(state.services, {**state.endpoints, name: new})
        print(f"  one service changed: median {statistics.median(applies):.1f} ms, p99 {pct(applies, 0.99):.1f} ms")
        nft.run(f"delete table ip {KP_TABLE}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2500,10000,30000")
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument("--kube-proxy-size", type=int, default=10000,
                        help="services in kube-proxy's layout (0 to skip; 10,000 takes about a minute)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with throwaway_netns() as netns:
        bench_full_loads(netns, sizes, args.endpoints)
        bench_changes(netns, sorted(sizes)[len(sizes) // 2], args.endpoints, args.changes)
        if args.kube_proxy_size:
            bench_kube_proxy_layout(netns, args.kube_proxy_size, args.endpoints, args.changes)


if __name__ == "__main__":
    main()
