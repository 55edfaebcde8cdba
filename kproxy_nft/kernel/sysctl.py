"""The node setup kube-proxy does at startup: the conntrack table's size and timeouts.

Two parts. `conntrack_writes` is pure: from the settings and the CPU count, the values to
write, in kube-proxy's order and with its rules (`setupConntrack` / `getConntrackMax` in
cmd/kube-proxy/app/server_linux.go, `realConntracker` in conntrack.go, kubernetes/kubernetes
commit 9c98d29795356a16e4ecda2af38ec4f1cfa4f3f2): nf_conntrack_max = max(max_per_core × CPUs,
min), then the hash table's size = max / 4, but only ever raised and only once the maximum
is set; each timeout only when above 0, tcp_be_liberal only when true. `apply_writes` is the
thin writer: under a root directory ("/" on a node; a fake tree in tests), optionally with the
calling thread inside a network namespace, it reads each value and writes those that differ
(as kube-proxy does), reporting every failure instead of raising: what the caller does with
one (a warning and a metric for the agent, exit 1 for `--init-only`) is its business.

nf_conntrack_max and the hash size are global to the kernel: a network namespace other than
the initial one sees nf_conntrack_max read-only (mode 0444: EACCES, even for root) and may not
write the hash size (EOPNOTSUPP). The timeouts and tcp_be_liberal are per network namespace.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from kproxy_nft.kernel.netns import entered
from kproxy_nft.model import ConntrackSettings

NETFILTER = "proc/sys/net/netfilter"
CONNTRACK_MAX = "net.netfilter.nf_conntrack_max"
HASHSIZE = "sys/module/nf_conntrack/parameters/hashsize"  # a module parameter, not a sysctl


@dataclass(frozen=True)
class Write:
    """One value to set: `name` as `sysctl` spells it (or the module parameter's path),
    `path` relative to the root. `raise_only`: written only when the current value is lower.
    `after`: skipped unless the write named there succeeded (or needed nothing)."""

    name: str
    path: str
    value: int
    raise_only: bool = False
    after: str | None = None


def _netfilter(name: str, value: int) -> Write:
    return Write(f"net.netfilter.{name}", f"{NETFILTER}/{name}", value)


def conntrack_max(settings: ConntrackSettings, cpus: int) -> int:
    """kube-proxy's `getConntrackMax`: max_per_core × CPUs, at least `min`; 0 (leave the
    kernel's limit) when max_per_core is 0."""
    if settings.max_per_core <= 0:
        return 0
    return max(settings.max_per_core * cpus, settings.min)


def conntrack_writes(settings: ConntrackSettings, cpus: int) -> tuple[Write, ...]:
    """What to set, in kube-proxy's order; a value of 0 leaves that setting out."""
    writes: list[Write] = []
    maximum = conntrack_max(settings, cpus)
    if maximum > 0:
        writes.append(_netfilter("nf_conntrack_max", maximum))
        # kube-proxy writes the hash size only when it is below max/4, so a larger table set
        # by the administrator (or a kernel that cannot be written from a namespace) is kept.
        writes.append(Write("nf_conntrack hashsize", HASHSIZE, maximum // 4, raise_only=True, after=CONNTRACK_MAX))
    for name, seconds in (("nf_conntrack_tcp_timeout_established", settings.tcp_established_timeout),
                          ("nf_conntrack_tcp_timeout_close_wait", settings.tcp_close_wait_timeout)):
        if seconds > 0:
            writes.append(_netfilter(name, int(seconds)))
    if settings.tcp_be_liberal:
        writes.append(_netfilter("nf_conntrack_tcp_be_liberal", 1))
    for name, seconds in (("nf_conntrack_udp_timeout", settings.udp_timeout),
                          ("nf_conntrack_udp_timeout_stream", settings.udp_stream_timeout)):
        if seconds > 0:
            writes.append(_netfilter(name, int(seconds)))
    return tuple(writes)


class Status(Enum):
    SET = "set"
    UNCHANGED = "unchanged"  # already the wanted value (or, raise-only, above it)
    SKIPPED = "skipped"  # what it depends on failed
    FAILED = "failed"


@dataclass(frozen=True)
class Outcome:
    write: Write
    status: Status
    before: int | None = None
    error: str = ""

    def describe(self) -> str:
        if self.status is Status.FAILED:
            return f"cannot set {self.write.name} to {self.write.value}: {self.error}"
        if self.status is Status.SKIPPED:
            return f"{self.write.name} not set: {self.write.after} could not be set"
        if self.status is Status.UNCHANGED:
            return f"{self.write.name} is {self.before}, left as is"
        return f"{self.write.name} set to {self.write.value} (was {self.before})"


def cpu_count() -> int:
    """The node's CPUs, as kube-proxy counts them (the machine's, not this process's affinity)."""
    return os.cpu_count() or 1


def _apply_one(target: Path, write: Write) -> Outcome:
    try:
        before = int(target.read_text(encoding="ascii").split()[0])
    except (OSError, ValueError, IndexError) as e:
        return Outcome(write, Status.FAILED, error=f"cannot read {target}: {getattr(e, 'strerror', None) or e}")
    if before == write.value or (write.raise_only and before >= write.value):
        return Outcome(write, Status.UNCHANGED, before)
    try:
        target.write_text(str(write.value), encoding="ascii")
    except OSError as e:
        return Outcome(write, Status.FAILED, before, f"{e.strerror or e} ({target})")
    return Outcome(write, Status.SET, before)


def apply_writes(writes: tuple[Write, ...], root: Path = Path("/"), netns: str | None = None) -> list[Outcome]:
    """Set each value under `root`, with this thread inside `netns` (None: where it is).
    Never raises for a value that cannot be read or written: its outcome says why."""
    outcomes: list[Outcome] = []
    done: set[str] = set()
    with entered(netns):  # /proc/sys/net is the namespace of the thread that opens it
        for item in writes:
            if item.after is not None and item.after not in done:
                outcomes.append(Outcome(item, Status.SKIPPED))
                continue
            outcome = _apply_one(root / item.path, item)
            if outcome.status is not Status.FAILED:
                done.add(item.name)
            outcomes.append(outcome)
    return outcomes
