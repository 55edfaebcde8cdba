"""Tiny echo-who-am-i server run inside a netlab pod namespace.

Run as ``python -m kproxy_nft.lab.server --name pod1 --tcp 80 --tcp 443 --udp 53``
(IPv4 only), with ``--bind 0.0.0.0 --bind ::`` to listen on both families (a dual-stack pod).
Every TCP connection gets a minimal HTTP/1.0 response and every UDP datagram a reply,
both with the body ``"<name> <peer_ip>:<peer_port>\\n"`` -- i.e. which pod answered and
which source address it saw (after any NAT).  After all sockets are bound and listening
it prints one ``READY ...`` line on stdout, which is what the lab waits for.

Deliberately stdlib-only and single-threaded (one ``select.poll`` loop, no reverse DNS)
so that it starts in a few milliseconds.  It never writes to stdout after READY.
"""

from __future__ import annotations

import argparse
import contextlib
import select
import socket
import sys
import time

#: Seconds a TCP connection may linger (waiting for the client's request/EOF) after the
#: response was sent and our side was shut down.
LINGER = 5.0


def body(name: str, peer: tuple[str, int]) -> bytes:
    """The response body: pod name and the peer address the server saw."""
    return f"{name} {peer[0]}:{peer[1]}\n".encode()


def http_response(payload: bytes) -> bytes:
    """A minimal valid HTTP/1.0 response carrying *payload* as text/plain."""
    head = f"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    return head.encode() + payload


def _listen(kind: int, port: int, bind: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        # IPv6 only, whatever net.ipv6.bindv6only says: IPv4 has its own socket, so that IPv4
        # peers are reported as "10.1.0.50", not as the mapped "::ffff:10.1.0.50".
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((bind, port))
    if kind == socket.SOCK_STREAM:
        sock.listen(1024)
    sock.setblocking(False)
    return sock


def serve(name: str, tcp_ports: list[int], udp_ports: list[int], binds: tuple[str, ...] = ("0.0.0.0",)) -> None:
    """Bind all ports on every bind address, print READY, then answer forever."""
    tcp = {s.fileno(): s for s in (_listen(socket.SOCK_STREAM, p, b) for p in tcp_ports for b in binds)}
    udp = {s.fileno(): s for s in (_listen(socket.SOCK_DGRAM, p, b) for p in udp_ports for b in binds)}
    conns: dict[int, tuple[socket.socket, float]] = {}
    poller = select.poll()
    for fd in (*tcp, *udp):
        poller.register(fd, select.POLLIN)
    sys.stdout.write(f"READY {name} tcp={tcp_ports} udp={udp_ports}\n")
    sys.stdout.flush()

    def drop(fd: int) -> None:
        sock, _ = conns.pop(fd)
        poller.unregister(fd)
        sock.close()

    while True:
        now = time.monotonic()
        timeout_ms = None
        if conns:
            first = min(deadline for _, deadline in conns.values())
            timeout_ms = max(0, int((first - now) * 1000) + 1)
        for fd, _event in poller.poll(timeout_ms):
            if fd in tcp:
                while True:
                    try:
                        conn, peer = tcp[fd].accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    conn.setblocking(False)
                    try:
                        # The response is tiny: it always fits into the socket send buffer.
                        conn.send(http_response(body(name, peer)))
                        conn.shutdown(socket.SHUT_WR)
                    except OSError:
                        conn.close()
                        continue
                    conns[conn.fileno()] = (conn, time.monotonic() + LINGER)
                    poller.register(conn.fileno(), select.POLLIN)
            elif fd in udp:
                while True:
                    try:
                        _data, peer = udp[fd].recvfrom(65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    with contextlib.suppress(OSError):
                        udp[fd].sendto(body(name, peer), peer)
            elif fd in conns:
                # Drain the request until the client closes, so we never close with unread
                # data (which would turn our FIN into a RST).
                try:
                    data = conns[fd][0].recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    drop(fd)
        now = time.monotonic()
        for fd in [fd for fd, (_, deadline) in conns.items() if deadline <= now]:
            drop(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--name", required=True, help="pod name to answer with")
    parser.add_argument("--tcp", type=int, action="append", default=[], help="TCP port (repeatable)")
    parser.add_argument("--udp", type=int, action="append", default=[], help="UDP port (repeatable)")
    parser.add_argument(
        "--bind", action="append", default=[], help="address to bind, repeatable (default: 0.0.0.0, all IPv4)"
    )
    args = parser.parse_args(argv)
    if not args.tcp and not args.udp:
        parser.error("need at least one --tcp or --udp port")
    try:
        serve(args.name, args.tcp, args.udp, tuple(args.bind) or ("0.0.0.0",))
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        sys.stderr.write(f"server {args.name}: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
