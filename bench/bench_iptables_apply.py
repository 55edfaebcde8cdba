"""Benchmark: applying iptables rules for N services × M endpoints, per backend (needs root).

Prints figures; not a test. For each backend (nft, legacy), in throwaway network namespaces:

1. full apply into an empty namespace: read state + plan + restore (ours), against a bare
   `iptables-restore` of the same payload text in another empty namespace, flushing (what a
   tool may do on a node where nothing else has rules) and with `--noflush` (what it must do
   otherwise; quadratic with iptables-nft 1.8.9, which `apply` works around);
2. a fresh read of the full ruleset (`iptables-save -t filter/nat` + parse) and a plan against
   it, which canonicalizes every rule: what a restart or a periodic full sync costs;
3. K one-endpoint changes through `Syncer` (plans against the state kept from the previous
   apply, no iptables-save): p50/p99 of plan + apply, and of the compile before it.

Usage:
    sudo python bench/bench_iptables_apply.py [--services 10000] [--endpoints 10] [--changes 30]
                                              [--backends nft,legacy]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

from kproxy_nft.compile.iptables import compile_ruleset
from kproxy_nft.kernel.iptables import Host, IptablesBackend, Syncer, apply, plan, read_state, tool_name
from kproxy_nft.lab.netns import throwaway_netns
from kproxy_nft.lab.synthetic import synthetic_cluster, synthetic_name
from kproxy_nft.model import ClusterState, Endpoint, IPFamily, NodeContext

T = TypeVar("T")
NODE = NodeContext(hostname="node0", cluster_cidrs=("10.0.0.0/8",))





def timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def one_endpoint_moved(state: ClusterState, i: int, step: int) -> ClusterState:
    """`state` with the first endpoint of service i replaced by a new address."""
    name = synthetic_name(i)
    eps = state.endpoints_of(name)
    moved = Endpoint(ip=f"10.{200 + step // 250}.{step % 250}.{i % 250 + 1}", port=8080)
    endpoints = dict(state.endpoints)
    endpoints[name] = tuple(sorted((moved, *eps[1:]), key=lambda ep: ep.address))
    return ClusterState(state.services, endpoints)


BARE_TIMEOUT = 180


def bare_restore(backend: IptablesBackend, payload: str, noflush: bool) -> float | None:
    """Seconds a plain iptables-restore of `payload` takes in a fresh namespace (None: timed out)."""
    with throwaway_netns("kpn-bench") as ns:
        argv = ["ip", "netns", "exec", ns, tool_name(backend, IPFamily.V4, "restore"), "-w"]
        argv += ["--noflush"] if noflush else []
        start = time.perf_counter()
        try:
            result = subprocess.run(argv, input=payload, text=True, capture_output=True, timeout=BARE_TIMEOUT)
        except subprocess.TimeoutExpired:
            return None
        assert result.returncode == 0, result.stderr
        return time.perf_counter() - start


def bench_backend(backend: IptablesBackend, state: ClusterState, changes: int) -> None:
    print(f"\n== {backend.value}")
    desired = compile_ruleset(state, NODE)
    with throwaway_netns("kpn-bench") as ns:
        host = Host(backend, ns)
        current, t_read = timed(lambda: read_state(host))
        step, t_plan = timed(lambda: plan(desired, current))
        _, t_apply = timed(lambda: apply(step, host))
        ours = t_read + t_plan + t_apply
        lines = step.payload.count("\n")
        bare_flush = bare_restore(backend, step.payload, noflush=False)
        bare_noflush = bare_restore(backend, step.payload, noflush=True)
        print(f"full apply, {lines} payload lines: ours {ours:.2f} s (read {t_read:.2f} + plan {t_plan:.2f} "
              f"+ restore {t_apply:.2f})")
        for label, bare in (("iptables-restore (flushing the table)", bare_flush),
                            ("iptables-restore --noflush", bare_noflush)):
            shown = f"{bare:.2f} s → ratio ours/bare {ours / bare:.2f}" if bare else f"> {BARE_TIMEOUT} s (gave up)"
            print(f"  bare {label} of the same text into an empty namespace: {shown}")

        fresh, t_reread = timed(lambda: read_state(host))
        check, t_replan = timed(lambda: plan(desired, fresh))
        assert check.is_empty, check.payload[:2000]
        print(f"full sync (fresh read of the whole ruleset): iptables-save + parse {t_reread:.2f} s, "
              f"plan against it (canonicalizes every rule we want) {t_replan:.2f} s, nothing to send")

        syncer = Syncer(host)
        syncer.state = check.after  # what the agent keeps after that full sync
        compile_times, apply_times = [], []
        n = len(state.services)
        for k in range(changes):
            state = one_endpoint_moved(state, (k * max(1, n // changes)) % n, k)
            ruleset, t_compile = timed(functools.partial(compile_ruleset, state, NODE))
            applied, t_sync = timed(functools.partial(syncer.sync, ruleset))
            assert applied.tables == ("nat",) and "KUBE-SERVICES" not in applied.payload
            compile_times.append(t_compile)
            apply_times.append(t_sync)
        ms = [t * 1000 for t in apply_times]
        cms = [t * 1000 for t in compile_times]
        print(f"{changes} one-endpoint changes, plan + apply: p50 {percentile(ms, 0.5):.0f} ms, "
              f"p99 {percentile(ms, 0.99):.0f} ms, mean {statistics.mean(ms):.0f} ms "
              f"(compile before it: p50 {percentile(cms, 0.5):.0f} ms, p99 {percentile(cms, 0.99):.0f} ms)")
        restore = ["ip", "netns", "exec", ns, tool_name(backend, IPFamily.V4, "restore"), "-w", "--noflush"]
        probe = "*nat\n:KUBE-SVC-BENCHPROBE - [0:0]\n-A KUBE-SVC-BENCHPROBE -j RETURN\nCOMMIT\n"
        _, t_small = timed(lambda: subprocess.run(restore, input=probe, text=True, capture_output=True, check=True))
        print(f"floor: a bare iptables-restore adding one rule to this ruleset takes {t_small * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument("--backends", default="nft,legacy")
    args = parser.parse_args()
    state, t_gen = timed(lambda: synthetic_cluster(args.services, args.endpoints))
    ruleset, t_compile = timed(lambda: compile_ruleset(state, NODE))
    rules = sum(len(c.rules) for t in ruleset.tables for c in t.chains)
    print(f"{args.services} services × {args.endpoints} endpoints (ClusterIP): {rules} rules; "
          f"generate {t_gen:.2f} s, compile {t_compile:.2f} s")
    for backend in args.backends.split(","):
        bench_backend(IptablesBackend(backend), state, args.changes)


if __name__ == "__main__":
    main()
