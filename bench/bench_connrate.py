"""Benchmark: new TCP connections per second through the node, N services vs (almost) none.

The nftables issue asks: "New TCP connections per second through the node at 30,000 Services vs
with none: target ≥ 0.95×." Prints figures; not a test. Needs root. Usage:
    python bench/bench_connrate.py [--services 30000] [--endpoints 10] [--modes nftables,iptables]
                                   [--duration 5] [--reps 6] [--clients 2] [--client pod|external]
                                   [--compare size|counters]

Per mode, two netlabs (throwaway namespaces `kpn-<id>-*`, deleted even on failure or Ctrl-C),
each with one pod and one client, differ only in what their node namespace is programmed with:

* "none": one real ClusterIP service (VIP:80 → pod:9000);
* "N services": the same plus N synthetic services × M endpoints (`synthetic_cluster`),

by the mode under test, through its proxier (`make_proxier`, one full `Proxier.sync`):
`nftables`, `iptables` (iptables-nft, kube-proxy's layout) or `iptables-legacy`.

Each sample: the node's conntrack table is flushed, a minimal accept-and-close server starts in
the pod (this script, `_server`; backlog 4096), `--clients` connection loops start in the client
namespace (this script, `_client`), and on one "GO" they connect to the VIP and close at once
with SO_LINGER 0 (an RST: no TIME_WAIT, so source ports never run out) for `--duration` seconds.
The rate is the sum of the loops' successful connects per second. A connect can only succeed
if the node DNATed it to the pod (nothing else listens on the port; an un-NATed SYN goes to the
lab's dead-end uplink and times out), and the server's accept count must equal the clients'
successes: both are printed, with any failures by kind, and the server's CPU use (near 100%
would mean the server, not the node, sets the rate).

With `--compare counters --modes nftables`, the two labs both hold the N services, one compiled
without the per-endpoint counters of the backend maps (`kproxy-nft top`, issue 16: "counters on vs
off, at 30k services, target ≥ 0.95×"), the other with them, as always compiled.

Samples are taken in pairs, none then N, then N then none, ..., so that both sizes see the same
moments of a shared machine; the summary gives the per-size medians, their ratio, and the median
of the per-pair ratios. In iptables mode the real service sits in the middle of KUBE-SERVICES
(rules are sorted by namespace; kube-proxy's order is random, so the middle is the average case):
a new connection walks about N/2 rules before it matches.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import exit_on_sigterm, open_proxier

from kproxy_nft.compile import nftables as compile_nftables
from kproxy_nft.lab import ClientSpec, Lab, PodSpec
from kproxy_nft.lab.synthetic import SERVICE_CIDR, synthetic_cluster
from kproxy_nft.model import ClusterState, Endpoint, NodeContext, ServicePort, ServicePortName, sort_key

POD = PodSpec("server", "10.1.0.47", tcp_ports=())  # no lab server: ours is started per sample
CLIENTS = {"pod": ClientSpec("testpod", "10.1.0.50"), "external": ClientSpec("ext", "192.168.100.2")}
SERVER_PORT = 9000
SERVICE_PORT = 80
# The last usable address of the service CIDR: synthetic service i has SERVICE_CIDR + 1 + i, so
# this never collides with one of them below a million services (checked in `states`).
VIP = str(SERVICE_CIDR.broadcast_address - 1)
LINGER_0 = struct.pack("ii", 1, 0)  # struct linger {l_onoff = 1, l_linger = 0}: close sends RST
CONNECT_TIMEOUT = 1.0
READY_TIMEOUT = 30.0  # worker start-up on a loaded machine (imports, `ip netns exec`)
MODES = ("nftables", "iptables", "iptables-legacy")
TARGET = 0.95  # the issue's: conn/s at N services ≥ 0.95 × conn/s with none


# ---------------------------------------------------------------------------------------------
# workers, run inside the lab's namespaces as `python bench_connrate.py _client|_server ...`
# ---------------------------------------------------------------------------------------------


def _cpu() -> float:
    """CPU seconds this process used so far (user + system).

    System time includes the node's netfilter work: a veth hands the packet to the peer's
    backlog, processed in softirq right in the sending process's context, so NAT and rule
    lookups are mostly charged to the process that sent the packet (the client loops) -- by
    tick sampling, on kernels without CONFIG_IRQ_TIME_ACCOUNTING; with it, softirq time is
    accounted apart and this figure misses the node's share. The rates are the figure that counts.
    """
    user, system, *_ = os.times()
    return user + system


def client_worker(target_ip: str, port: int, duration: float) -> None:
    """Print READY, wait for a line on stdin, then connect+RST for *duration* s; print JSON."""
    print("READY", flush=True)
    sys.stdin.readline()
    ok, errors = 0, Counter[str]()
    start, cpu = time.monotonic(), _cpu()
    end = start + duration
    while time.monotonic() < end:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect((target_ip, port))
            ok += 1
        except OSError as exc:  # refused, timeout, unreachable...: counted by kind, never hidden
            errors[type(exc).__name__] += 1
        finally:
            sock.close()
    elapsed, cpu = time.monotonic() - start, _cpu() - cpu
    print(json.dumps({"ok": ok, "errors": errors, "elapsed": elapsed, "cpu": cpu}), flush=True)


def server_worker(port: int) -> None:
    """Accept and close until stdin closes; then drain the queue and print the count as JSON.

    Stopping on stdin's EOF rather than on a signal: a signal could land between an accept and
    the count, and the count is what proves that every connection reached the pod.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", port))
    listener.listen(4096)  # capped by net.core.somaxconn (4096 by default since Linux 5.4)
    listener.setblocking(False)
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    poller.register(sys.stdin, select.POLLIN)  # readable (EOF) when the bench closes our stdin
    accepted, stopping = 0, False
    print("READY", flush=True)
    cpu = _cpu()
    while True:
        try:
            conn = listener.accept()[0]
        except BlockingIOError:  # queue empty: done if told to stop, else wait (no busy loop)
            if stopping:
                break
            stopping = any(fd != listener.fileno() for fd, _ in poller.poll())
            continue
        # A plain close (FIN), not an RST: an RST could reach the client before its connect()
        # returned, and fail it. No TIME_WAIT here either: the client answers with its own RST.
        conn.close()
        accepted += 1
    print(json.dumps({"accepted": accepted, "cpu": _cpu() - cpu}), flush=True)


# ---------------------------------------------------------------------------------------------
# the cluster states and the modes that program them
# ---------------------------------------------------------------------------------------------


def states(services: int, endpoints: int) -> tuple[ClusterState, ClusterState, int]:
    """(one real service, the same + N synthetic ones, the real one's rank among all of them)."""
    if int(SERVICE_CIDR.network_address) + services >= int(ipaddress.ip_address(VIP)):
        raise SystemExit(f"{services} synthetic services would reach the benchmark's VIP {VIP}")
    synthetic = synthetic_cluster(services, endpoints)
    # A namespace that sorts in the middle of the synthetic ones (see the module docstring).
    namespaces = sorted({name.namespace for name in synthetic.services}) or ["default"]
    name = ServicePortName(namespaces[len(namespaces) // 2], "connrate", "http")
    real = ServicePort(name=name, port=SERVICE_PORT, target_port=SERVER_PORT, cluster_ips=(VIP,))
    pod = (Endpoint(POD.ip, SERVER_PORT, node_name="node0"),)
    alone = ClusterState({name: real}, {name: pod})
    both = ClusterState({**synthetic.services, name: real}, {**synthetic.endpoints, name: pod})
    rank = sorted(both.services, key=sort_key).index(name)
    return alone, both, rank


# ---------------------------------------------------------------------------------------------
# one sample
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    rate: float  # successful connects per second, summed over the client loops
    ok: int
    errors: Counter[str]
    accepted: int  # by the pod's server
    server_busy: float  # server CPU time / sample duration: near 100% would mean it limits the rate
    cpu_per_conn: float  # µs of CPU (client loops + server) per successful connection

    def describe(self) -> str:
        failed = sum(self.errors.values())
        kinds = f" ({', '.join(f'{k} {v}' for k, v in sorted(self.errors.items()))})" if failed else ""
        check = "" if self.accepted == self.ok and not failed else "   <-- NOT every connection reached the pod"
        return (f"{self.rate:>9,.0f} conn/s   {self.ok:>9,} ok, {failed:,} failed{kinds}, "
                f"pod accepted {self.accepted:,}, server busy {self.server_busy:.0%}, "
                f"{self.cpu_per_conn:.0f} µs CPU/conn{check}")


def _worker_argv(role: str, *args: object) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), role, *map(str, args)]


def _await_ready(proc: subprocess.Popen[bytes], what: str) -> None:
    """Wait for the READY line of an unbuffered worker (select: a hung worker cannot hang us)."""
    assert proc.stdout is not None
    buf = b""
    deadline = time.monotonic() + READY_TIMEOUT
    while not buf.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([proc.stdout], [], [], remaining)[0]:
            raise RuntimeError(f"{what} not ready after {READY_TIMEOUT:.0f} s")
        chunk = os.read(proc.stdout.fileno(), 64)
        if not chunk:
            raise RuntimeError(f"{what} exited with {proc.wait()} before READY")
        buf += chunk
    if buf != b"READY\n":
        raise RuntimeError(f"{what}: unexpected output {buf!r}")


def _result(proc: subprocess.Popen[bytes], what: str, timeout: float) -> Any:
    """Close the worker's stdin, wait for it, return its last line's JSON."""
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {err.decode(errors='replace').strip()}")
    return json.loads(out.decode().strip().splitlines()[-1])


def flush_conntrack(lab: Lab) -> None:
    """Empty the node's conntrack table, so that every sample starts from the same state.

    Each sample leaves rate × duration entries (RST-closed, 10 s CLOSE timeout) behind; without a
    flush they would pile up across samples and, near nf_conntrack_max, drop new connections.
    """
    if shutil.which("conntrack"):
        lab.run_in("node", ["conntrack", "-F"])


def measure(lab: Lab, client: str, clients: int, duration: float) -> Sample:
    flush_conntrack(lab)
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "bufsize": 0}
    # Spawned through the lab: it kills them when it closes, whatever happens here.
    server = lab.spawn(POD.name, _worker_argv("_server", SERVER_PORT), **pipes)
    _await_ready(server, "server")
    loops = [lab.spawn(client, _worker_argv("_client", VIP, SERVICE_PORT, duration), **pipes)
             for _ in range(clients)]
    for loop in loops:
        _await_ready(loop, "client loop")
    for loop in loops:  # the start line: all loops run over the same seconds
        assert loop.stdin is not None
        loop.stdin.write(b"GO\n")
        loop.stdin.flush()
    results = [_result(loop, "client loop", duration + CONNECT_TIMEOUT + 30) for loop in loops]
    served = _result(server, "server", 30)  # closing its stdin stops it
    errors = Counter[str]()
    for r in results:
        errors.update(r["errors"])
    ok = sum(r["ok"] for r in results)
    return Sample(
        rate=sum(r["ok"] / r["elapsed"] for r in results),
        ok=ok,
        errors=errors,
        accepted=served["accepted"],
        server_busy=served["cpu"] / max(r["elapsed"] for r in results),
        cpu_per_conn=1e6 * (served["cpu"] + sum(r["cpu"] for r in results)) / max(ok, 1),
    )


# ---------------------------------------------------------------------------------------------
# one mode
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def counting(on: bool) -> Iterator[None]:
    """nftables rules compiled with (or without) per-endpoint counters on the backend maps; the
    switch exists for this bench only (`compile.nftables.COUNT_CONNECTIONS`)."""
    before, compile_nftables.COUNT_CONNECTIONS = compile_nftables.COUNT_CONNECTIONS, on
    try:
        yield
    finally:
        compile_nftables.COUNT_CONNECTIONS = before


@contextlib.contextmanager
def programmed_lab(mode: str, client: ClientSpec, state: ClusterState, label: str,
                   counters: bool = True) -> Iterator[Lab]:
    """A fresh lab whose node holds *state*'s rules in *mode*, warmed up (neighbours, caches);
    `counters`: nftables' per-endpoint counters (iptables rules always count)."""
    with Lab([POD], [client]) as lab:
        node = NodeContext(hostname="node0", cluster_cidrs=(lab.addressing.cluster_cidr,))
        proxy_mode, _, iptables_backend = mode.partition("-")  # "iptables-legacy": iptables, legacy
        # No cleanup: each mode has its own lab, and deleting its namespaces deletes the rules.
        with (open_proxier(proxy_mode, node, lab.node_ns, iptables_backend=iptables_backend or "nft") as proxier,
              counting(counters)):
            t0 = time.perf_counter()
            proxier.sync(state, full=True)
            print(f"{mode}: {label}: programmed in {time.perf_counter() - t0:.1f} s (lab {lab.run_id})")
            measure(lab, client.name, 1, 1.0)  # warm-up, discarded
            yield lab


@dataclass(frozen=True)
class ModeResult:
    """The samples of one mode at both sizes, in pairs (``none[i]`` and ``scaled[i]``)."""

    mode: str
    services: int
    none: list[Sample]  # the baseline: no services, or (--compare counters) N services without counters
    scaled: list[Sample]
    labels: tuple[str, str] | None = None  # of the two sides; default: none, N services

    @property
    def sides(self) -> tuple[str, str]:
        return self.labels or ("none", f"{self.services:,} services")

    @property
    def rates(self) -> tuple[float, float]:
        """Median conn/s with none and with N services."""
        return statistics.median(s.rate for s in self.none), statistics.median(s.rate for s in self.scaled)

    @property
    def ratio(self) -> float:
        """N / none, from the medians (the issue's figure)."""
        base, scaled = self.rates
        return scaled / base

    @property
    def pair_ratio(self) -> float:
        """Median of the per-pair ratios: less swayed by a machine that drifts between samples."""
        return statistics.median(n.rate / z.rate for z, n in zip(self.none, self.scaled, strict=True))

    @property
    def cpu(self) -> tuple[float, float]:
        """Median µs of CPU per connection, none and N: other processes' load changes the rates much
        more than it changes this, so `cpu[0] / cpu[1]` is a second, quieter estimate of the ratio."""
        return (statistics.median(s.cpu_per_conn for s in self.none),
                statistics.median(s.cpu_per_conn for s in self.scaled))

    @property
    def reached(self) -> str:
        bad = sum(sum(s.errors.values()) + abs(s.accepted - s.ok) for s in (*self.none, *self.scaled))
        return "every connection reached the pod" if not bad else f"{bad:,} connections did NOT reach the pod"

    def __str__(self) -> str:
        (base, scaled), (cpu0, cpu1) = self.rates, self.cpu
        verdict = "met" if self.ratio >= TARGET else "NOT met"
        return (f"{self.mode}: {self.sides[0]} {base:,.0f} conn/s, {self.sides[1]} {scaled:,.0f} conn/s"
                f" ({self.ratio:.2f}×; target ≥ {TARGET}×: {verdict}); median pair ratio {self.pair_ratio:.2f}×;"
                f" CPU per connection {cpu0:.0f} → {cpu1:.0f} µs ({cpu0 / cpu1:.2f}×)")


def run_mode(mode: str, args: argparse.Namespace) -> ModeResult:
    """Measure *mode* at both sizes (or, `--compare counters`, at N services with nftables'
    per-endpoint counters off, then on); print every sample and the result.

    One lab per side, each programmed once, and samples taken in pairs (none, N | N, none | ...):
    switching one lab between the sizes would cost a full load per switch (minutes with iptables
    at 30,000 services), and pairs taken back to back see the same machine, which on a shared,
    noisy one matters more than anything else here.
    """
    alone, both, rank = states(args.services, args.endpoints)
    client = CLIENTS[args.client]
    if args.compare == "counters":
        sides = ((both, f"{args.services:,} services, counters off", False),
                 (both, f"{args.services:,} services, counters on", True))
    else:
        sides = ((alone, "none", True), (both, f"{args.services:,} services", True))
    labels = (sides[0][1], sides[1][1])
    if mode.startswith("iptables"):
        print(f"{mode}: the real service is rule {rank + 1:,} of {len(both.services):,} in KUBE-SERVICES")
    samples: tuple[list[Sample], list[Sample]] = ([], [])
    with contextlib.ExitStack() as stack:
        labs = tuple(stack.enter_context(programmed_lab(mode, client, state, label, counters))
                     for state, label, counters in sides)
        for rep in range(args.reps):
            for size in (0, 1) if rep % 2 == 0 else (1, 0):
                sample = measure(labs[size], client.name, args.clients, args.duration)
                samples[size].append(sample)
                print(f"  {mode:<15} {labels[size]:<17} pair {rep + 1}: {sample.describe()}")
    result = ModeResult(mode, args.services, *samples, labels=labels)
    spread = [f"{min(s.rate for s in v):,.0f}–{max(s.rate for s in v):,.0f}" for v in samples]
    print(f"{result}\n    [{args.reps} pairs × {args.duration:g} s; rates ranged {spread[0]} ({labels[0]}) and"
          f" {spread[1]} ({labels[1]}); {result.reached}]")
    return result


def main() -> None:
    workers = {"_client": lambda a: client_worker(a[0], int(a[1]), float(a[2])),
               "_server": lambda a: server_worker(int(a[0]))}
    if len(sys.argv) > 1 and sys.argv[1] in workers:
        workers[sys.argv[1]](sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=30000)
    parser.add_argument("--endpoints", type=int, default=10, help="endpoints per synthetic service")
    parser.add_argument("--modes", default="nftables,iptables", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per sample")
    parser.add_argument("--reps", type=int, default=6, help="pairs of samples (none, N)")
    parser.add_argument("--clients", type=int, default=2, help="parallel connection loops (one per core)")
    parser.add_argument("--client", choices=sorted(CLIENTS), default="pod",
                        help="pod: source in the cluster CIDR; external: from outside (masqueraded)")
    parser.add_argument("--compare", choices=("size", "counters"), default="size",
                        help="size: none vs N services; counters: N services with nftables' per-endpoint "
                        "counters off vs on (nftables only: iptables rules always count)")
    args = parser.parse_args()
    exit_on_sigterm()
    modes = args.modes.split(",")
    unknown = set(modes) - set(MODES)
    if unknown or args.services < 1 or min(args.reps, args.clients) < 1:
        parser.error(f"bad arguments (unknown modes: {sorted(unknown)})" if unknown else "sizes and counts must be ≥ 1")
    if args.compare == "counters" and modes != ["nftables"]:
        parser.error("--compare counters needs --modes nftables (iptables rules always count)")
    print(f"kernel {os.uname().release}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} "
          f"(the figures are only as quiet as the machine); {args.clients} client loops, {args.client} client")
    results = [run_mode(mode, args) for mode in modes]
    print(f"\nsummary (load average now {os.getloadavg()[0]:.2f}):")
    for result in results:
        print(f"  {result}")


if __name__ == "__main__":
    main()
