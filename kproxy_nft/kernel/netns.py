"""Network namespaces by name: the one place that knows how to act inside one.

Tests, the demo and `run --netns` point the agent at a throwaway namespace made with
`ip netns add NAME`, which bind-mounts it at `/run/netns/NAME`. Two ways in, both from here:

* `exec_argv(netns, argv)`: a command run as `ip netns exec NAME argv…` (iptables-restore,
  nft, sysctl);
* `entered(netns)`: this thread itself moves in with `setns(2)` for the body, then back
  (libnftables contexts, netlink sockets, listening sockets, which belong to the namespace
  they are created in). Only the calling thread moves, never other threads.

A name is checked before use: `ip netns exec` and the bind mount resolve it under
`/run/netns`, so anything path-like is refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

NETNS_DIR = Path("/run/netns")  # where `ip netns add` mounts them (/var/run is a link to /run)
CLONE_NEWNET = 0x40000000

_NAME = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*")
_libc = ctypes.CDLL(None, use_errno=True)  # setns(2): os.setns only exists from Python 3.12


def checked_name(netns: str) -> str:
    """`netns` if it is a plain namespace name, else ValueError."""
    if not _NAME.fullmatch(netns) or netns in (".", ".."):
        raise ValueError(f"not a network namespace name: {netns!r}")
    return netns


def exec_argv(netns: str | None, argv: Sequence[str]) -> tuple[str, ...]:
    """argv to run inside network namespace `netns` (as is when None)."""
    if netns is None:
        return tuple(argv)
    return ("ip", "netns", "exec", checked_name(netns), *argv)


def existing() -> set[str]:
    """The names of the namespaces `ip netns` knows."""
    try:
        return set(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return set()


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(netns: str | None) -> Iterator[None]:
    """Run the body with this thread inside network namespace `netns` (no-op for None)."""
    if netns is None:
        yield
        return
    # thread-self: setns moves only this thread, so that is the namespace to come back to.
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(NETNS_DIR / checked_name(netns), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)
