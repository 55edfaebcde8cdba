"""The node setup the agent does once at startup, before its first sync: kube-proxy's conntrack
sysctls (`kernel/sysctl.py` says what and why).

A setting that cannot be made (a read-only /proc/sys in a container, nf_conntrack_max in a
network namespace other than the host's) is a warning and a count in
`kproxy_nft_sysctl_failures_total{name}`, and the agent goes on: its rules work with the
kernel's own limits and timeouts. `run --init-only` (an init container with the privileges the
agent itself then does without) calls the same function and exits 1 on any failure.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kproxy_nft.agent.metrics import Metrics
from kproxy_nft.kernel.sysctl import Outcome, Status, apply_writes, conntrack_writes, cpu_count
from kproxy_nft.model import ConntrackSettings

log = logging.getLogger("kproxy_nft.agent")


def setup_node(conntrack: ConntrackSettings, metrics: Metrics | None = None, netns: str | None = None,
               root: Path = Path("/"), cpus: int | None = None) -> list[Outcome]:
    """Make the conntrack settings (in `netns`, under `root`); log each change and each failure,
    count the failures. Returns every outcome; none raises."""
    outcomes = apply_writes(conntrack_writes(conntrack, cpus or cpu_count()), root=root, netns=netns)
    for outcome in outcomes:
        if outcome.status is Status.FAILED:
            log.warning("node setup: %s", outcome.describe())
            if metrics is not None:
                metrics.sysctl_failures.labels(name=outcome.write.name).inc()
        elif outcome.status is Status.SKIPPED:
            log.warning("node setup: %s", outcome.describe())
        elif outcome.status is Status.SET:
            log.info("node setup: %s", outcome.describe())
    return outcomes


def failed(outcomes: list[Outcome]) -> list[Outcome]:
    """The settings that could not be made (a skipped one follows a failed one)."""
    return [o for o in outcomes if o.status is Status.FAILED]
