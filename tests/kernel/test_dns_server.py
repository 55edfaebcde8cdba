"""The DNS server for real: started in a throwaway network namespace, queried by real resolvers.

Everything runs inside the test's own `kpn-<hex>` namespace on 127.0.0.1: the server via
`discovery.launch.start_dns_server_in` (`ip netns exec`), `dig` via `run_in`, and the Python
clients (dnspython's Resolver and raw sockets) in a helper thread that enters the namespace
with setns(2), so the test process itself never leaves the root namespace and no socket of
these tests exists there. The conftest fixture deletes the namespace even on failure.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.resolver
import pytest

from kproxy_nft.lab.dns_launch import DnsServerError, DnsServerProcess, start_dns_server_in
from tests.helpers import EXAMPLES
from tests.kernel.conftest import run_in

pytestmark = pytest.mark.kernel

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

# The seed pod's /etc/resolv.conf (notes 6.2.2).
SEARCH = ("default.svc.cluster.local", "svc.cluster.local", "cluster.local")
NDOTS = 5
BIG_ENDPOINTS = 120  # ~2 KB of A records: over 512 bytes (no EDNS) and over dig's 1232


def big_headless_service() -> str:
    """A headless Service whose A answer cannot fit a classic 512-byte UDP reply."""
    endpoints = [{"addresses": [f"10.2.0.{i + 1}"]} for i in range(BIG_ENDPOINTS)]
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "big", "namespace": "default"},
               "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}}  # fmt: skip
    eps = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "big-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "big"}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
           "endpoints": endpoints}  # fmt: skip
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": [service, eps]})


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def call_in(ns: str, func: Callable[[], T], timeout: float = 60.0) -> T:
    """Run `func` in a thread that first enters `ns` (setns affects only the calling thread)."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            with open(f"/run/netns/{ns}", "rb") as handle:
                if _libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                    error = ctypes.get_errno()
                    raise OSError(error, os.strerror(error))
            outcome["value"] = func()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = e

    thread = threading.Thread(target=target, name=f"in-{ns}")
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"client in {ns} did not finish in {timeout}s"
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def resolver(port: int) -> dns.resolver.Resolver:
    """dnspython's stub resolver configured like the seed's pod."""
    res = dns.resolver.Resolver(configure=False)
    res.nameservers = ["127.0.0.1"]
    res.port = port
    res.search = [dns.name.from_text(s) for s in SEARCH]
    res.ndots = NDOTS
    res.use_search_by_default = True
    res.timeout, res.lifetime = 2.0, 5.0
    return res


def dig(server: DnsServerProcess, *args: str) -> str:
    host, port = server.address
    result = run_in(server.netns, ["dig", f"@{host}", "-p", str(port), "+time=2", "+tries=1", *args])
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def records(output: str) -> list[str]:
    """Non-comment lines of dig output, whitespace normalised."""
    return [" ".join(line.split()) for line in output.splitlines() if line.strip() and not line.startswith(";")]


@pytest.fixture
def manifests(tmp_path: Path) -> Path:
    folder = tmp_path / "manifests"
    shutil.copytree(EXAMPLES, folder)
    (folder / "big.json").write_text(big_headless_service())
    return folder


@pytest.fixture
def server(netns: str, manifests: Path) -> Iterator[DnsServerProcess]:
    assert run_in(netns, ["ip", "link", "set", "lo", "up"]).returncode == 0
    handle = start_dns_server_in(netns, [str(manifests)], "127.0.0.1:0")
    try:
        yield handle
    finally:
        log = handle.stderr() if handle.running else ""
        handle.stop()
    assert "Traceback" not in log, log


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


def test_dig_over_udp_and_tcp(server: DnsServerProcess, netns: str) -> None:
    """The seed's SRV lookup (notes 6.2.2), answered exactly as the notes show, on both transports."""
    own = os.stat(f"/proc/{server.pid}/ns/net").st_ino
    assert own == os.stat(f"/run/netns/{netns}").st_ino != os.stat("/proc/self/ns/net").st_ino
    srv = "_https-port._tcp.sample-clusterip-multi.default.svc.cluster.local"
    for transport in ("+notcp", "+tcp"):
        out = dig(server, srv, "SRV", transport)
        assert "status: NOERROR" in out and re.search(r"flags: qr aa rd;", out), out
        assert records(out) == [
            f"{srv}. 5 IN SRV 0 100 8443 sample-clusterip-multi.default.svc.cluster.local.",
            "sample-clusterip-multi.default.svc.cluster.local. 5 IN A 10.102.199.133",
        ]
        assert ("(TCP)" in out) == (transport == "+tcp")
    nx = dig(server, "nope.default.svc.cluster.local", "A")
    assert "status: NXDOMAIN" in nx and "AUTHORITY: 1" in nx
    assert re.search(r"^cluster\.local\.\s+5\s+IN\s+SOA\s+ns\.dns\.cluster\.local\. hostmaster", nx, re.M)
    nodata = dig(server, "default.svc.cluster.local", "A")
    assert "status: NOERROR" in nodata and "ANSWER: 0, AUTHORITY: 1" in nodata
    assert records(dig(server, "-x", "10.102.199.133", "+noall", "+answer")) == [
        "133.199.102.10.in-addr.arpa. 5 IN PTR sample-clusterip-multi.default.svc.cluster.local."
    ]
    edns = dig(server, "sample-clusterip.default.svc.cluster.local", "+bufsize=1400", "+dnssec")
    assert "EDNS: version: 0, flags: do; udp: 1400" in edns
    assert "OPT PSEUDOSECTION" not in dig(server, "sample-clusterip.default.svc.cluster.local", "+noedns")


def test_dnspython_resolver_with_the_pods_search_list(server: DnsServerProcess) -> None:
    """Short names resolve through `search` with `ndots:5`, as curl in the seed's testpod did."""
    port = server.address[1]

    def lookups() -> dict[str, object]:
        res = resolver(port)
        multi = res.resolve("sample-clusterip-multi", "A")
        across = res.resolve("sample-clusterip.default", "A", tcp=True)
        full = res.resolve("sample-clusterip-multi.default.svc.cluster.local", "A")  # 4 dots < ndots: search first
        srv = res.resolve("_https-port._tcp.sample-clusterip-multi", "SRV", tcp=True)
        try:
            res.resolve("nope.default.svc.cluster.local.", "A")
            missing = "answered"
        except dns.resolver.NXDOMAIN:
            missing = "NXDOMAIN"
        return {
            "multi": (multi.qname.to_text(), [r.to_text() for r in multi]),
            "across": (across.qname.to_text(), [r.to_text() for r in across]),
            "full": full.qname.to_text(),
            "srv": [(r.priority, r.weight, r.port, r.target.to_text()) for r in srv],
            "missing": missing,
        }

    got = call_in(server.netns, lookups)
    assert got["multi"] == ("sample-clusterip-multi.default.svc.cluster.local.", ["10.102.199.133"])
    assert got["across"] == ("sample-clusterip.default.svc.cluster.local.", ["10.101.181.214"])
    assert got["full"] == "sample-clusterip-multi.default.svc.cluster.local."
    assert got["srv"] == [(0, 100, 8443, "sample-clusterip-multi.default.svc.cluster.local.")]
    assert got["missing"] == "NXDOMAIN"


def test_large_answers_set_tc_and_clients_retry_over_tcp(server: DnsServerProcess) -> None:
    name = "big.default.svc.cluster.local"
    truncated = dig(server, name, "+noedns", "+ignore")
    assert re.search(r"flags: qr aa tc rd;", truncated), truncated
    retried = dig(server, name, "+noedns")
    assert "Truncated, retrying in TCP mode" in retried and f"ANSWER: {BIG_ENDPOINTS}," in retried
    port = server.address[1]

    def python_clients() -> tuple[bool, int]:
        raw = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=2)
        return bool(raw.flags & dns.flags.TC), len(resolver(port).resolve(name, "A"))

    assert call_in(server.netns, python_clients) == (True, BIG_ENDPOINTS)


def test_survives_malformed_packets_and_a_flood(server: DnsServerProcess) -> None:
    """Junk is dropped without an answer; 10,000 queries later the server still answers them all."""
    port = server.address[1]
    query = dns.message.make_query("sample-clusterip.default.svc.cluster.local", "A").to_wire()
    junk = [b"", b"\x00", b"\xff" * 11, query[:20], query + b"\x01", os.urandom(64), b"\x00" * 512, bytes(range(256))]

    def attack() -> dict[str, int]:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.connect(("127.0.0.1", port))
        udp.settimeout(2.0)
        for packet in junk:
            udp.send(packet)
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as tcp:
            for packet in junk:
                tcp.sendall(struct.pack("!H", len(packet)) + packet)
            tcp.sendall(struct.pack("!H", len(query)) + query)  # the connection still answers after junk
            size = struct.unpack("!H", tcp.recv(2))[0]
            tcp_ok = dns.message.from_wire(tcp.recv(size)).rcode() == dns.rcode.NOERROR
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as half:
            half.sendall(b"\x00\x40\x12")  # a length prefix and then silence: must not block others
            sent = answered = 0
            window, total = 64, 10_000
            started = time.monotonic()
            try:
                while answered < total:
                    while sent < total and sent - answered < window:
                        udp.send(struct.pack("!H", sent & 0xFFFF) + query[2:])
                        sent += 1
                        if sent % 1000 == 0:
                            udp.send(os.urandom(40))  # junk in the stream of queries
                    reply = udp.recv(4096)  # header only: flags (QR, RCODE 0) and one answer record
                    flags, answers = struct.unpack("!2xH2xH", reply[:8])
                    answered += flags & 0x800F == 0x8000 and answers == 1
            except TimeoutError:
                pass
        elapsed = time.monotonic() - started
        final = dns.query.udp(dns.message.make_query("sample-clusterip-multi.default.svc.cluster.local", "A"),
                              "127.0.0.1", port=port, timeout=2)  # fmt: skip
        return {"tcp_ok": tcp_ok, "sent": sent, "answered": answered, "final": len(final.answer),
                "ms": int(elapsed * 1000)}  # fmt: skip

    got = call_in(server.netns, attack)
    assert got["tcp_ok"] and got["final"] == 1, got
    assert got["sent"] == 10_000 and got["answered"] == 10_000, got
    assert server.running
    assert "Traceback" not in server.stderr() and "internal error" not in server.stderr()


def test_reloads_when_the_manifests_change(server: DnsServerProcess, manifests: Path) -> None:
    port = server.address[1]
    late = (EXAMPLES / "sample-clusterip.yaml").read_text().replace("sample-clusterip", "late-service")
    late = late.replace("10.101.181.214", "10.101.0.99")
    (manifests / "late.yaml").write_text(late)

    def wait_for(name: str, deadline: float = 10.0) -> list[str]:
        res, until = resolver(port), time.monotonic() + deadline
        while True:
            try:
                return [r.to_text() for r in res.resolve(name, "A")]
            except (dns.resolver.NXDOMAIN, dns.resolver.NoNameservers):
                if time.monotonic() > until:
                    raise
                time.sleep(0.05)

    assert call_in(server.netns, lambda: wait_for("late-service")) == ["10.101.0.99"]
    (manifests / "late.yaml").write_text("kind: [broken")  # a bad edit keeps the last good records
    server.reload()
    until = time.monotonic() + 10
    while "reload failed" not in server.stderr() and time.monotonic() < until:
        time.sleep(0.05)
    assert "reload failed, still serving the previous records" in server.stderr()
    assert "late.yaml" in server.stderr()
    assert call_in(server.netns, lambda: wait_for("late-service")) == ["10.101.0.99"]
    pid = server.pid
    assert server.stop() == 0 and not server.running and not Path(f"/proc/{pid}").exists()


def test_start_failures_are_reported_and_leave_nothing_running(netns: str, tmp_path: Path) -> None:
    assert run_in(netns, ["ip", "link", "set", "lo", "up"]).returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text((EXAMPLES / "sample-clusterip.yaml").read_text().replace("port: 8080", "port: 0"))
    with pytest.raises(DnsServerError, match=r"bad\.yaml: document 1 \(Service default/sample-clusterip\)"):
        start_dns_server_in(netns, [str(bad)], "127.0.0.1:0")
    with pytest.raises(DnsServerError, match="cannot listen on 10.255.0.1:53"):
        start_dns_server_in(netns, [str(EXAMPLES)], "10.255.0.1:53")  # no such address in the namespace
    inode = os.stat(f"/run/netns/{netns}").st_ino
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _net_inode(p) == inode]
    assert left == []


def _net_inode(proc: Path) -> int | None:
    try:
        return os.stat(proc / "ns" / "net").st_ino
    except OSError:
        return None
