"""Benchmark: compile time of the iptables compiler, N services × M endpoints.

Prints one line per size: a cold compile (memo cleared: what `dump` and an agent's first sync
pay), a warm recompile with nothing changed (what a partial sync pays for the unchanged rest),
and rendering to iptables-restore text. Not a test. Usage:
    python bench/bench_compile.py [--endpoints 10] [--sizes 1000,3000,10000,30000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import time

from kproxy_nft.compile.iptables import compile_ruleset, compile_service_port, render_restore
from kproxy_nft.lab.synthetic import synthetic_cluster
from kproxy_nft.model import NodeContext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--sizes", default="1000,3000,10000,30000")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    node = NodeContext(hostname="node0", cluster_cidrs=("10.128.0.0/9",))
    header = ("services", "endpoints", "rules", "cold s", "warm s", "render s", "µs/svc cold")
    print(" ".join(f"{h:>11}" for h in header))
    for n in (int(s) for s in args.sizes.split(",")):
        state = synthetic_cluster(n, args.endpoints)
        gc.collect()
        gc.freeze()  # the cluster state is long-lived, as in the agent: keep it out of GC passes
        cold = warm = render = float("inf")
        for _ in range(args.repeat):
            compile_service_port.cache_clear()
            t0 = time.perf_counter()
            ruleset = compile_ruleset(state, node)
            t1 = time.perf_counter()
            compile_ruleset(state, node)
            t2 = time.perf_counter()
            text = render_restore(ruleset)
            t3 = time.perf_counter()
            cold, warm, render = min(cold, t1 - t0), min(warm, t2 - t1), min(render, t3 - t2)
        gc.unfreeze()
        rules = text.count("\n-A ")
        row = (n, args.endpoints, rules, f"{cold:.3f}", f"{warm:.3f}", f"{render:.3f}", f"{cold / n * 1e6:.1f}")
        print(" ".join(f"{cell:>11}" for cell in row))


if __name__ == "__main__":
    main()
