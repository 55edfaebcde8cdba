"""Throwaway network-namespace topology ("node" + pods + clients) with real servers.

:class:`Lab` is a context manager that builds, entirely inside fresh network namespaces
named ``kpn-<runid>-*``, a routed-veth topology (Calico style, no bridge, so hairpin
traffic works)::

    pod ns  kpn-<id>-pod-<name>  eth0 10.1.0.47/32     --- vp0-<name>  10.1.0.1/32      \\
    pod cl  kpn-<id>-cli-<name>  eth0 10.1.0.50/32     --- vc0-<name>  10.1.0.1/32       \\ node ns
    ext cl  kpn-<id>-cli-<name>  eth0 192.168.100.2/32 --- vc1-<name>  192.168.100.1/32  / kpn-<id>-node
    wan     kpn-<id>-wan         eth0 192.168.100.254  --- uplink0     192.168.100.1/32 /

Pods and pod clients (client IP inside the cluster CIDR) use ``10.1.0.1``
(``Addressing.pod_gateway``) as on-link default gateway; external clients use
``192.168.100.1`` (``Addressing.node_ip``).  The node has a ``/32`` route per attached
namespace and a default route via ``192.168.100.254`` in the dead-end "wan" namespace
(no forwarding there, so whatever the node sends to it is silently dropped).  Service IPs
are on no interface: traffic to them only reaches a pod if the node's NAT rules DNAT it
(nat PREROUTING for pods/clients, nat OUTPUT for traffic generated on the node).

Dual-stack.  A lab in which some pod or client has an ``ip6`` is built dual-stack: the same
veths carry IPv6 too, with the ``Addressing.*6`` addresses in the same roles (``/128`` each,
pod gateway ``fd00:10:1::1``, node ``fd00:192:168:100::1``, upstream ``fd00:192:168:100::fe``),
the node forwards IPv6, and the servers of pods with an ``ip6`` listen on both families.
Duplicate address detection is off (``accept_dad=0`` plus ``nodad``), so addresses are usable
at once instead of after a second of "tentative".  A lab without any ``ip6`` keeps IPv6
disabled in all its namespaces, exactly as before.

Nothing is ever created in, or connected to, the root namespace; everything this lab
created (namespaces, and with them all links, routes and firewall rules, plus every
process it started) is removed on exit, also on exceptions and Ctrl-C.  Namespaces that
this instance did not create are never touched.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

from kproxy_nft.kernel.netns import exec_argv
from kproxy_nft.kernel.netns import existing as netns_names

from .result import ProbeResult
from .specs import NODE, Addressing, ClientSpec, PodSpec

PREFIX = "kpn-"
UPLINK = "uplink0"  # node-side veth towards the wan namespace

_COMMON_SYSCTLS = (
    "net.ipv4.icmp_ratelimit=0",  # port-unreachable for every refused UDP probe
    "net.ipv4.icmp_msgs_per_sec=100000",  # (the global ICMP budget, shared with ICMPv6)
    "net.ipv4.icmp_msgs_burst=100000",
)
_IPV4_ONLY_SYSCTLS = (
    "net.ipv6.conf.all.disable_ipv6=1",  # IPv4-only lab: no RS/MLD/DAD chatter on the veths
    "net.ipv6.conf.default.disable_ipv6=1",
)
_DUAL_STACK_SYSCTLS = (
    "net.ipv6.conf.all.disable_ipv6=0",
    "net.ipv6.conf.default.disable_ipv6=0",
    "net.ipv6.conf.all.accept_dad=0",  # no DAD: addresses (link-local too) usable at once
    "net.ipv6.conf.default.accept_dad=0",
    "net.ipv6.conf.all.accept_ra=0",  # routes are static; never learn any from a neighbour
    "net.ipv6.conf.default.accept_ra=0",
    "net.ipv6.conf.default.router_solicitations=0",
    "net.ipv6.icmp.ratelimit=0",  # ICMPv6 port unreachable (REJECT) for every refused probe
)
_NODE_SYSCTLS = (
    "net.ipv4.ip_forward=1",
    "net.ipv4.conf.all.rp_filter=0",  # do not depend on the host's (inherited) setting
    "net.ipv4.conf.default.rp_filter=0",
    "net.ipv4.conf.all.send_redirects=0",
    "net.ipv4.conf.default.send_redirects=0",
)
_NODE_IPV6_SYSCTLS = ("net.ipv6.conf.all.forwarding=1",)
_LEAF_SYSCTLS = ("net.ipv4.ip_forward=0",)  # pods, clients and the dead-end wan
_IFA_F_NODAD = 0x02  # linux/if_addr.h: skip duplicate address detection for this address

# The server and prober are stdlib-only scripts; they are run by path with ``-I -S`` (no
# site, no package __init__), so they start in a few milliseconds whatever is installed.
_HERE = Path(__file__).resolve().parent


class NetlabError(RuntimeError):
    """A lab could not be built, a helper process failed, or cleanup was incomplete."""


class LabCommandError(subprocess.CalledProcessError):
    """``CalledProcessError`` whose message includes the command's stderr."""

    def __str__(self) -> str:
        err = self.stderr.strip() if isinstance(self.stderr, str) else ""
        return super().__str__() + (f"\nstderr: {err}" if err else "")


@dataclass(frozen=True)
class Attachment:
    """How one pod/client namespace is wired to the node (derived from the specs).

    ``ip6``/``gateway6`` are set for a dual-stack pod or client (both or neither).
    """

    name: str
    ip: str
    ns: str
    node_ifname: str
    gateway: str
    is_pod: bool
    ip6: str | None = None
    gateway6: str | None = None


def _family(ip: str) -> tuple[int, int]:
    """(address family, host prefix length) of *ip*."""
    return (socket.AF_INET6, 128) if ":" in ip else (socket.AF_INET, 32)


# Routed-veth wiring, one family at a time: each side has a host address (/32 or /128) and a
# host route to the other side's; IPv6 addresses skip DAD (the lab also sets accept_dad=0,
# but `nodad` makes it independent of sysctl ordering).  Route scope is an IPv4 notion.
def _host_address(ipr: Any, index: int, ip: str) -> None:
    family, prefixlen = _family(ip)
    extra = {"flags": _IFA_F_NODAD} if family == socket.AF_INET6 else {}
    ipr.addr("add", index=index, address=ip, prefixlen=prefixlen, family=family, **extra)


def _host_route(ipr: Any, index: int, dst: str, prefsrc: str | None = None) -> None:
    family, prefixlen = _family(dst)
    extra: dict[str, Any] = {"scope": "link"} if family == socket.AF_INET else {}
    if prefsrc is not None:
        extra["prefsrc"] = prefsrc
    ipr.route("add", dst=f"{dst}/{prefixlen}", oif=index, family=family, **extra)


def _default_route(ipr: Any, index: int, gateway: str, prefsrc: str | None = None) -> None:
    family, _ = _family(gateway)
    extra = {} if prefsrc is None else {"prefsrc": prefsrc}
    default = "::/0" if family == socket.AF_INET6 else "0.0.0.0/0"
    ipr.route("add", dst=default, gateway=gateway, oif=index, family=family, **extra)


def _veth_end(ipr: Any, index: int, pairs: Sequence[tuple[str, str]], *, prefsrc: bool, default: bool) -> None:
    """Address one end of a veth and bring it up; `pairs`: (this end's address, the peer's) per family.

    Each own address is a host address; each peer gets a link route (from the own address with
    `prefsrc`) and, with `default`, is the default gateway.
    """
    for own, _ in pairs:
        _host_address(ipr, index, own)
    ipr.link("set", index=index, state="up")
    for own, peer in pairs:
        src = own if prefsrc else None
        _host_route(ipr, index, peer, prefsrc=src)
        if default:
            _default_route(ipr, index, peer, prefsrc=src)


def _fresh_run_id() -> str:
    existing = netns_names()
    for _ in range(100):
        rid = secrets.token_hex(2)
        if not any(ns.startswith(f"{PREFIX}{rid}-") for ns in existing):
            return rid
    raise NetlabError("could not find an unused run id")


def _read_ready(proc: subprocess.Popen[bytes], deadline: float) -> str:
    """Wait (without a fixed sleep) for the READY line of *proc*; return it."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no READY line")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            raise EOFError(f"exited with {proc.wait()}")
        buf += chunk
    line = buf.split(b"\n", 1)[0].decode(errors="replace")
    if not line.startswith("READY"):
        raise EOFError(f"unexpected output {line!r}")
    return line


@contextlib.contextmanager
def _deferred_sigint() -> Iterator[None]:
    """Hold back Ctrl-C during a critical section and re-raise it afterwards (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def remember(signum: int, _frame: FrameType | None) -> None:
        pending.append(signum)

    old = signal.signal(signal.SIGINT, remember)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if pending:
        raise KeyboardInterrupt


def _stderr_of(log: IO[bytes]) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace").strip()


class ProbeLoop:
    """A prober making back-to-back fresh connections until :meth:`stop` is called."""

    def __init__(self, proc: subprocess.Popen[bytes], log: IO[bytes], timeout: float) -> None:
        self._proc = proc
        self._log = log
        self._timeout = timeout
        self._result: ProbeResult | None = None

    @property
    def running(self) -> bool:
        return self._result is None and self._proc.poll() is None

    def stop(self) -> ProbeResult:
        """Stop after the current attempt and return every attempt made."""
        if self._result is not None:
            return self._result
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self._proc.communicate(timeout=self._timeout + 10.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.communicate()
            raise NetlabError("probe loop did not stop") from None
        if self._proc.returncode != 0:
            raise NetlabError(f"probe loop failed ({self._proc.returncode}): {_stderr_of(self._log)}")
        self._log.close()
        self._result = ProbeResult.from_json(out.decode().strip().splitlines()[-1])
        return self._result

    def _kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._log.close()


class Lab:
    """Node + pod + client namespaces; use as ``with Lab(pods, clients) as lab: ...``."""

    def __init__(
        self,
        pods: Sequence[PodSpec],
        clients: Sequence[ClientSpec] = (),
        run_id: str | None = None,
        addressing: Addressing | None = None,
        ready_timeout: float = 10.0,
    ) -> None:
        self.addressing = addressing or Addressing()
        self.pods: tuple[PodSpec, ...] = tuple(pods)
        self.clients: tuple[ClientSpec, ...] = tuple(clients)
        self.ready_timeout = ready_timeout
        self._check_specs()
        self.ip_cmd = shutil.which("ip") or ""
        if not self.ip_cmd:
            raise NetlabError("the `ip` command (iproute2) is required")
        if run_id is not None and not (run_id.isalnum() and run_id.islower() and len(run_id) <= 8):
            raise ValueError(f"run_id must be 1-8 lower-case alphanumerics, got {run_id!r}")
        #: Dual-stack when any pod or client has an IPv6 address (else IPv6 stays disabled).
        self.ipv6 = any(spec.ip6 is not None for spec in self._specs())
        self.run_id = run_id or _fresh_run_id()
        self.prefix = f"{PREFIX}{self.run_id}-"
        self.node_ns = self.prefix + "node"
        self.wan_ns = self.prefix + "wan"
        a = self.addressing
        self.attachments: dict[str, Attachment] = {}
        for i, pod in enumerate(self.pods):
            ns, ifname = f"{self.prefix}pod-{pod.name}", f"vp{i}-{pod.name}"[:15]
            gw6 = a.pod_gateway6 if pod.ip6 else None
            self.attachments[pod.name] = Attachment(pod.name, pod.ip, ns, ifname, a.pod_gateway, True, pod.ip6, gw6)
        for i, cl in enumerate(self.clients):
            inside = a.in_cluster(cl.ip)
            gw, gw6 = (a.pod_gateway, a.pod_gateway6) if inside else (a.node_ip, a.node_ip6)
            ns, ifname = f"{self.prefix}cli-{cl.name}", f"vc{i}-{cl.name}"[:15]
            self.attachments[cl.name] = Attachment(
                cl.name, cl.ip, ns, ifname, gw, False, cl.ip6, gw6 if cl.ip6 else None
            )
        self._created: list[str] = []  # namespaces this instance created (only these are removed)
        self._servers: dict[str, tuple[subprocess.Popen[bytes], IO[bytes]]] = {}
        self._loops: list[ProbeLoop] = []
        self._spawned: list[subprocess.Popen[Any]] = []
        self._started = False
        self._closed = False

    def _specs(self) -> tuple[PodSpec | ClientSpec, ...]:
        return (*self.pods, *self.clients)

    # ------------------------------------------------------------------ naming
    @property
    def node_ips(self) -> tuple[str, ...]:
        """The node's own addresses: primary (uplink/external side) and pod gateway."""
        return (self.addressing.node_ip, self.addressing.pod_gateway)

    @property
    def node_ips6(self) -> tuple[str, ...]:
        """The node's own IPv6 addresses (same roles as :attr:`node_ips`); empty unless dual-stack."""
        return (self.addressing.node_ip6, self.addressing.pod_gateway6) if self.ipv6 else ()

    @property
    def namespaces(self) -> tuple[str, ...]:
        """All namespace names of this lab (created or to be created)."""
        return (self.node_ns, self.wan_ns, *(att.ns for att in self.attachments.values()))

    def pod_ns(self, name: str) -> str:
        att = self.attachments.get(name)
        if att is None or not att.is_pod:
            raise KeyError(f"no pod {name!r}")
        return att.ns

    def client_ns(self, name: str) -> str:
        att = self.attachments.get(name)
        if att is None or att.is_pod:
            raise KeyError(f"no client {name!r}")
        return att.ns

    def ns_of(self, name: str) -> str:
        """Namespace of a pod or client name, ``"node"``, or one of this lab's namespace names."""
        if name == NODE:
            return self.node_ns
        if name in self.attachments:
            return self.attachments[name].ns
        if name in self.namespaces:
            return name
        raise KeyError(f"{name!r} is not a pod, client, 'node' or namespace of lab {self.run_id}")

    def describe(self) -> str:
        """Human-readable topology summary (for ``kproxy-nft demo`` and debugging)."""
        a = self.addressing
        lines = [
            f"lab {self.run_id}: node {self.node_ns} (ip_forward=1), node IPs {', '.join(self.node_ips)}",
            f"  {UPLINK:<15} {a.node_ip}/32 -> default via {a.upstream} ({self.wan_ns}, dead end)",
        ]
        if self.ipv6:
            lines.append(f"  {'':<15} {a.node_ip6}/128 -> default via {a.upstream6} (IPv6, forwarding=1)")
        for att in self.attachments.values():
            role = "pod" if att.is_pod else ("pod client" if self.addressing.in_cluster(att.ip) else "external client")
            lines.append(f"  {att.node_ifname:<15} {att.gateway}/32 -> {att.ip} {att.name} [{role}] ({att.ns})")
            if att.ip6:
                lines.append(f"  {'':<15} {att.gateway6}/128 -> {att.ip6}")
        return "\n".join(lines)

    def ip_of(self, name: str) -> str:
        return self.attachments[name].ip

    def ip6_of(self, name: str) -> str:
        """IPv6 address of pod/client *name* (KeyError if it has none)."""
        ip6 = self.attachments[name].ip6
        if ip6 is None:
            raise KeyError(f"{name!r} has no IPv6 address")
        return ip6

    def node_ifname(self, name: str) -> str:
        """Name of the node-side veth leading to pod/client *name*."""
        return self.attachments[name].node_ifname

    # --------------------------------------------------------------- lifecycle
    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except NetlabError as cleanup_error:
            if exc is None:
                raise
            exc.add_note(str(cleanup_error))  # do not mask the body's exception

    def start(self) -> None:
        """Build the topology (cleaning up everything already created if that fails)."""
        if self._started:
            raise NetlabError("lab already started")
        self._started = True
        try:
            self._build()
        except BaseException:
            with contextlib.suppress(NetlabError):
                self.close()
            raise

    def close(self) -> None:
        """Kill every process started by this lab and delete every namespace it created."""
        errors: list[str] = []
        with _deferred_sigint():  # Ctrl-C must not interrupt the cleanup itself
            try:
                self._stop_processes(errors)
            finally:
                self._remove_namespaces(errors)
                self._closed = True
        if errors:
            raise NetlabError("cleanup incomplete: " + "; ".join(errors))

    def _stop_processes(self, errors: list[str]) -> None:
        for loop in self._loops:
            try:
                loop._kill()
            except Exception as exc:  # keep cleaning up
                errors.append(f"probe loop: {exc}")
        self._loops.clear()
        procs: list[subprocess.Popen[Any]] = [p for p, _ in self._servers.values()] + self._spawned
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        for _, log in self._servers.values():
            log.close()
        self._servers.clear()
        self._spawned.clear()

    def _remove_namespaces(self, errors: list[str]) -> None:
        if not self._created:
            return
        from pyroute2 import netns

        for ns in reversed(self._created):
            try:
                netns.remove(ns)
            except FileNotFoundError:
                pass
            except OSError as exc:
                errors.append(f"{ns}: {exc}")
        self._created.clear()

    # ------------------------------------------------------------------- build
    def _check_specs(self) -> None:
        names = [p.name for p in self.pods] + [c.name for c in self.clients]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate pod/client names: {sorted(dup)}")
        a = self.addressing
        specs = self._specs()
        # Compared as parsed addresses: "fd00::0:1" and "fd00::1" are the same IPv6 address.
        ips = [ipaddress.ip_address(ip) for s in specs for ip in (s.ip, s.ip6) if ip is not None]
        dup = {str(ip) for ip in ips if ips.count(ip) > 1}
        if dup:
            raise ValueError(f"duplicate IPs: {sorted(dup)}")
        node_addresses = (a.node_ip, a.pod_gateway, a.upstream, a.node_ip6, a.pod_gateway6, a.upstream6)
        reserved = {ipaddress.ip_address(ip) for ip in node_addresses}
        if reserved & set(ips):
            raise ValueError(f"pod/client IPs must not use node addresses {sorted(map(str, reserved))}")
        for pod in self.pods:
            if not a.in_cluster(pod.ip):
                raise ValueError(f"pod {pod.name} IP {pod.ip} not in {a.cluster_cidr}")
            if pod.ip6 is not None and not a.in_cluster(pod.ip6):
                raise ValueError(f"pod {pod.name} IPv6 {pod.ip6} not in {a.cluster_cidr6}")
        for cl in self.clients:
            # The IPv4 address decides pod client vs external client; IPv6 must agree, since
            # both families share the client's one veth and gateway role.
            if cl.ip6 is not None and a.in_cluster(cl.ip6) != a.in_cluster(cl.ip):
                raise ValueError(f"client {cl.name}: {cl.ip} and {cl.ip6} must be both in or both out of the cluster")

    def _build(self) -> None:
        from pyroute2 import IPRoute, netns

        existing = netns_names()
        clash = [ns for ns in existing if ns.startswith(self.prefix)]
        if clash:
            raise NetlabError(f"run id {self.run_id} already in use by {clash}")
        for ns in self.namespaces:
            with _deferred_sigint():  # never leave a created namespace unrecorded
                netns.create(ns)  # raises FileExistsError rather than reusing a foreign namespace
                self._created.append(ns)
        # sysctls before any interface exists, so that `default` applies to the new links
        jobs = [(ns, self._sysctls(ns)) for ns in self.namespaces]
        procs = [
            (
                ns,
                subprocess.Popen(  # noqa: S603
                    exec_argv(ns, ["sysctl", "-q", "-e", "-w", *keys]),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    stdin=subprocess.DEVNULL,
                    text=True,
                ),
            )
            for ns, keys in jobs
        ]
        self._spawned += [proc for _, proc in procs]  # so that an interrupt still reaps them
        for ns, proc in procs:
            _, err = proc.communicate(timeout=30)
            if proc.returncode != 0:
                raise NetlabError(f"sysctl in {ns} failed: {err.strip()}")
        self._spawned.clear()

        a = self.addressing
        with IPRoute(netns=self.node_ns, flags=0) as node:
            node.link("set", index=node.link_lookup(ifname="lo")[0], state="up")
            node.link("add", ifname=UPLINK, kind="veth", peer={"ifname": "eth0", "net_ns_fd": self.wan_ns})
            up = node.link_lookup(ifname=UPLINK)[0]
            uplink = [(a.node_ip, a.upstream)] + ([(a.node_ip6, a.upstream6)] if self.ipv6 else [])
            _veth_end(node, up, uplink, prefsrc=True, default=True)
            with IPRoute(netns=self.wan_ns, flags=0) as wan:
                eth0 = wan.link_lookup(ifname="eth0")[0]
                _veth_end(wan, eth0, [(upstream, own) for own, upstream in uplink], prefsrc=False, default=False)
            for att in self.attachments.values():
                peer = {"ifname": "eth0", "net_ns_fd": att.ns}  # created directly inside the pod ns
                node.link("add", ifname=att.node_ifname, kind="veth", peer=peer)
                idx = node.link_lookup(ifname=att.node_ifname)[0]
                # (pod/client address, node-side gateway) per family this namespace has
                pairs = [(att.ip, att.gateway)] + ([(att.ip6, att.gateway6)] if att.ip6 and att.gateway6 else [])
                _veth_end(node, idx, [(gateway, ip) for ip, gateway in pairs], prefsrc=True, default=False)
                with IPRoute(netns=att.ns, flags=0) as inner:
                    inner.link("set", index=inner.link_lookup(ifname="lo")[0], state="up")
                    eth0 = inner.link_lookup(ifname="eth0")[0]
                    _veth_end(inner, eth0, pairs, prefsrc=False, default=True)

    def _sysctls(self, ns: str) -> tuple[str, ...]:
        """The sysctls of namespace *ns*: role (node or leaf) and IPv4-only or dual-stack."""
        keys = _COMMON_SYSCTLS + (_NODE_SYSCTLS if ns == self.node_ns else _LEAF_SYSCTLS)
        if not self.ipv6:
            return keys + _IPV4_ONLY_SYSCTLS
        return keys + _DUAL_STACK_SYSCTLS + (_NODE_IPV6_SYSCTLS if ns == self.node_ns else ())

    # --------------------------------------------------------------- commands
    def _exec_argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        if self._closed or not self._created:
            raise NetlabError("lab is not running")
        target = self.ns_of(ns)
        if target not in self._created:
            raise NetlabError(f"namespace {target} was not created by this lab")
        return list(exec_argv(target, argv))

    def run_in(
        self,
        ns: str,
        argv: Sequence[str],
        input: str | None = None,
        check: bool = True,
        timeout: float | None = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ip netns exec <ns> argv...`` (ns: namespace name, pod/client name or "node")."""
        cmd = self._exec_argv(ns, argv)
        proc = subprocess.run(  # noqa: S603
            cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise LabCommandError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def spawn(self, ns: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start a background process in *ns*; it is terminated when the lab closes."""
        proc: subprocess.Popen[Any] = subprocess.Popen(  # noqa: S603
            self._exec_argv(ns, argv), start_new_session=True, **popen_kwargs
        )
        self._spawned.append(proc)
        return proc

    def _python(self, module: str, args: Sequence[str]) -> list[str]:
        """argv running ``kproxy_nft/lab/<module>.py`` (same as ``python -m ...``)."""
        return [sys.executable, "-I", "-S", str(_HERE / f"{module}.py"), *args]

    # ---------------------------------------------------------------- servers
    def start_servers(self, names: Iterable[str] | None = None) -> None:
        """Start the server of each (or the named) pod and wait until all are listening."""
        wanted = None if names is None else set(names)
        pods = [p for p in self.pods if wanted is None or p.name in wanted]
        if wanted is not None and len(pods) != len(wanted):
            raise KeyError(f"unknown pods in {sorted(wanted)}")
        started: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []
        for pod in pods:
            if pod.name in self._servers or not (pod.tcp_ports or pod.udp_ports):
                continue
            args = ["--name", pod.name]
            if pod.ip6:
                args += ["--bind", "0.0.0.0", "--bind", "::"]  # both families (the default: IPv4 only)
            for port in pod.tcp_ports:
                args += ["--tcp", str(port)]
            for port in pod.udp_ports:
                args += ["--udp", str(port)]
            log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed by the lab)
            proc = subprocess.Popen(  # noqa: S603
                self._exec_argv(self.pod_ns(pod.name), self._python("server", args)),
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            self._servers[pod.name] = (proc, log)
            started.append((pod.name, proc, log))
        deadline = time.monotonic() + self.ready_timeout
        for name, proc, log in started:
            try:
                _read_ready(proc, deadline)
            except (TimeoutError, EOFError) as exc:
                raise NetlabError(f"server of pod {name} not ready: {exc}: {_stderr_of(log)}") from None
            assert proc.stdout is not None
            proc.stdout.close()  # the server never writes after READY

    def stop_server(self, name: str) -> None:
        """Stop the server of pod *name* (its ports then refuse connections)."""
        entry = self._servers.pop(name, None)
        if entry is None:
            return
        proc, log = entry
        proc.terminate()
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()

    # ----------------------------------------------------------------- probes
    def _probe_args(
        self, target_ip: str, port: int, proto: str, timeout: float, source_port: int | None, interval: float
    ) -> list[str]:
        if proto not in ("tcp", "udp"):
            raise ValueError(f"proto must be tcp or udp, got {proto!r}")
        host = f"[{target_ip}]" if ":" in target_ip else target_ip
        args = ["--target", f"{host}:{port}", "--timeout", str(timeout)]
        if proto == "udp":
            args.append("--udp")
        if source_port is not None:
            args += ["--source-port", str(source_port)]
        if interval > 0:
            args += ["--interval", str(interval)]
        return args

    def probe(
        self,
        client: str,
        target_ip: str,
        port: int,
        count: int = 1,
        proto: str = "tcp",
        timeout: float = 1.0,
        source_port: int | None = None,
        interval: float = 0.0,
    ) -> ProbeResult:
        """*count* fresh connections from *client* (client/pod name or "node") to target.

        *target_ip* may be IPv6 in a dual-stack lab; the result's ``target`` is then ``[ip]:port``.
        """
        args = self._probe_args(target_ip, port, proto, timeout, source_port, interval)
        args += ["--count", str(count)]
        cmd = self._exec_argv(client, self._python("probe", args))
        budget = count * (timeout + interval + 0.5) + 10.0
        proc = subprocess.run(  # noqa: S603
            cmd, capture_output=True, text=True, timeout=budget, check=False
        )
        if proc.returncode != 0:
            raise LabCommandError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return ProbeResult.from_json(proc.stdout.strip().splitlines()[-1])

    def start_probe_loop(
        self,
        client: str,
        target_ip: str,
        port: int,
        proto: str = "tcp",
        timeout: float = 1.0,
        interval: float = 0.0,
    ) -> ProbeLoop:
        """Start back-to-back fresh connections; ``handle.stop()`` returns all attempts."""
        args = self._probe_args(target_ip, port, proto, timeout, None, interval) + ["--loop"]
        log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed by the lab)
        proc = subprocess.Popen(  # noqa: S603
            self._exec_argv(client, self._python("probe", args)),
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        loop = ProbeLoop(proc, log, timeout)
        self._loops.append(loop)
        try:
            _read_ready(proc, time.monotonic() + self.ready_timeout)
        except (TimeoutError, EOFError) as exc:
            raise NetlabError(f"probe loop not ready: {exc}: {_stderr_of(log)}") from None
        return loop
