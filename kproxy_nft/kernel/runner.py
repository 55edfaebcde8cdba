"""How the kernel backends run commands: an injectable runner, and network-namespace wrapping.

Every command the backends run goes through a `Runner` (`run(argv, input) -> Completed`), so
unit tests substitute a fake that records the exact argv and stdin and answers like the real
tools (the idea of knftables' exec.go); `SubprocessRunner` is the real one. Commands are
argument lists, never shell strings. `netns.exec_argv` wraps a command for a namespace.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol


class Completed(NamedTuple):
    """A finished command: exit status and captured output."""

    returncode: int
    stdout: str
    stderr: str


class Runner(Protocol):
    def run(self, argv: Sequence[str], input: str | None = None) -> Completed:
        """Run argv (a list, no shell) with `input` on stdin; never raises on a non-zero exit."""
        ...


@dataclass(frozen=True)
class SubprocessRunner:
    """Runs commands for real. A missing binary is reported as exit status 127, like a shell."""

    timeout: float | None = 600.0  # a full restore of 10,000 services takes tens of seconds

    def run(self, argv: Sequence[str], input: str | None = None) -> Completed:
        try:
            proc = subprocess.run(  # noqa: S603 (an argument list built by this package, no shell)
                list(argv), input=input, capture_output=True, text=True, check=False, timeout=self.timeout
            )
        except FileNotFoundError as e:
            return Completed(127, "", f"{argv[0]}: {e.strerror}")
        return Completed(proc.returncode, proc.stdout, proc.stderr)


def kernel_has_ipv6() -> bool:
    """The kernel was booted with IPv6 (no `ipv6.disable=1`): /proc/sys/net/ipv6 exists.

    kube-proxy's nftables mode assumes both families ("FIXME: figure out how to check for kernel
    IPv6 support using nft"); without IPv6 the ip6 table's nat chains cannot be created and every
    sync would fail, so we check. Kernel-wide, hence the same in every network namespace.
    """
    return Path("/proc/sys/net/ipv6").is_dir()
