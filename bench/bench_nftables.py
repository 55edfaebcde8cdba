"""Benchmark: the flat nftables layout against kube-proxy's, in a throwaway network namespace.

Prints figures; not a test. Needs root. Usage:
    python bench/bench_nftables.py [--sizes 2500,10000,30000] [--endpoints 10] [--changes 30]
                                   [--kube-proxy-size 10000]

1. Full load of N services × M endpoints, per size, through the nftables proxier: `render`
   (compile + render, what `dump` pays), `plan` (compile, read back the empty kernel, the
   transaction text) and `apply` (a new table: declarations, then its elements in parts, entry maps last).
2. At the middle size: one service's endpoints moved, 30 times, in-process (libnftables) and
   through the `nft` command: the agent's partial sync (`Proxier.sync` naming the changed
   service port: recompile it, plan, one transaction), median and p99; then 30 more moves as
   the `apply` command makes them (`Proxier.plan`: compile everything and compare, then
   `Proxier.apply`: the transaction), apply median and p99.
3. The same cluster in kube-proxy's layout (`pkg/proxy/nftables/proxier.go`: a chain per service
   port and per endpoint, `numgen random mod N vmap { i : goto endpoint-… }`), generated here,
   loaded in the same namespace, then the same one-service change as one transaction.

The namespace is `kpn-<random>`, never connected to anything, and deleted even on failure.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics

from _common import changed, exit_on_sigterm, open_proxier, percentile, timed, with_endpoints

from kproxy_nft.kernel.libnftables import Nftables
from kproxy_nft.kernel.nftables import NftablesBackend, Plan
from kproxy_nft.lab.netns import throwaway_netns
from kproxy_nft.lab.synthetic import synthetic_cluster, synthetic_endpoints, synthetic_name
from kproxy_nft.model import ClusterState, Endpoint, NodeContext, ServicePort
from kproxy_nft.proxier import Proxier, ProxierPlan
from kproxy_nft.proxier.nftables import NftablesProxier

NODE = NodeContext(hostname="node0", cluster_cidrs=("10.128.0.0/9",))
KP_TABLE = "kube-proxy"
TRANSPORTS = ("libnftables", "nft")


def moved(state: ClusterState, i: int, generation: int, endpoints: int) -> ClusterState:
    return with_endpoints(state, synthetic_name(i), synthetic_endpoints(i, endpoints, generation))


def elements_of(plan: Plan) -> int:
    return plan.summary.elements_added + plan.summary.elements_deleted


def use_transport(proxier: Proxier, netns: str, transport: str) -> None:
    """Make `proxier` send through `transport`, before its first use.

    Exception to going through the proxier alone: it always takes libnftables when that loads
    (`make_transport`) and has no option for the `nft` command, which this bench compares on
    purpose; so the `nft` one gets a backend of that transport put in. The assert catches a
    proxier that no longer takes it (or a host without libnftables).
    """
    assert isinstance(proxier, NftablesProxier)
    if transport == "nft":
        proxier._backend = NftablesBackend(netns, use_libnftables=False)
    assert proxier.backend.transport.name == transport, (proxier.backend.transport.name, transport)


# ---------------------------------------------------------------------------------------------
# the flat layout
# ---------------------------------------------------------------------------------------------


def bench_full_loads(netns: str, sizes: list[int], endpoints: int) -> None:
    print(f"full load, {endpoints} endpoints per service (libnftables; a new table is loaded in parts)")
    print(f"{'services':>10} {'elements':>10} {'render s':>10} {'plan s':>10} {'load s':>10} {'total s':>10}")
    for n in sizes:
        state = synthetic_cluster(n, endpoints)
        with open_proxier("nftables", NODE, netns) as proxier:
            _, t_render = timed(lambda: proxier.render(state))  # noqa: B023 (used at once)
            plan, t_plan = timed(lambda: proxier.plan(state))  # noqa: B023
            _, t_load = timed(lambda: proxier.apply(plan))  # noqa: B023
            proxier.cleanup()
        assert isinstance(plan.detail, Plan)
        print(f"{n:>10} {elements_of(plan.detail):>10} {t_render:>10.3f} {t_plan:>10.3f} {t_load:>10.3f}"
              f" {t_plan + t_load:>10.3f}")


def bench_changes(netns: str, n: int, endpoints: int, changes: int) -> None:
    state = synthetic_cluster(n, endpoints)
    print(f"\none service's {endpoints} endpoints moved, {changes} times per column, at {n} services")
    print(f"{'transport':>12} {'sync med ms':>12} {'sync p99 ms':>12} {'apply med ms':>13} {'apply p99 ms':>13}"
          f" {'elements/tx':>12} {'plan med ms':>12}")
    for transport in TRANSPORTS:
        with open_proxier("nftables", NODE, netns) as proxier:
            use_transport(proxier, netns, transport)
            proxier.sync(state, full=True)
            syncs, applies, plans, sizes = [], [], [], []
            current = state
            for k in range(changes):  # the agent's way: only the changed service port recompiled
                i = (k * 7919) % n
                current = moved(current, i, k + 1, endpoints)
                _, t_sync = timed(lambda: proxier.sync(current, False, changed(synthetic_name(i))))  # noqa: B023
                syncs.append(t_sync * 1e3)
            held: list[ProxierPlan] = []
            for k in range(changes, 2 * changes):  # the `apply` command's way: plan, then apply
                current = moved(current, (k * 7919) % n, k + 1, endpoints)
                plan, t_plan = timed(lambda: proxier.plan(current))  # noqa: B023
                # `held` keeps the previous plan's whole-cluster ruleset, which the backend's record
                # lets go of in this apply: freed there, it would add ~12 ms of Python deallocation
                # (10,000 services) to a 0.7 ms transaction. The `apply` command plans only once.
                _, t_apply = timed(lambda: proxier.apply(plan))  # noqa: B023
                held[:] = [plan]
                assert isinstance(plan.detail, Plan)
                plans.append(t_plan * 1e3)
                applies.append(t_apply * 1e3)
                sizes.append(elements_of(plan.detail))
            proxier.sync(current, full=True)  # reads the tables back: nothing may differ
            assert proxier.drift() == 0
            proxier.cleanup()
        print(f"{transport:>12} {statistics.median(syncs):>12.2f} {percentile(syncs, 0.99):>12.2f}"
              f" {statistics.median(applies):>13.2f} {percentile(applies, 0.99):>13.2f}"
              f" {statistics.median(sizes):>12.0f} {statistics.median(plans):>12.1f}")
    print("(sync: Proxier.sync with the changed service port, end to end; apply: the transaction of a"
          " Proxier.plan, which compiles the whole cluster and compares it: plan med ms)")


# ---------------------------------------------------------------------------------------------
# kube-proxy's layout, for comparison
# ---------------------------------------------------------------------------------------------
# The baseline, on purpose not through the proxier (which writes only our layout): generated here
# and sent as is through a libnftables context of its own, the transport of the proxier's figures.


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
        result, load = timed(lambda: nft.run(script))
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
            result, t = timed(lambda: nft.run(text))  # noqa: B023 (used at once)
            applies.append(t * 1e3)
            assert result.returncode == 0, result.stderr[:2000]
            state = with_endpoints(state, name, new)
        print(f"  one service changed: median {statistics.median(applies):.1f} ms, "
              f"p99 {percentile(applies, 0.99):.1f} ms")
        nft.run(f"delete table ip {KP_TABLE}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2500,10000,30000")
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument("--kube-proxy-size", type=int, default=10000,
                        help="services in kube-proxy's layout (0 to skip; 10,000 takes about a minute)")
    args = parser.parse_args()
    exit_on_sigterm()
    sizes = [int(s) for s in args.sizes.split(",")]
    with throwaway_netns() as netns:
        bench_full_loads(netns, sizes, args.endpoints)
        bench_changes(netns, sorted(sizes)[len(sizes) // 2], args.endpoints, args.changes)
        if args.kube_proxy_size:
            bench_kube_proxy_layout(netns, args.kube_proxy_size, args.endpoints, args.changes)


if __name__ == "__main__":
    main()
