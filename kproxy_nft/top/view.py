"""How connection shares are drawn: one bar per endpoint under its service port (rich renderables).

The demo's chart of which pod answered the seed's curls and `kproxy-nft top`'s live view are
the same picture, drawn here once. Builds renderables only; printing is the caller's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich.bar import Bar
from rich.table import Table
from rich.text import Text

from kproxy_nft.top import Sample

BAR_WIDTH = 30

# (heading, [(row label, share 0..1), …]) per service port
ShareGroup = tuple[str, Sequence[tuple[str, float]]]


def share_chart(groups: Iterable[ShareGroup], width: int = BAR_WIDTH) -> Table:
    """A heading per service port, then a bar per endpoint: its share (ideal: 1/N)."""
    chart = Table.grid(padding=(0, 1))
    for heading, rows in groups:
        chart.add_row(heading, "", "")
        for label, share in rows:
            chart.add_row(f"  {label}", Bar(1.0, 0, share, width=width), f"{share:4.0%}")
    return chart


def _rate(rate: float | None) -> str:
    return "" if rate is None else f"{rate:,.1f}/s"


def sample_view(sample: Sample, limit: int | None = None) -> Table:
    """`top`'s screen: service ports busiest first, each endpoint's share as a bar, with its
    connections counted and per second; `limit` service ports at most."""
    services = sample.by_rate()[:limit]
    title = (f"{sample.mode}: new connections per endpoint, {len(sample.services)} service ports"
             + (f", rates over {sample.interval:.1f} s" if sample.interval else ""))
    table = Table(title=title, show_header=True, box=None, pad_edge=False)
    for column, justify in (("service port / endpoint", "left"), ("share", "left"), ("", "right"),
                            ("connections", "right"), ("rate", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for svc in services:
        table.add_row(Text(svc.label, style="bold"), "", "", f"{svc.connections:,}", _rate(svc.rate))
        for (address, share), ep in zip(svc.shares(), svc.endpoints, strict=True):
            table.add_row(f"  {address}", Bar(1.0, 0, share, width=BAR_WIDTH), f"{share:4.0%}",
                          f"{ep.connections:,}", _rate(ep.rate))
    return table


__all__ = ["BAR_WIDTH", "ShareGroup", "sample_view", "share_chart"]
