"""`kproxy-nft demo`: the seed's experiment, replayed with real packets on one machine.

The notes this project started from (shared/seed) run `curl http://10.101.181.214:8080` from a
throwaway `testpod` again and again and watch three nginx pods answer in turn. Here that
becomes: a netlab (network namespaces: one node, one namespace per pod of the manifests, the
seed's `testpod` inside the cluster CIDR and one client outside it), the manifests' rules
applied in the node namespace, N fresh HTTP GETs per service port, and a table plus bar chart
of which pod answered and what source address it saw. Everything is removed afterwards, also on
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import importlib.resources
import ipaddress
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from kproxy_nft.model import ClusterState, IPFamily, NodeContext
from kproxy_nft.sources.manifests import Manifests, read_manifests
from kproxy_nft.top.view import share_chart

if TYPE_CHECKING:
    from kproxy_nft.lab import Lab, ProbeResult
    from kproxy_nft.proxier import Proxier


class DemoError(RuntimeError):
    """Something the demo needs is missing; the message says what and how to get it."""


@dataclass(frozen=True)
class Target:
    """One service port the clients connect to."""

    label: str  # ns/name:port
    ip: str
    port: int


def seed_directory() -> Path:
    """The seed's Services, EndpointSlices and KubeProxyConfiguration, shipped as package data
    (`kproxy_nft/lab/data/seed`; the checkout's `examples/` links there), so `demo` works from
    an installed wheel as from a checkout."""
    seed = importlib.resources.files("kproxy_nft.lab") / "data" / "seed"
    if not isinstance(seed, Path):  # a zipped install: the lab and the DNS server need real files
        raise DemoError(f"the seed's manifests are not plain files ({seed}): pass them with -f and --config")
    return seed


def preflight(rule_tools: Sequence[str]) -> None:
    """Fail early, and clearly, when not root or a tool is missing (`rule_tools`: the proxier's)."""
    if os.geteuid() != 0:
        raise DemoError("the demo creates network namespaces and loads NAT rules: run it as root (sudo make demo)")
    tools = ["ip", "sysctl", "dig", *rule_tools]
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise DemoError(f"missing {', '.join(missing)}: apt-get install iproute2 iptables nftables procps dnsutils")


@dataclass
class Pod:
    """A pod of the manifests: its name (from the slices' targetRef) and the TCP ports it serves."""

    ip: str
    name: str
    tcp_ports: set[int]

    @property
    def short(self) -> str:
        """A name short enough for namespace and interface names: the pod's random suffix."""
        return self.name.rsplit("-", 1)[-1][:8]


def pods_of(manifests: Manifests) -> list[Pod]:
    """One Pod per endpoint IP of the manifests, in address order."""
    pods: dict[str, Pod] = {}
    for eps in manifests.endpoint_slices:
        tcp_ports = {p.port for p in eps.ports or [] if p.port and (p.protocol or "TCP") == "TCP"}
        for ep in eps.endpoints or []:
            ip = ep.addresses[0]
            pod = pods.setdefault(ip, Pod(ip, "pod-" + ip.replace(".", "-"), set()))
            if ep.target_ref and ep.target_ref.name:
                pod.name = ep.target_ref.name
            pod.tcp_ports |= tcp_ports
    return sorted(pods.values(), key=lambda p: ipaddress.ip_address(p.ip))


def targets_of(manifests: Manifests) -> list[Target]:
    state = manifests.cluster_state()
    return [
        Target(str(name), ip, svc.port)
        for name, svc in sorted(state.services.items(), key=lambda kv: (kv[1].cluster_ips, kv[1].port))
        if (ip := svc.cluster_ip(IPFamily.V4)) and svc.protocol == "TCP"
    ]


def _answer_table(pods: list[Pod], results: dict[Target, ProbeResult], count: int, client_ip: str) -> Table:
    """Rows: service ports; columns: how many of the GETs each pod answered."""
    table = Table(title=f"{count} fresh HTTP GETs per service port from testpod ({client_ip})")
    table.add_column("service port")
    table.add_column("cluster IP")
    for pod in pods:
        table.add_column(f"{pod.short}\n{pod.ip}", justify="right")
    table.add_column("failed", justify="right")
    for target, result in results.items():
        counts = result.counts()
        table.add_row(target.label.split("/", 1)[-1], f"{target.ip}:{target.port}",
                      *(str(counts.get(pod.short, 0)) for pod in pods), str(len(result.failures)))
    return table


def _share_chart(pods: list[Pod], results: dict[Target, ProbeResult], count: int) -> Table:
    """A bar per pod and service port: the share of connections it answered (ideal: 1/N)."""
    return share_chart(
        (f"[bold]{target.ip}:{target.port}[/]", [(pod.name, result.counts().get(pod.short, 0) / count) for pod in pods])
        for target, result in results.items()
    )


# The seed's first service port: the packet the demo traces and whose counters it shows.
TRACED = ("10.101.181.214", 8080)


def _trace_text(lab: Lab, proxier: Proxier, state: ClusterState, node: NodeContext, source: str,
                target: Target) -> str:
    """`kproxy-nft trace --live` of one packet from `source` to `target`, on the lab's node."""
    from kproxy_nft.kernel.addresses import local_addresses
    from kproxy_nft.trace import node_addresses, parse_packet, trace
    from kproxy_nft.trace.reasons import explain
    from kproxy_nft.trace.text import render_text

    packet = parse_packet(source, f"{target.ip}:{target.port}")
    local = node_addresses(node, local_addresses(lab.node_ns))
    program = proxier.live_trace_program(IPFamily.V4, local)
    if program is None:
        raise DemoError(f"no {proxier.mode} rules to trace in {lab.node_ns}")
    return render_text(packet, trace(program, packet, local, explain(state, node, packet, local)))


def _counters_table(proxier: Proxier, pods: list[Pod], target: Target, tally: dict[str, int]) -> tuple[Table, int]:
    """The kernel's per-endpoint counters for `target` beside the demo's own tally of who
    answered (`tally`: pod short name → GETs); and how many endpoints disagree."""
    sample = proxier.connection_counts((IPFamily.V4,))
    frontend = f"{target.ip}:{target.port}/tcp"
    counted: dict[str, int] = {}
    for svc in sample.services if sample is not None else ():
        if svc.frontend == frontend:
            for ep in svc.endpoints:
                ip = ep.address.rsplit(":", 1)[0]
                counted[ip] = counted.get(ip, 0) + ep.connections
    table = Table(title=f"new connections to {target.ip}:{target.port} the kernel counted ({proxier.mode} "
                  f"{proxier.counters_kept})")
    for column in ("pod", "endpoint", "kernel counted", "pods answered"):
        table.add_column(column, justify="left" if column in ("pod", "endpoint") else "right")
    disagree = 0
    for pod in pods:
        kernel, answered = counted.get(pod.ip, 0), tally.get(pod.short, 0)
        disagree += kernel != answered
        table.add_row(pod.name, pod.ip, str(kernel), str(answered), style=None if kernel == answered else "red")
    return table, disagree


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so `finally` blocks (the lab's cleanup) still run."""

    owner = os.getpid()

    def handler(signum: int, _frame: FrameType | None) -> None:
        if os.getpid() != owner:
            # A forked helper (pyroute2 creates namespaces from one) inherits this handler;
            # it must die the default way, not unwind a copy of the demo.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# The seed's cluster DNS (notes 6.2.2): `nameserver 10.96.0.10` with kube-dns behind it.
KUBE_DNS_IP = "10.96.0.10"
RESOLV_CONF = """nameserver {ip}
search default.svc.cluster.local svc.cluster.local cluster.local
options ndots:5
"""


def kube_dns_manifest(coredns_ip: str, node_name: str) -> str:
    """The kube-dns Service and its one endpoint (our DNS server as the CoreDNS pod)."""
    return f"""\
apiVersion: v1
kind: Service
metadata: {{name: kube-dns, namespace: kube-system}}
spec:
  clusterIP: {KUBE_DNS_IP}
  ports:
    - {{name: dns, port: 53, protocol: UDP, targetPort: 53}}
    - {{name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kube-dns-demo
  namespace: kube-system
  labels: {{kubernetes.io/service-name: kube-dns}}
addressType: IPv4
ports:
  - {{name: dns, port: 53, protocol: UDP}}
  - {{name: dns-tcp, port: 53, protocol: TCP}}
endpoints:
  - addresses: [{coredns_ip}]
    nodeName: {node_name}
    targetRef: {{kind: Pod, namespace: kube-system, name: coredns-demo}}
"""


def run_demo(
    paths: list[str],
    node: NodeContext,
    apply_rules: Callable[[str, ClusterState], str],
    count: int,
    console: Console,
    rule_tools: Sequence[str],
    mode: str = "iptables",
) -> int:
    """Build the lab, apply the rules with `apply_rules(node_namespace, state)`, probe, report.

    `apply_rules` returns a one-line description of what it did (`mode`'s rules). Returns the
    number of failed connections and lookups, and of endpoints whose kernel counter disagrees
    with the pods' answers (0 is a clean run).
    """
    from kproxy_nft.lab import Addressing, ClientSpec, Lab, PodSpec
    from kproxy_nft.lab.dns_launch import start_dns_server_in

    preflight(rule_tools)
    manifests = read_manifests(paths)
    pods = pods_of(manifests)
    targets = targets_of(manifests)
    if not pods or not targets:
        raise DemoError("the manifests hold no ClusterIP service with endpoints to replay")
    cidr = ipaddress.ip_network(node.cluster_cidrs[0] if node.cluster_cidrs else "10.1.0.0/16")
    testpod_ip = str(ipaddress.ip_address(pods[-1].ip) + 1)  # the seed's `kubectl run testpod`, next to the pods
    coredns_ip = str(cidr.network_address + 10)
    pod_specs = [PodSpec(pod.short, pod.ip, tuple(sorted(pod.tcp_ports))) for pod in pods]
    clients = [ClientSpec("testpod", testpod_ip), ClientSpec("outside", "192.168.100.2")]
    addressing = Addressing(cluster_cidr=str(cidr), pod_gateway=str(cidr.network_address + 1))

    with (tempfile.TemporaryDirectory(prefix="kpn-demo-") as scratch, sigterm_as_exit(),
          Lab([*pod_specs, PodSpec("coredns", coredns_ip, ())], clients, addressing=addressing) as lab):
        dns_manifest = Path(scratch, "kube-dns.yaml")
        dns_manifest.write_text(kube_dns_manifest(coredns_ip, node.hostname))
        state = read_manifests([*paths, str(dns_manifest)]).cluster_state()
        console.print(f"[bold]lab[/] {lab.run_id}: node [cyan]{lab.node_ns}[/], {len(pods)} pods, "
                      f"testpod {testpod_ip} (inside {cidr}), an outside client 192.168.100.2, "
                      f"kube-dns {KUBE_DNS_IP} → coredns {coredns_ip}")
        console.print(apply_rules(lab.node_ns, state))
        lab.start_servers([spec.name for spec in pod_specs])
        failures = 0
        results = {}
        for target in targets:
            results[target] = lab.probe("testpod", target.ip, target.port, count=count)
            failures += len(results[target].failures)
        console.print(_answer_table(pods, results, count, testpod_ip))
        console.print(_share_chart(pods, results, count))
        failures += _trace_and_count(lab, mode, state, node, testpod_ip, pods, results, console)
        first = targets[0]
        inside = lab.probe("testpod", first.ip, first.port, count=5)
        outside = lab.probe("outside", first.ip, first.port, count=5)
        failures += len(inside.failures) + len(outside.failures)
        console.print(f"source address the pods saw for {first.ip}:{first.port}: "
                      f"from testpod [green]{', '.join(sorted(inside.seen_ips()))}[/] (inside the cluster CIDR: "
                      f"no SNAT); from outside [green]{', '.join(sorted(outside.seen_ips()))}[/] "
                      f"(masqueraded to the node: traffic from outside {cidr})")
        with start_dns_server_in(lab.ns_of("coredns"), [*paths, str(dns_manifest)], f"{coredns_ip}:53"):
            resolv_conf = Path(scratch, "resolv.conf")
            resolv_conf.write_text(RESOLV_CONF.format(ip=KUBE_DNS_IP))
            failures += _dns_lookups(lab, str(resolv_conf), targets, console)
    console.print(f"[bold]done[/]: namespaces of lab {lab.run_id} removed; {failures} failures")
    return failures


def _trace_and_count(lab: Lab, mode: str, state: ClusterState, node: NodeContext, source: str, pods: list[Pod],
                     results: dict[Target, ProbeResult], console: Console) -> int:
    """Right after the curl spread: where one packet from testpod to the seed's first service
    port goes (the live trace), and the connections the kernel counted per endpoint, which must
    equal who answered. Returns the endpoints whose counts disagree."""
    from kproxy_nft.config import ProxySettings
    from kproxy_nft.proxier import make_proxier

    target = next((t for t in results if (t.ip, t.port) == TRACED), next(iter(results)))
    # Only reads: the mode's own proxier says where its rules and counters are.
    proxier = make_proxier(ProxySettings(mode, node), netns=lab.node_ns, families=(IPFamily.V4,))
    try:
        table, disagree = _counters_table(proxier, pods, target, results[target].counts())
        console.print(f"[bold]trace[/] (kproxy-nft trace --live --src {source} --dst {target.ip}:{target.port}):")
        console.print(_trace_text(lab, proxier, state, node, source, target), highlight=False)
    finally:
        proxier.close()
    console.print(table)
    console.print("the kernel's counters agree with the pods' answers" if not disagree
                  else f"[red]{disagree} endpoints: the kernel's counters differ from the pods' answers[/]")
    return disagree


def _dns_lookups(lab: Lab, resolv_conf: str, targets: list[Target], console: Console) -> int:
    """The seed's 6.2.2 from testpod, through kube-dns's ClusterIP: a short name via the search
    list, an SRV record with dig, then GETs to the name's address. Returns the failures."""
    failures = 0
    console.print(f"[bold]cluster DNS[/] from testpod (resolv.conf: nameserver {KUBE_DNS_IP}, "
                  "search default.svc.cluster.local svc.cluster.local cluster.local, ndots:5)")
    by_service: dict[str, Target] = {}
    for t in targets:
        by_service.setdefault(t.label.split(":")[0], t)
    for service, target in by_service.items():
        short = service.split("/")[1]
        argv = [sys.executable, "-m", "kproxy_nft.lab.dns_lookup", "--resolv-conf", resolv_conf, short]
        answer = json.loads(lab.run_in(lab.ns_of("testpod"), argv).stdout)
        if answer.get("records") != [target.ip]:
            failures += 1
            console.print(f"  [red]{short}: {answer}[/]")
            continue
        got = lab.probe("testpod", answer["records"][0], target.port, count=5)
        failures += len(got.failures)
        console.print(f"  curl http://{short}:{target.port} → [green]{answer['answered']} A {target.ip}[/] "
                      f"(first of the search list) → answered by {', '.join(sorted(got.counts()))}")
    multi = [t for t in targets if t.label.endswith(":https-port")] or targets[-1:]
    for target in multi:
        namespace, rest = target.label.split("/", 1)
        service, port_name = rest.split(":", 1)
        qname = f"_{port_name}._tcp.{service}.{namespace}.svc.cluster.local"
        dig = lab.run_in(lab.ns_of("testpod"), ["dig", f"@{KUBE_DNS_IP}", qname, "SRV", "+noall", "+answer",
                                               "+additional"], check=False)
        if dig.returncode != 0 or f" {target.port} " not in dig.stdout:
            failures += 1
        console.print(f"  dig {qname} SRV")
        for line in dig.stdout.strip().splitlines():
            console.print(f"    {line}", highlight=False)
    return failures
