"""How the kernel backends run commands: an injectable runner, and network-namespace wrapping.

Every command the backends run goes through a `Runner` (`run(argv, input) -> Completed`), so
unit tests substitute a fake that records the exact argv and stdin and answers like the real
tools (the idea of knftables' exec.go); `SubprocessRunner` is the real one. Commands are
argument lists, never shell strings. `netns.exec_argv` wraps a command for a namespace.
"""

from __future__ import annotations

import collections
import os
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple, Protocol


class Completed(NamedTuple):
    """A finished command: exit status and captured output."""

    returncode: int
    stdout: str
    stderr: str


# What a command reads on stdin: text, or text in pieces (written one after the other), so that
# a large input need not be made whole first.
Input = str | Iterable[str] | None


class Runner(Protocol):
    def run(self, argv: Sequence[str], input: Input = None) -> Completed:
        """Run argv (a list, no shell) with `input` on stdin; never raises on a non-zero exit."""
        ...


def input_text(input: Input) -> str | None:
    """`input` made whole (for fakes, which parse it)."""
    return input if input is None or isinstance(input, str) else "".join(input)


# The pids of the commands started here, newest last: their nf_tables commits are ours
# (`nft_monitor` tells them from other processes' by the committing pid). Bounded: a pid is
# only looked up while its command runs, and the kernel reuses pids.
_started: collections.deque[int] = collections.deque(maxlen=256)


def own_pids() -> frozenset[int]:
    """This process's threads and the commands it started recently (see `_started`).

    Threads, because the kernel names a committer by its thread id (nf_tables'
    NFTA_GEN_PROC_PID is `task_pid_nr(current)`), and libnftables commits from the agent's loop.
    """
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [os.getpid()]
    return frozenset((*threads, *_started))


@dataclass(frozen=True)
class SubprocessRunner:
    """Runs commands for real. A missing binary is reported as exit status 127, like a shell.

    `input` is handed over as a file, not a pipe: once the command is started it has all of it,
    so an agent stopping meanwhile leaves a restore either not started or complete (never cut
    short after its first table's COMMIT).
    """

    timeout: float | None = 600.0  # a full restore of 10,000 services takes tens of seconds

    def run(self, argv: Sequence[str], input: Input = None) -> Completed:
        with tempfile.TemporaryFile() as stdin:
            if input is not None:
                _write_text(stdin, input)
                stdin.seek(0)
            try:
                proc = subprocess.Popen(  # noqa: S603 (an argument list built by this package, no shell)
                    list(argv), stdin=stdin if input is not None else subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                )
            except FileNotFoundError as e:
                return Completed(127, "", f"{argv[0]}: {e.strerror}")
            _started.append(proc.pid)
            try:
                stdout, stderr = proc.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
                raise
        return Completed(proc.returncode, stdout, stderr)


def _write_text(file: IO[bytes], text: str | Iterable[str], chunk: int = 1 << 20) -> None:
    """`text` (or its pieces) to `file` as UTF-8, a chunk at a time: a 10,000-Service restore is
    ~44 MB, and encoding it whole would hold a second copy of it at the sync's peak."""
    for piece in (text,) if isinstance(text, str) else text:
        for start in range(0, len(piece), chunk):
            file.write(piece[start:start + chunk].encode())


def kernel_has_ipv6() -> bool:
    """The kernel was booted with IPv6 (no `ipv6.disable=1`): /proc/sys/net/ipv6 exists.

    kube-proxy's nftables mode assumes both families ("FIXME: figure out how to check for kernel
    IPv6 support using nft"); without IPv6 the ip6 table's nat chains cannot be created and every
    sync would fail, so we check. Kernel-wide, hence the same in every network namespace.
    """
    return Path("/proc/sys/net/ipv6").is_dir()
