"""`kproxy-nft top`: new connections per service port and per endpoint, live, from the kernel's counters.

The shell around `kproxy_nft.top` (pure): `kernel/counters.py` reads the listings every
`--interval` seconds, `top.with_rates` turns two samples into rates, `top.view` draws them.
Only reads. Built here and registered by `cli` (`top_command()`), so this module needs nothing
from `cli`. The JSON of `--once -o json` is documented in docs/TOP.md.
"""

from __future__ import annotations

import json
import os
import time

import click

from kproxy_nft.config import DEFAULT_MODE, PROXY_MODES, ProxySettings
from kproxy_nft.kernel.counters import CounterReadError
from kproxy_nft.model import NodeContext
from kproxy_nft.proxier import make_proxier
from kproxy_nft.report import fail
from kproxy_nft.top import Sample, with_rates

EPILOG = """\b
Examples:
  sudo kproxy-nft top                                   # the mode whose rules the node holds
  sudo kproxy-nft top --proxy-mode iptables --interval 2
  sudo kproxy-nft top --once -o json"""


def read_sample(mode: str | None, netns: str | None) -> Sample:
    """One sample, by the proxier of `mode` (exit 2 with one line when the counters cannot be read).

    Without a mode: the first other mode whose counters are on the node (`Proxier.connection_counts`),
    else the default mode's.
    """
    modes = (mode,) if mode else (*(m for m in PROXY_MODES if m != DEFAULT_MODE), DEFAULT_MODE)
    node = NodeContext(hostname=os.uname().nodename)  # the counters do not depend on it
    try:
        for candidate in modes:
            proxier = make_proxier(ProxySettings(candidate, node), netns=netns)
            try:
                sample = proxier.connection_counts()
            finally:
                proxier.close()
            if sample is not None:
                return sample
    except CounterReadError as e:
        fail(f"top: cannot read the {mode or 'kernel'} counters: {e}")
    return Sample(modes[-1], time.time(), ())  # no counters of that mode on the node


def _live(mode: str | None, netns: str | None, interval: float, limit: int) -> None:
    """Redraw every `interval` seconds until Ctrl-C: busiest service ports first."""
    from rich.live import Live

    from kproxy_nft.top.view import sample_view

    previous = read_sample(mode, netns)
    mode = previous.mode  # detected once: the view does not switch modes under the reader
    with Live(sample_view(previous, limit), auto_refresh=False) as live:
        try:
            while True:
                time.sleep(interval)
                sample = read_sample(mode, netns)
                live.update(sample_view(with_rates(previous, sample), limit), refresh=True)
                previous = sample
        except KeyboardInterrupt:
            pass


def top_command() -> click.Command:
    """The `top` command."""

    @click.command("top", epilog=EPILOG)
    @click.option("--proxy-mode", type=click.Choice(PROXY_MODES), default=None,
                  help="Whose counters to read (default: nftables if its tables are there, else iptables).")
    @click.option("--once", is_flag=True, help="Print one sample and exit (counts since each counter began).")
    @click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True,
                  help="With --once: the counts as a table, or as JSON (docs/TOP.md).")
    @click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
                  help="Seconds between two samples of the live view.")
    @click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
                  help="Service ports shown (the busiest).")
    @click.option("--netns", default=None, hidden=True, help="Read the counters of this network namespace (tests).")
    def command(proxy_mode: str | None, once: bool, output: str, interval: float, limit: int,
                netns: str | None) -> None:
        """New connections per service port and per endpoint, from the counters the kernel keeps (needs root).

        iptables: the KUBE-SEP- DNAT rules' packet counters (every frontend of a service port);
        nftables: the backend map elements' counters (cluster IP traffic only).
        """
        if os.geteuid() != 0:
            fail("top reads the kernel's rules and counters: run it as root")
        if output == "json" and not once:
            fail("-o json needs --once (one sample)")
        if not once:
            _live(proxy_mode, netns, interval, limit)
            return
        sample = read_sample(proxy_mode, netns)
        if output == "json":
            click.echo(json.dumps(sample.as_dict(), indent=2))
            return
        from rich.console import Console

        from kproxy_nft.top.view import sample_view

        Console().print(sample_view(sample, limit))

    return command
