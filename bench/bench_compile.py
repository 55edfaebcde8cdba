"""Benchmark: compile time of the iptables compiler, N services × M endpoints.

Prints one line per size; not a test. Usage:
    python bench/bench_compile.py [--endpoints 10] [--sizes 1000,3000,10000,30000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

from kproxy_nft.compile.iptables import compile_ruleset, render_restore
from kproxy_nft.model import NodeContext
from kproxy_nft.synthetic import synthetic_cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--sizes", default="1000,3000,10000,30000")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    node = NodeContext(hostname="node0", cluster_cidrs=("10.128.0.0/9",))
    header = ("services", "endpoints", "rules", "compile s", "render s", "total s", "µs/svc")
    print(" ".join(f"{h:>10}" for h in header))
    for n in (int(s) for s in args.sizes.split(",")):
        state = synthetic_cluster(n, args.endpoints)
        best = (float("inf"), float("inf"))
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            ruleset = compile_ruleset(state, node)
            t1 = time.perf_counter()
            text = render_restore(ruleset)
            t2 = time.perf_counter()
            best = min(best, (t1 - t0, t2 - t1), key=sum)
        rules = text.count("\n-A ")
        total = sum(best)
        row = (f"{n}", f"{args.endpoints}", f"{rules}", f"{best[0]:.3f}", f"{best[1]:.3f}", f"{total:.3f}",
               f"{total / n * 1e6:.1f}")
        print(" ".join(f"{cell:>10}" for cell in row))


if __name__ == "__main__":
    main()
