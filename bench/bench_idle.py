"""Benchmark: what the agent costs at rest, and how fast it repairs and stops, at N Services × M endpoints.

For each size and mode (nftables, iptables with the nf_tables backend) the agent runs as
`kproxy-nft run` does (events fed to its queue as the reflectors would) against a throwaway
namespace, and we measure (iptables-legacy on request):

* first sync: from the full lists to the rules in the kernel;
* idle CPU: this process's CPU ticks and its children's (/proc/self/stat) over `--idle` seconds
  after the first sync, as % of one core; VmRSS and VmHWM then;
* full sync: a blocking one (read back, compile, plan once), and the safety-net check (read
  back and compare, off the loop's thread);
* EndpointSlice change → kernel, p99, at rest and while a safety-net check runs;
* repair: a foreign flush of our main chain (nft `flush chain … services`, iptables `-F
  KUBE-SERVICES`; iptables-legacy: the whole nat table, which its canary shows) → the repair
  counted (the rules back in); nftables also a deleted element of `@service-ips` (the check
  reads back only that map);
* stop: `stop` set (what SIGTERM does) → the loop returned, at rest and during a full sync
  (the process then exits; tests/kernel/test_stop.py times the whole command).

Prints one table and writes a PNG chart of the costs against cluster size. Not a test. Needs
root. Usage:
    python bench/bench_idle.py [--sizes 1000,10000] [--endpoints 10] [--idle 60] [--modes nftables,iptables]
        [--chart bench/idle.png]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from _common import percentile, print_grid, timed
from bench_agent import NODE, endpoint_slice, service

from kproxy_nft.agent.main import Agent
from kproxy_nft.agent.metrics import new_metrics
from kproxy_nft.agent.runtime import run_until_stopped
from kproxy_nft.config import ProxySettings
from kproxy_nft.kernel.netns import exec_argv
from kproxy_nft.lab.netns import throwaway_netns
from kproxy_nft.lab.synthetic import SERVICE_CIDR
from kproxy_nft.model import IPFamily
from kproxy_nft.proxier import Proxier, make_proxier
from kproxy_nft.sources.kube import Change, Replace

TICKS = os.sysconf("SC_CLK_TCK")
BREAK = {
    "nftables": ["nft", "flush", "chain", "ip", "kproxy-nft", "services"],
    "iptables": ["iptables-nft", "-w", "-t", "nat", "-F", "KUBE-SERVICES"],
    # No notifications: the whole table flushed, noticed by the canary within a sync period.
    "iptables-legacy": ["iptables-legacy", "-w", "-t", "nat", "-F"],
}

# Service 1's cluster IP and port in @service-ips (the EndpointSlice changes never touch it).
BREAK_ELEMENT = ["nft", "delete", "element", "ip", "kproxy-nft", "service-ips",
                 f"{{ {SERVICE_CIDR.network_address + 2} . tcp . 80 }}"]


@dataclass
class Figures:
    mode: str
    services: int
    first_sync: float = 0.0
    idle_cpu: float = 0.0  # % of one core
    rss_mb: float = 0.0
    hwm_mb: float = 0.0
    full_sync: float = 0.0
    check: float = 0.0
    p99_idle_ms: float = 0.0
    p99_checking_ms: float = 0.0
    repair: float = 0.0
    repair_element: float | None = None  # nftables: a deleted element of @service-ips
    stop_rest: float = 0.0
    stop_syncing: float = 0.0
    notes: list[str] = field(default_factory=list)


def cpu_ticks() -> int:
    """This process's CPU, and its finished children's (the probes' iptables commands)."""
    with open("/proc/self/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime (fields 14-17 of the line)


def memory_mb(key: str) -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        line = next(line for line in status if line.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def wait_until(predicate: Callable[[], bool], timeout: float = 600.0, interval: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(interval)  # poll gently: the agent's threads need the GIL


def repairs(agent: Agent) -> float:
    return sum(sample.value for metric in agent.metrics.registry.collect() for sample in metric.samples
               if sample.name == "kproxy_nft_drift_repairs_total")


class Bench:
    def __init__(self, mode: str, services: int, endpoints: int, netns: str) -> None:
        self.services, self.endpoints, self.netns = services, endpoints, netns
        self.agent = Agent(open_proxier(mode, netns), new_metrics(), min_sync_period=0.0, sync_period=30.0)
        self.figures = Figures(mode, services)
        self.generation = 0

    def wake(self) -> None:
        """End the loop's sleep after poking its scheduler: an event that changes nothing (slice 0
        as it is; the changes below never pick it, 7919·n mod N ≠ 0 for N < 7919·30)."""
        self.agent.events.put(Change("endpointslices", "MODIFIED", endpoint_slice(0, self.endpoints)))

    def change(self) -> float:
        """One EndpointSlice change → the sync that put it in the kernel: milliseconds."""
        self.generation += 1
        done = self.agent.syncs
        i = (self.generation * 7919) % self.services
        event = Change("endpointslices", "MODIFIED", endpoint_slice(i, self.endpoints, generation=self.generation))
        start = time.perf_counter()
        self.agent.events.put(event)
        wait_until(lambda: self.agent.syncs > done)
        return (time.perf_counter() - start) * 1000

    def run(self, idle: float) -> Figures:
        f, agent = self.figures, self.agent
        agent.events.put(Replace("services", tuple(service(i) for i in range(self.services))))
        agent.events.put(Replace("endpointslices", tuple(endpoint_slice(i, self.endpoints)
                                                         for i in range(self.services))))
        start = time.perf_counter()
        loop = threading.Thread(target=run_until_stopped, args=(agent,), daemon=True)
        loop.start()
        wait_until(lambda: agent.syncs >= 1, interval=0.05)
        f.first_sync = time.perf_counter() - start
        time.sleep(2.0)  # the first sync's notifications and follow-ups settle
        before = cpu_ticks()
        time.sleep(idle)
        f.idle_cpu = (cpu_ticks() - before) / TICKS / idle * 100
        f.rss_mb, f.hwm_mb = memory_mb("VmRSS"), memory_mb("VmHWM")
        f.p99_idle_ms = percentile([self.change() for _ in range(30)], 0.99)
        self.measure_check()
        self.measure_repair()
        self.measure_full_sync()
        f.stop_syncing = self.stop_during_full_sync(loop)
        return f

    def settled(self) -> bool:
        return not self.agent.scheduler.checking and not self.agent.scheduler.check_pending

    def measure_check(self) -> None:
        """The safety-net check on a quiet cluster; then changes made while one runs (which makes
        it stale when a change commits while the kernel is read: it is then checked again)."""
        agent, latencies = self.agent, []
        start = time.perf_counter()
        agent.scheduler.request_check("bench")
        self.wake()
        wait_until(lambda: agent.scheduler.checking)
        wait_until(self.settled)
        self.figures.check = time.perf_counter() - start
        agent.scheduler.request_check("bench")
        self.wake()
        wait_until(lambda: agent.scheduler.checking)
        while agent.scheduler.checking and len(latencies) < 30:
            latencies.append(self.change())
        wait_until(self.settled)
        self.figures.p99_checking_ms = percentile(latencies, 0.99) if latencies else 0.0
        self.figures.notes.append(f"{len(latencies)} changes during a check")

    def measure_repair(self) -> None:
        self.figures.repair = self.repaired_after(BREAK[self.figures.mode])
        if self.figures.mode == "nftables":
            self.figures.repair_element = self.repaired_after(BREAK_ELEMENT)

    def repaired_after(self, argv: list[str]) -> float:
        """Seconds from running `argv` (someone else's change) to the repair counted."""
        counted = repairs(self.agent)
        wait_until(self.settled)
        start = time.perf_counter()
        subprocess.run(exec_argv(self.netns, argv), check=True)
        wait_until(lambda: repairs(self.agent) > counted, interval=0.005)
        return time.perf_counter() - start

    def measure_full_sync(self) -> None:
        """A blocking full sync, as after a failure: timed by the agent's own histogram."""
        def sample(suffix: str) -> float:
            name = "kubeproxy_sync_full_proxy_rules_duration_seconds" + suffix
            return sum(s.value for metric in self.agent.metrics.registry.collect() for s in metric.samples
                       if s.name == name)

        def count() -> float:
            return sample("_count")

        n, s = count(), sample("_sum")
        self.agent.scheduler.failed()  # retried as a full sync after the backoff (1 s)
        self.wake()
        wait_until(lambda: count() > n, interval=0.05)
        self.figures.full_sync = sample("_sum") - s

    def stop_during_full_sync(self, loop: threading.Thread) -> float:
        """Stop while a full sync runs (the worst case before: up to 12 s)."""
        n = self.agent.syncs
        self.agent.scheduler.failed()
        self.wake()
        due = self.agent.scheduler.next_due()
        wait_until(lambda: time.time() > due + 0.3, interval=0.05)  # the backoff, then into the full sync
        if self.agent.syncs > n:
            self.figures.notes.append("the full sync finished before the stop")
        _, took = timed(lambda: (self.agent.stop.set(), loop.join(30)))
        return took


def open_proxier(mode: str, netns: str) -> Proxier:
    """`mode`: nftables, iptables (nf_tables backend) or iptables-legacy; IPv4 only."""
    proxy_mode, _, backend = mode.partition("-")
    return make_proxier(ProxySettings(mode=proxy_mode, node=NODE), netns=netns, iptables_backend=backend or "nft",
                        families=(IPFamily.V4,))


def stop_at_rest(mode: str) -> float:
    """A fresh agent at rest: `stop` → its loop returned."""
    with throwaway_netns() as netns:
        agent = Agent(open_proxier(mode, netns), new_metrics(), min_sync_period=0.0, sync_period=30.0)
        agent.events.put(Replace("services", (service(0),)))
        agent.events.put(Replace("endpointslices", (endpoint_slice(0, 1),)))
        loop = threading.Thread(target=run_until_stopped, args=(agent,), daemon=True)
        loop.start()
        wait_until(lambda: agent.syncs >= 1, interval=0.05)
        time.sleep(0.5)
        _, took = timed(lambda: (agent.stop.set(), loop.join(30)))
        return took


def chart(results: list[Figures], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("idle CPU (% of one core)", "idle_cpu"), ("resident memory (MB)", "rss_mb"),
              ("blocking full sync (s)", "full_sync"), ("safety-net check, off the loop (s)", "check"),
              ("foreign flush → repaired (s)", "repair"), ("stop during a full sync (s)", "stop_syncing")]
    fig, axes = plt.subplots(2, 3, figsize=(14, 8))
    for ax, (title, attr) in zip(axes.flat, panels, strict=True):
        for mode in sorted({r.mode for r in results}):
            rows = sorted((r for r in results if r.mode == mode), key=lambda r: r.services)
            ax.plot([r.services for r in rows], [getattr(r, attr) for r in rows], marker="o", label=mode)
        ax.set_title(title)
        ax.set_xlabel("Services (× endpoints each)")
        ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("kproxy-nft agent: cost against cluster size")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of rest to measure CPU over")
    parser.add_argument("--modes", default="nftables,iptables", help="nftables, iptables, iptables-legacy")
    parser.add_argument("--chart", default="bench/idle.png")
    args = parser.parse_args()
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        for mode in args.modes.split(","):
            with throwaway_netns() as netns:
                figures = Bench(mode, size, args.endpoints, netns).run(args.idle)
            figures.stop_rest = stop_at_rest(mode)
            results.append(figures)
            print(f"{mode} {size}: done ({'; '.join(figures.notes)})", flush=True)
    rows = [["mode", "services", "first sync s", "idle CPU %", "VmRSS MB", "VmHWM MB", "full sync s", "check s",
             "p99 idle ms", "p99 in check ms", "repair s", "element repair s", "stop at rest s",
             "stop in sync s"]]
    rows += [[r.mode, str(r.services), f"{r.first_sync:.1f}", f"{r.idle_cpu:.2f}", f"{r.rss_mb:.0f}",
              f"{r.hwm_mb:.0f}", f"{r.full_sync:.2f}", f"{r.check:.2f}", f"{r.p99_idle_ms:.1f}",
              f"{r.p99_checking_ms:.1f}", f"{r.repair:.2f}",
              "-" if r.repair_element is None else f"{r.repair_element:.2f}", f"{r.stop_rest:.2f}",
              f"{r.stop_syncing:.2f}"]
             for r in results]
    print_grid(rows)
    chart(results, args.chart)
    print(f"chart: {args.chart}")


if __name__ == "__main__":
    main()
