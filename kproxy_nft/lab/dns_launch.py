"""Start the DNS server inside a network namespace and stop it again (the demo's hook).

    handle = start_dns_server_in("kpn-1234-node", ["examples/"], "10.96.0.10:53")
    ...  # pods in the lab resolve names against 10.96.0.10
    handle.stop()

It runs `ip netns exec NS python -m kproxy_nft.cli dns serve -f PATH... --listen ADDR`
(an argument list, never a shell string) and waits, with a deadline and no fixed sleeps,
for the server's `READY <addr>:<port>` line. `ip netns exec` execs the server, so the child
PID is the server's and `stop()` signals it directly. Needs root (network namespaces).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from types import TracebackType
from typing import IO

from kproxy_nft.discovery.records import DEFAULT_TTL, DEFAULT_ZONE
from kproxy_nft.discovery.server import parse_listen


class DnsServerError(RuntimeError):
    """The server did not come up (the message includes what it printed on stderr)."""


class DnsServerProcess:
    """A running DNS server in a namespace: `.address` (host, port), `.stop()`, a context manager."""

    def __init__(self, proc: subprocess.Popen[bytes], log: IO[bytes], address: tuple[str, int], netns: str) -> None:
        self._proc, self._log = proc, log
        self.address, self.netns = address, netns

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    def stderr(self) -> str:
        """What the server printed on stderr so far (reloads, notices, errors)."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def reload(self) -> None:
        """Ask the server to re-read its manifests now (SIGHUP) instead of at its next poll."""
        if self.running:
            self._proc.send_signal(signal.SIGHUP)

    def stop(self, timeout: float = 5.0) -> int:
        """Stop the server (SIGTERM, then SIGKILL after `timeout`); returns its exit status."""
        if self.running:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        status = self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._log.close()
        return status

    def __enter__(self) -> DnsServerProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def server_argv(paths: Sequence[str], listen: str, zone: str = DEFAULT_ZONE, ttl: int = DEFAULT_TTL) -> list[str]:
    """The command line that runs the server with this interpreter."""
    files = [arg for path in paths for arg in ("-f", os.path.abspath(path) if path != "-" else path)]
    return [sys.executable, "-m", "kproxy_nft.cli", "dns", "serve", *files,
            "--listen", listen, "--zone", zone, "--ttl", str(ttl)]  # fmt: skip


def _ready_line(proc: subprocess.Popen[bytes], deadline: float) -> str:
    """The READY line, read without blocking past `deadline` (raises TimeoutError/EOFError)."""
    assert proc.stdout is not None
    fd, buffer = proc.stdout.fileno(), b""
    while b"\n" not in buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no READY line in time")
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise EOFError(f"exited with status {proc.wait()}")
            buffer += chunk
    return buffer.split(b"\n", 1)[0].decode()


def start_dns_server_in(
    netns: str,
    paths: Sequence[str],
    listen: str = "127.0.0.1:53",
    zone: str = DEFAULT_ZONE,
    ttl: int = DEFAULT_TTL,
    timeout: float = 15.0,
) -> DnsServerProcess:
    """Start the DNS server for `paths` inside `netns` on `listen`; returns once it answers.

    The address must exist in the namespace (e.g. 127.0.0.1 after `ip link set lo up`, or an
    address the lab put on an interface there). Raises DnsServerError if it does not start.
    """
    parse_listen(listen)  # fail early, here, on a malformed address
    log = tempfile.TemporaryFile()  # noqa: SIM115 - owned by the handle, closed in stop()
    proc = subprocess.Popen(  # noqa: S603 - fixed argument list
        ["ip", "netns", "exec", netns, *server_argv(paths, listen, zone, ttl)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log,
    )
    try:
        line = _ready_line(proc, time.monotonic() + timeout)
        if not line.startswith("READY "):
            raise EOFError(f"unexpected output {line!r}")
        address = parse_listen(line.removeprefix("READY "))
    except (TimeoutError, EOFError, ValueError) as e:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        log.seek(0)
        detail = log.read().decode(errors="replace").strip().splitlines()
        log.close()
        raise DnsServerError(f"DNS server in {netns} did not start: {e}: {' | '.join(detail[-3:])}") from None
    return DnsServerProcess(proc, log, address, netns)
