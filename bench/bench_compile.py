"""Benchmark: compile time of both modes through their proxier, N services × M endpoints.

Prints one line per mode and size: a cold render (`Proxier.render`, what `dump` pays: compile
and render, nothing kept), a cold compile with an empty memo (an agent's first sync), and a
warm recompile with nothing changed through the same memo (an agent's later full syncs). The
compiles run with the cyclic GC paused, as the agent's syncs and `dump` run them.
Not a test. Usage:
    python bench/bench_compile.py [--endpoints 10] [--sizes 1000,3000,10000,30000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable

from kproxy_nft.compile import iptables, nftables
from kproxy_nft.compile.memo import FragmentMemo
from kproxy_nft.config import ProxySettings
from kproxy_nft.lab.synthetic import synthetic_cluster
from kproxy_nft.model import ClusterState, IPFamily, NodeContext
from kproxy_nft.proxier import make_proxier
from kproxy_nft.sources.manifests import no_cyclic_gc

NODE = NodeContext(hostname="node0", node_ips=("192.168.0.10",), cluster_cidrs=("10.128.0.0/9",))


def _compile(mode: str) -> Callable[[ClusterState, FragmentMemo[object]], object]:
    """The compile a proxier's sync runs, for `mode`."""
    if mode == "iptables":
        return lambda state, memo: iptables.compile_fragments(state, NODE, IPFamily.V4, memo)  # type: ignore[arg-type]
    return lambda state, memo: nftables.compile_ruleset(state, NODE, IPFamily.V4, memo)  # type: ignore[arg-type]


def _best(repeat: int, run: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeat):
        with no_cyclic_gc():
            t0 = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--sizes", default="1000,3000,10000,30000")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    header = ("mode", "services", "endpoints", "render s", "cold s", "warm s", "µs/svc cold")
    print(" ".join(f"{h:>11}" for h in header))
    settings = ProxySettings(mode="iptables", node=NODE)
    for n in (int(s) for s in args.sizes.split(",")):
        state = synthetic_cluster(n, args.endpoints)
        gc.collect()
        gc.freeze()  # the cluster state is long-lived, as in the agent: keep it out of GC passes
        for mode in ("iptables", "nftables"):
            proxier = make_proxier(settings, mode=mode, families=(IPFamily.V4,))
            compile_ = _compile(mode)
            render = _best(args.repeat, lambda: proxier.render(state))  # noqa: B023 (used at once)
            cold = _best(args.repeat, lambda: compile_(state, FragmentMemo()))  # noqa: B023
            memo: FragmentMemo[object] = FragmentMemo()
            compile_(state, memo)
            warm = _best(args.repeat, lambda: compile_(state, memo))  # noqa: B023
            row = (mode, n, args.endpoints, f"{render:.3f}", f"{cold:.3f}", f"{warm:.3f}", f"{cold / n * 1e6:.1f}")
            print(" ".join(f"{cell:>11}" for cell in row))
        gc.unfreeze()


if __name__ == "__main__":
    main()
