"""Benchmark: applying iptables rules for N services × M endpoints, per backend (needs root).

Prints figures; not a test. For each backend (nft, legacy), in throwaway network namespaces,
everything through the iptables proxier (`make_proxier(..., iptables_backend=...)`):

1. full apply into an empty namespace: `Proxier.plan` (compile, read the state, plan) then
   `Proxier.apply` (the restore), against a bare `iptables-restore` of the same payload text in
   another empty namespace, flushing (what a tool may do on a node where nothing else has rules)
   and with `--noflush` (what it must do otherwise; quadratic with iptables-nft 1.8.9, which
   `apply` works around);
2. a fresh read of the full ruleset (`Proxier.read_back`: iptables-save + parse) and a full sync
   against it (`Proxier.sync(full=True)`: compile, read, plan, which canonicalizes every rule,
   nothing to send): what a restart or a periodic full sync costs;
3. K one-endpoint changes through `Proxier.sync` naming the changed service port (recompiles
   it alone and plans against the state kept from the previous apply, no iptables-save):
   p50/p99 of the whole sync.

Usage:
    sudo python bench/bench_iptables_apply.py [--services 10000] [--endpoints 10] [--changes 30]
                                              [--backends nft,legacy]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess

from _common import changed, exit_on_sigterm, open_proxier, percentile, restore_argv, timed, with_endpoints

from kproxy_nft.config import ProxySettings
from kproxy_nft.lab.netns import throwaway_netns
from kproxy_nft.lab.synthetic import synthetic_cluster, synthetic_name
from kproxy_nft.model import ClusterState, Endpoint, IPFamily, NodeContext
from kproxy_nft.proxier import ProxierPlan, make_proxier

NODE = NodeContext(hostname="node0", cluster_cidrs=("10.0.0.0/8",))
BARE_TIMEOUT = 180


def one_endpoint_moved(state: ClusterState, i: int, step: int) -> ClusterState:
    """`state` with the first endpoint of service i replaced by a new address."""
    name = synthetic_name(i)
    eps = state.endpoints_of(name)
    moved = Endpoint(ip=f"10.{200 + step // 250}.{step % 250}.{i % 250 + 1}", port=8080)
    return with_endpoints(state, name, tuple(sorted((moved, *eps[1:]), key=lambda ep: ep.address)))


def restore_input(plan: ProxierPlan) -> str:
    """The `iptables-restore` input of a one-family plan: its payload without the header line
    (`--- iptables-restore --noflush payload (IPv4) ---`) the proxier puts before each family's."""
    return "".join(line for line in plan.payload.splitlines(keepends=True) if not line.startswith("--- "))


def bare_restore(backend: str, payload: str, noflush: bool) -> float | None:
    """Seconds a plain iptables-restore of `payload` takes in a fresh namespace (None: timed out).

    The baseline, on purpose not through the proxier: the same text, with nothing of ours around it.
    """
    with throwaway_netns("kpn-bench") as ns:
        argv = restore_argv(ns, backend, IPFamily.V4, *(["--noflush"] if noflush else []))
        try:
            result, seconds = timed(lambda: subprocess.run(argv, input=payload, text=True, capture_output=True,
                                                           timeout=BARE_TIMEOUT))
        except subprocess.TimeoutExpired:
            return None
        assert result.returncode == 0, result.stderr
        return seconds


def bench_backend(backend: str, state: ClusterState, changes: int) -> None:
    print(f"\n== {backend}")
    with throwaway_netns("kpn-bench") as ns, open_proxier("iptables", NODE, ns, iptables_backend=backend) as proxier:
        step, t_plan = timed(lambda: proxier.plan(state))
        _, t_apply = timed(lambda: proxier.apply(step))
        ours = t_plan + t_apply
        payload = restore_input(step)
        bare_flush = bare_restore(backend, payload, noflush=False)
        bare_noflush = bare_restore(backend, payload, noflush=True)
        print(f"full apply, {payload.count(chr(10))} payload lines: ours {ours:.2f} s (plan {t_plan:.2f}: compile, "
              f"read, plan; + restore {t_apply:.2f})")
        for label, bare in (("iptables-restore (flushing the table)", bare_flush),
                            ("iptables-restore --noflush", bare_noflush)):
            shown = (f"{bare:.2f} s → ratio restore/bare {t_apply / bare:.2f}, ours/bare {ours / bare:.2f}"
                     if bare else f"> {BARE_TIMEOUT} s (gave up)")
            print(f"  bare {label} of the same text into an empty namespace: {shown}")

        _, t_read = timed(proxier.read_back)
        summary, t_full = timed(lambda: proxier.sync(state, full=True))
        assert summary == "v4 chains=0 jumps=0" and proxier.drift() == 0, summary
        print(f"full sync: read back (iptables-save + parse) {t_read:.2f} s; Proxier.sync(full=True) {t_full:.2f} s "
              f"(compile, read, plan: canonicalizes every rule we want; nothing to send)")

        ms, summaries = [], []
        n = len(state.services)
        for k in range(changes):
            i = (k * max(1, n // changes)) % n
            state = one_endpoint_moved(state, i, k)
            summary, t_sync = timed(lambda: proxier.sync(state, False, changed(synthetic_name(i))))  # noqa: B023
            ms.append(t_sync * 1000)
            summaries.append(summary)
        print(f"{changes} one-endpoint changes, Proxier.sync (recompile the port, plan, restore): "
              f"p50 {percentile(ms, 0.5):.0f} ms, p99 {percentile(ms, 0.99):.0f} ms, mean {statistics.mean(ms):.0f} ms "
              f"(a typical one: {statistics.mode(summaries)})")
        probe = "*nat\n:KUBE-SVC-BENCHPROBE - [0:0]\n-A KUBE-SVC-BENCHPROBE -j RETURN\nCOMMIT\n"
        # The floor, a baseline on purpose: one rule added by a bare restore, nothing of ours around it.
        _, t_small = timed(lambda: subprocess.run(restore_argv(ns, backend, IPFamily.V4, "--noflush"), input=probe,
                                                  text=True, capture_output=True, check=True))
        print(f"floor: a bare iptables-restore adding one rule to this ruleset takes {t_small * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--changes", type=int, default=30)
    parser.add_argument("--backends", default="nft,legacy")
    args = parser.parse_args()
    exit_on_sigterm()
    state, t_gen = timed(lambda: synthetic_cluster(args.services, args.endpoints))
    # `render` (what `dump` prints) needs no kernel: no namespace, nothing opened.
    render = make_proxier(ProxySettings(mode="iptables", node=NODE), families=(IPFamily.V4,)).render
    text, t_render = timed(lambda: render(state))
    print(f"{args.services} services × {args.endpoints} endpoints (ClusterIP): {text.count(chr(10) + '-A ')} rules; "
          f"generate {t_gen:.2f} s, compile + render {t_render:.2f} s")
    for backend in args.backends.split(","):
        bench_backend(backend, state, args.changes)


if __name__ == "__main__":
    main()
