"""The authoritative cluster DNS server: UDP and TCP sockets around `protocol.respond`.

`DnsServer(provider, host, port)` answers from `provider()`, a `Callable[[], RecordSet]`
asked on every query, so whoever owns the records can replace them at any moment: the
`ManifestRecords` provider below re-reads manifest files when they change (`kproxy-nft dns
serve`), and the agent (`kproxy-nft run --dns-listen`) can pass `lambda: its_record_set`.

Design: one asyncio event loop in one thread, dnspython for the messages. A query is a
pure, sub-millisecond computation, so there is nothing to gain from threads; the loop gives
UDP and TCP (RFC 7766: pipelined queries on one connection, an idle timeout, a bound on
connections) side by side without a thread per request, and a bad packet can only ever
cost one `respond` call that drops it. Nothing a client sends can stop the loop: every
per-message failure is caught, counted and logged (rate-limited).

Run as `python -m kproxy_nft.discovery.server -f PATH... --listen ADDR:PORT` (the same
options as `kproxy-nft dns serve`): once both sockets listen it prints one line
`READY <addr>:<port>` on stdout (the actual port when 0 was asked), which is what
`discovery.launch.start_dns_server_in` waits for. SIGTERM/SIGINT stop it, SIGHUP re-reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import ipaddress
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, cast

from kproxy_nft.discovery.load import load_record_set
from kproxy_nft.discovery.protocol import Transport, respond
from kproxy_nft.discovery.records import RecordOptions, RecordSet
from kproxy_nft.sources.manifests import ManifestError, expand_paths

RecordProvider = Callable[[], RecordSet]

DEFAULT_LISTEN = "127.0.0.1:5353"
RELOAD_INTERVAL = 0.5  # seconds between checks of the manifest files
TCP_IDLE_TIMEOUT = 10.0  # RFC 7766 §6.2.3 suggests seconds, not minutes
MAX_TCP_CONNECTIONS = 256
UDP_RECEIVE_BUFFER = 4 << 20  # absorb bursts; the kernel caps it at net.core.rmem_max
MEMO_ENTRIES = 4096  # replies remembered per record set (then the memo starts over)
MEMO_MAX_QUERY = 512  # only remember replies to ordinary-sized queries


def parse_listen(text: str) -> tuple[str, int]:
    """`IP:PORT` or `[IPv6]:PORT` → (ip, port); raises ValueError with a readable message."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r}: expected IP:PORT or [IPv6]:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:5353")
    try:
        ip = ipaddress.ip_address(host)
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{text!r}: expected IP:PORT or [IPv6]:PORT") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{text!r}: port must be between 0 and 65535")
    return str(ip), port


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def nameserver_ips(host: str) -> tuple[str, ...]:
    """The address the NS glue names: the listen address, or loopback for a wildcard one."""
    ip = ipaddress.ip_address(host)
    if ip.is_unspecified:
        return ("::1",) if ip.version == 6 else ("127.0.0.1",)
    return (host,)


class _Log:
    """One-line messages on stderr, at most one per `interval` for repetitive ones."""

    def __init__(self, stream: IO[str], interval: float = 5.0) -> None:
        self.stream, self.interval, self._last = stream, interval, -interval
        self.suppressed = 0

    def __call__(self, message: str, *, repetitive: bool = False) -> None:
        now = time.monotonic()
        if repetitive and now - self._last < self.interval:
            self.suppressed += 1
            return
        if repetitive:
            self._last = now
        self.stream.write(f"kproxy-nft: dns: {message}\n")
        self.stream.flush()


@dataclass
class Stats:
    """Counters a test or the agent can read."""

    udp_queries: int = 0
    tcp_queries: int = 0
    dropped: int = 0
    errors: int = 0


class DnsServer:
    """UDP + TCP DNS server on one address and port, answering from `provider()`.

    To embed it (the agent's `--dns-listen`), in a running event loop:

        server = DnsServer(lambda: agent.record_set, "10.96.0.10", 53)
        await server.start()   # bound and answering; server.port is the actual port
        ...
        await server.close()
    """

    def __init__(self, provider: RecordProvider, host: str, port: int, log: IO[str] | None = None) -> None:
        self.provider = provider
        self.host, self.port = host, port
        self.stats = Stats()
        self._log = _Log(log or sys.stderr)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._memo: dict[tuple[bytes, Transport], bytes | None] = {}
        self._memo_for: RecordSet | None = None

    def handle(self, wire: bytes, transport: Transport) -> bytes | None:
        """The reply to one message; never raises (a failure is logged and the message dropped).

        Replies are memoized per record set: `respond` is a pure function of the message
        (all but its 2-byte ID, which the reply copies) and the records, and building a reply
        with dnspython costs far more than a dictionary lookup, so repeated questions (and
        floods of them) cost almost nothing. A new record set starts a new memo.
        """
        try:
            records = self.provider()
            if records is not self._memo_for:
                self._memo.clear()
                self._memo_for = records
            key = (wire[2:], transport)
            if key in self._memo:
                tail = self._memo[key]
                reply = None if tail is None else wire[:2] + tail
            else:
                reply = respond(wire, records, transport)
                if len(wire) <= MEMO_MAX_QUERY:
                    if len(self._memo) >= MEMO_ENTRIES:
                        self._memo.clear()
                    self._memo[key] = None if reply is None else reply[2:]
        except Exception as e:  # noqa: BLE001 - one bad message must not take the server down
            self.stats.errors += 1
            self._log(f"internal error answering a {transport} query: {type(e).__name__}: {e}", repetitive=True)
            return None
        if reply is None:
            self.stats.dropped += 1
        return reply

    # ---- sockets ---------------------------------------------------------------------------
    def _bind(self) -> tuple[socket.socket, socket.socket]:
        """UDP and TCP sockets on the same port (for port 0, a free port both can use)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for _ in range(20):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            tcp = socket.socket(family, socket.SOCK_STREAM)
            try:
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
                udp.bind((self.host, self.port))
                port = udp.getsockname()[1]
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((self.host, port))
                tcp.listen(128)
            except OSError as e:
                udp.close()
                tcp.close()
                if self.port == 0 and e.errno == errno.EADDRINUSE:
                    continue  # the UDP port's TCP twin is taken: try another port
                raise
            udp.setblocking(False)
            tcp.setblocking(False)
            self.port = port
            return udp, tcp
        raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP")

    async def start(self) -> None:
        """Bind and start answering (returns once both sockets listen)."""
        udp, tcp = self._bind()
        loop = asyncio.get_running_loop()
        self._udp, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), sock=udp)
        self._tcp = await asyncio.start_server(self._serve_tcp, sock=tcp)

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= MAX_TCP_CONNECTIONS:
            writer.close()
            return
        self._connections.add(task)
        try:
            while True:  # RFC 7766: several length-prefixed queries per connection
                prefix = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT)
                wire = await asyncio.wait_for(reader.readexactly(int.from_bytes(prefix, "big")), TCP_IDLE_TIMEOUT)
                self.stats.tcp_queries += 1
                reply = self.handle(wire, "tcp")
                if reply is not None:
                    writer.write(len(reply).to_bytes(2, "big") + reply)
                    await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass  # the client closed, stalled or reset: just end this connection
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not subclass DatagramTransport in 3.11.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.server.stats.udp_queries += 1
        reply = self.server.handle(data, "udp")
        if reply is None or self.transport is None:
            return
        if self.paused:
            self.server.stats.dropped += 1  # the socket cannot keep up: shed load, as UDP may
            return
        self.transport.sendto(reply, addr)

    # asyncio calls these when its buffer of unsent datagrams passes its high/low-water marks.
    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors from clients that went away: nothing to do


# ---------------------------------------------------------------------------------------------
# manifest files as a provider
# ---------------------------------------------------------------------------------------------

Fingerprint = tuple[tuple[str, int, int, int], ...]


def fingerprint(paths: Sequence[str]) -> Fingerprint:
    """What identifies the current content of the manifest files (names, inodes, sizes, mtimes)."""
    marks = []
    for path in expand_paths(paths):
        if path == "-":
            continue  # stdin is read once
        try:
            st = os.stat(path)
        except OSError:
            marks.append((path, -1, -1, -1))
            continue
        marks.append((path, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(marks)


class ManifestRecords:
    """A record provider over manifest paths that re-reads them when they change.

    A re-read that fails (a half-written or invalid file) keeps the previous records and
    says why; the next change is tried again.
    """

    def __init__(self, paths: Sequence[str], options: RecordOptions, stdin: IO[str] | None = None) -> None:
        self.paths, self.options = tuple(paths), options
        # Standard input can only be read once: keep its text for every re-read of the files.
        self._stdin_text = (stdin or sys.stdin).read() if "-" in self.paths else ""
        self._mark = fingerprint(self.paths)
        # Raises ManifestError: bad input at start is an error, later it only keeps the old records.
        self._records, self.notices = self._read()
        self.reloads = 0

    def _read(self) -> tuple[RecordSet, tuple[str, ...]]:
        return load_record_set(self.paths, self.options, io.StringIO(self._stdin_text))

    def __call__(self) -> RecordSet:
        return self._records

    def refresh(self, force: bool = False) -> str | None:
        """Re-read if the files changed; returns a message to log, or None if nothing changed."""
        mark = fingerprint(self.paths)
        if mark == self._mark and not force:
            return None
        self._mark = mark
        try:
            records, _ = self._read()
        except ManifestError as e:
            return f"reload failed, still serving the previous records: {e}"
        self._records = records
        self.reloads += 1
        return f"reloaded {len(records.services)} services (serial {records.serial})"


async def _watch(source: ManifestRecords, log: _Log, wake: asyncio.Event) -> None:
    """Poll the files (cheap `stat`s) and re-read them off the event loop when they change."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), RELOAD_INTERVAL)
        forced = wake.is_set()  # SIGHUP: re-read even if the files look unchanged
        wake.clear()
        message = await asyncio.to_thread(source.refresh, forced)
        if message:
            log(message)


async def serve_manifests(source: ManifestRecords, host: str, port: int, ready: IO[str]) -> None:
    """Serve `source` until SIGTERM/SIGINT, re-reading on change (the body of `kproxy-nft dns serve`).

    Raises OSError when the address cannot be bound.
    """
    log = _Log(sys.stderr)
    server = DnsServer(source, host, port)
    await server.start()
    stop, wake = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, wake.set)
    address = format_address(server.host, server.port)
    log(f"serving {source().zone.to_text()} ({len(source().services)} services) on {address} udp+tcp")
    ready.write(f"READY {address}\n")
    ready.flush()
    watcher = asyncio.create_task(_watch(source, log, wake))
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        await server.close()
