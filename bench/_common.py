"""What the kernel benches share: timing, percentiles, tables, a proxier in a namespace, a bare restore.

The benches run as `python bench/<name>.py`, so this folder is on `sys.path` and they import
this module as `_common`. Not a bench itself.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

from kproxy_nft.config import ProxySettings
from kproxy_nft.model import ClusterState, Endpoint, IPFamily, NodeContext, ServicePortName
from kproxy_nft.proxier import Proxier, make_proxier

T = TypeVar("T")


def exit_on_sigterm() -> None:
    """Make SIGTERM (`kill`, `timeout`) exit through `finally` blocks like Ctrl-C does, so that
    the benches' throwaway namespaces are deleted then too (Python's default just dies).

    Only in this process: pyroute2 forks children (`netns.create`) and stops them with SIGTERM;
    a child that unwound its copy of our stack would delete the namespaces we are building.
    """
    owner = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            os._exit(128 + signum)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """`fn()`'s result and the seconds it took."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def percentile(samples: Sequence[float], q: float) -> float:
    """The sample at quantile `q` (0..1), nearest rank: no interpolation between samples."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def print_grid(rows: Sequence[Sequence[str]]) -> None:
    """Print `rows` (the first is the header) as columns separated by ` | `, left-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print(" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        if n == 0:
            print("-+-".join("-" * w for w in widths))


def with_endpoints(state: ClusterState, name: ServicePortName, endpoints: tuple[Endpoint, ...]) -> ClusterState:
    """`state` with service port `name`'s endpoints replaced."""
    return ClusterState(state.services, {**state.endpoints, name: endpoints})


@contextmanager
def open_proxier(mode: str, node: NodeContext, netns: str, *, iptables_backend: str | None = None,
                 families: tuple[IPFamily, ...] = (IPFamily.V4,)) -> Iterator[Proxier]:
    """The proxier of `mode` programming `netns` (a throwaway one), closed on exit.

    `families` defaults to IPv4 alone, as the benches' synthetic clusters are: without it the
    proxier would ask the kernel whether IPv6 is there and program an empty ip6 side too.
    """
    proxier = make_proxier(ProxySettings(mode=mode, node=node), mode=mode, netns=netns,
                           iptables_backend=iptables_backend, families=families)
    try:
        yield proxier
    finally:
        proxier.close()


def changed(name: ServicePortName) -> frozenset[ServicePortName]:
    """The `changed` argument of `Proxier.sync` for a change to one service port."""
    return frozenset((name,))


def restore_command(backend: str, family: IPFamily, *flags: str) -> list[str]:
    """A bare `iptables-<backend>-restore -w FLAGS`: the baseline some benches compare the
    proxier with, on purpose (it is not how anything is programmed)."""
    return [f"{'iptables' if family is IPFamily.V4 else 'ip6tables'}-{backend}-restore", "-w", *flags]


def restore_argv(netns: str, backend: str, family: IPFamily, *flags: str) -> list[str]:
    """`restore_command` run in `netns`."""
    return ["ip", "netns", "exec", netns, *restore_command(backend, family, *flags)]
