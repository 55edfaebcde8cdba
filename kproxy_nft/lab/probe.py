"""Client prober run inside a netlab client (or pod, or node) namespace.

``python -m kproxy_nft.lab.probe --target IP:PORT --count N [--udp] [--timeout S]``
(an IPv6 target is written ``[IP]:PORT``)
makes N independent attempts -- a fresh socket each time, so every attempt is a new
conntrack entry and a new load-balancing decision -- and prints a single JSON document::

    {"target": "10.96.0.10:80", "proto": "tcp", "attempts": [
        {"pod": "pod1", "seen_ip": "10.1.0.50", "seen_port": 40112, "error": null, ...}, ...]}

TCP attempts send ``GET / HTTP/1.0`` and read the netlab server's answer until EOF; UDP
attempts send one datagram on a connected socket (so an ICMP port unreachable is reported
as ``refused``).  Errors are classified as refused / timeout / unreachable / reset /
protocol / error.

With ``--loop`` it prints ``READY`` and keeps making attempts until it receives SIGTERM
or SIGINT, then prints the JSON of everything it did (used for atomicity tests).

Stdlib only, so it starts in milliseconds.
"""

from __future__ import annotations

import argparse
import errno
import json
import signal
import socket
import sys
import time
from types import FrameType
from typing import Any

_UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}


def _classify(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, ConnectionRefusedError):
        return "refused", str(exc)
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timeout", str(exc) or "timed out"
    if isinstance(exc, ConnectionResetError | ConnectionAbortedError | BrokenPipeError):
        return "reset", str(exc)
    if isinstance(exc, OSError) and exc.errno in _UNREACHABLE:
        return "unreachable", str(exc)
    return "error", f"{type(exc).__name__}: {exc}"


def _parse_body(text: str) -> tuple[str, str, int]:
    """``"pod1 10.1.0.50:40112\\n"`` -> ("pod1", "10.1.0.50", 40112); an IPv6 peer has no brackets."""
    name, addr = text.strip().split(" ", 1)
    ip, port = addr.rsplit(":", 1)
    return name, ip, int(port)


def _new_socket(kind: int, v6: bool, source: str | None, source_port: int | None) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, kind)
    if source or source_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((source or ("::" if v6 else "0.0.0.0"), source_port or 0))
    return sock


def split_target(target: str) -> tuple[str, int]:
    """``"10.96.0.10:80"`` or ``"[fd00::10]:80"`` -> (ip, port); ValueError when malformed."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected IP:PORT or [IPv6]:PORT, got {target!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def attempt(
    ip: str,
    port: int,
    proto: str = "tcp",
    timeout: float = 1.0,
    source: str | None = None,
    source_port: int | None = None,
) -> dict[str, Any]:
    """One attempt; returns the JSON-able attempt record."""
    start = time.monotonic()
    deadline = start + timeout
    rec: dict[str, Any] = {"pod": None, "seen_ip": None, "seen_port": None, "error": None, "detail": ""}
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    payload = b""
    sock: socket.socket | None = None
    try:
        sock = _new_socket(kind, ":" in ip, source, source_port)
        sock.settimeout(timeout)
        sock.connect((ip, port))
        rec["local_port"] = sock.getsockname()[1]
        if proto == "udp":
            sock.send(b"netlab-probe\n")
            payload = sock.recv(65535)
        else:
            host = f"[{ip}]" if ":" in ip else ip
            sock.sendall(f"GET / HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n".encode())
            chunks = []
            while True:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
            raw = b"".join(chunks)
            head, sep, payload = raw.partition(b"\r\n\r\n")
            if not sep or not head.startswith(b"HTTP/"):
                raise ValueError(f"not an HTTP response: {raw[:80]!r}")
        rec["pod"], rec["seen_ip"], rec["seen_port"] = _parse_body(payload.decode())
    except (OSError, ValueError) as exc:
        if isinstance(exc, ValueError):
            rec["error"], rec["detail"] = "protocol", str(exc)
        else:
            rec["error"], rec["detail"] = _classify(exc)
    finally:
        if sock is not None:
            sock.close()
    rec["elapsed"] = round(time.monotonic() - start, 6)
    return rec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="netlab prober (prints one JSON document)")
    parser.add_argument("--target", required=True, help="IP:PORT or [IPv6]:PORT")
    parser.add_argument("--count", type=int, default=1, help="number of attempts (ignored with --loop)")
    parser.add_argument("--udp", action="store_true", help="probe UDP instead of TCP")
    parser.add_argument("--timeout", type=float, default=1.0, help="per-attempt timeout in seconds")
    parser.add_argument("--interval", type=float, default=0.0, help="pause between attempts (s)")
    parser.add_argument("--source", default=None, help="bind to this source address")
    parser.add_argument("--source-port", type=int, default=None, help="bind to this source port")
    parser.add_argument("--loop", action="store_true", help="print READY, run until SIGTERM/SIGINT")
    args = parser.parse_args(argv)
    try:
        ip, port = split_target(args.target)
    except ValueError as exc:
        parser.error(str(exc))
    proto = "udp" if args.udp else "tcp"

    stop = False

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    attempts: list[dict[str, Any]] = []
    if args.loop:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        sys.stdout.write("READY\n")
        sys.stdout.flush()
    while not stop and (args.loop or len(attempts) < args.count):
        attempts.append(attempt(ip, port, proto, args.timeout, args.source, args.source_port))
        if args.interval > 0 and not stop:
            time.sleep(args.interval)
    json.dump({"target": args.target, "proto": proto, "attempts": attempts}, sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
