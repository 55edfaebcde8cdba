"""Drift noticed by the kernel: a thread reading nf_tables change notifications (like `nft monitor`).

`NftMonitor` opens a NETLINK_NETFILTER socket joined to the NFNLGRP_NFTABLES multicast group
(inside `netns`: a socket belongs to the namespace it was created in) and hands every commit
by *another* process that touched one of our tables (`nftables_events.Interest`) to a callback
with the tables it touched (and the chains and `@sets`, when only rules and elements changed). Our own commits are
recognised by the committing pid: this process (libnftables runs in it) or one of the commands
it started (`runner.own_pids`: iptables-restore, nft). Other programs' changes to other tables
cost one parse of their messages.

The callback runs on the monitor's thread and must only record and wake (the agent coalesces:
a flood of foreign commits gives one check per min-sync-period). When the socket overran
(ENOBUFS: messages were dropped while we were busy) the callback gets `LOST`: anything may have
changed. Opening fails with OSError without CAP_NET_ADMIN or on a kernel without nf_tables; the
agent then falls back to probing canaries.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import threading
from collections.abc import Callable

from kproxy_nft.kernel.netns import entered
from kproxy_nft.kernel.nftables_events import (
    NFNLGRP_NFTABLES,
    CommitReader,
    Interest,
    table_dump_request,
    tables_in_dump,
)
from kproxy_nft.kernel.runner import own_pids

log = logging.getLogger("kproxy_nft.kernel.nft_monitor")

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
# Room for bursts: our own big syncs announce thousands of objects at once, and an overrun
# costs a full check. SO_RCVBUFFORCE (root) may exceed rmem_max; SO_RCVBUF is the fallback.
RECEIVE_BUFFER = 64 << 20
SO_RCVBUFFORCE = 33
LOST = frozenset({"(notifications lost)"})


def open_socket(netns: str | None) -> socket.socket:
    """A netlink socket subscribed to nf_tables notifications, inside `netns`. Raises OSError."""
    with entered(netns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    except OSError:
        sock.close()
        raise
    return sock


def list_tables(netns: str | None, timeout: float = 5.0) -> set[str]:
    """Every nf_tables table in `netns` (`"ip kproxy-nft"`, …), from one netlink dump. Raises OSError.

    Not `nft list tables`: libnftables 1.0.6 answers it only after caching every table's
    chains, rules and elements, which took 250 MB and a second at 10,000 Services.
    """
    with entered(netns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    with sock:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        sock.send(table_dump_request(sequence=1))
        tables: set[str] = set()
        done = False
        while not done:
            names, done, error = tables_in_dump(sock.recv(1 << 16))
            if error:
                raise OSError(error, os.strerror(error))
            tables.update(names)
    return tables


# on_drift(tables, chains): the tables of ours a foreign commit touched, and the chains in them
# whose rules it changed and the `@sets` whose elements it changed (None: more than that, or
# unknown: compare everything).
DriftCallback = Callable[[frozenset[str], frozenset[str] | None], None]


# The inode of the host's (initial) pid namespace, fixed by the kernel (PROC_PID_INIT_INO).
_HOST_PID_NAMESPACE_INODE = 0xEFFFFFFC


def in_host_pid_namespace() -> bool:
    """This process sees the host's pids (no pid namespace of its own, or hostPID in a pod)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino == _HOST_PID_NAMESPACE_INODE
    except OSError:
        return True  # no /proc/self/ns: a kernel without namespaces has only the host's


class NftMonitor:
    """Calls `on_drift` for each foreign commit touching `interest`'s tables (see above)."""

    def __init__(self, netns: str | None, interest: Interest, on_drift: DriftCallback,
                 on_stopped: Callable[[str], None] | None = None) -> None:
        """`on_stopped(reason)`: called on the monitor's thread if notifications stop for good
        (the socket failed), so that the caller can watch some other way."""
        if not in_host_pid_namespace():
            # A commit names its thread by its pid in the host's pid namespace: inside another
            # (a container without hostPID) our own commits would look foreign, and every sync
            # would start a repair that starts another. The caller falls back to probing.
            raise OSError("not in the host's pid namespace (run with hostPID): our own commits cannot be told")
        self._interest = interest
        self._on_drift = on_drift
        self._on_stopped = on_stopped
        self._sock = open_socket(netns)
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="nft-monitor", daemon=True)
        self.commits_seen = 0

    def start(self) -> NftMonitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"x")
        self._thread.join(timeout=2)
        if not self._thread.is_alive():
            os.close(self._wake_write)  # here, not in _run: its number must not be reused before the write

    def _run(self) -> None:
        reader = CommitReader()
        try:
            while True:
                ready, _, _ = select.select([self._sock.fileno(), self._wake_read], [], [])
                if self._wake_read in ready:
                    return
                self._receive(reader)
        except OSError as e:  # not expected: say so, and let the caller watch otherwise
            log.error("nf_tables notifications stopped: %s", e)
            if self._on_stopped is not None:
                self._on_stopped(str(e))
        finally:
            self._sock.close()
            os.close(self._wake_read)

    def _receive(self, reader: CommitReader) -> None:
        try:
            datagram = self._sock.recv(1 << 20)
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                raise
            reader.lost()
            log.warning("nf_tables notifications were dropped (socket overrun); checking our tables")
            self._on_drift(LOST, None)
            return
        try:
            commits = reader.feed(datagram)
        except ValueError as e:  # a malformed message: say so, and check rather than guess
            log.warning("unreadable nf_tables notification: %s", e)
            self._on_drift(LOST, None)
            return
        ours = own_pids() if commits else frozenset()
        for commit in commits:
            self.commits_seen += 1
            if commit.pid is not None and commit.pid in ours:
                continue
            touched = self._interest.touched_by(commit)
            if touched:
                self._on_drift(touched, self._interest.chains_touched_by(commit))
