"""A `Trace` for people: plain lines (path, endpoints with their chances, masquerade, verdict, reasons)."""

from __future__ import annotations

from kproxy_nft.trace.packet import Packet, Step
from kproxy_nft.trace.walk import Trace


def _step(step: Step) -> str:
    if step.map is not None:
        return f"@{step.map}: {step.element}"
    return f"{step.table} {step.chain}: {step.rule}"


def _shared_prefix(paths: list[tuple[Step, ...]]) -> int:
    """How many first steps every branch takes."""
    shortest = min(len(p) for p in paths)
    return next((i for i in range(shortest) if len({p[i] for p in paths}) > 1), shortest)


def _path_lines(trace: Trace) -> list[str]:
    """The steps every route takes, then each route's own (a random choice splits the walk)."""
    routes = [r for r in trace.routes if r.probability > 0]
    if len(routes) < 2:
        return [f"  {_step(step)}" for step in trace.path]
    shared = _shared_prefix([r.path for r in routes])
    lines = [f"  {_step(step)}" for step in routes[0].path[:shared]]
    for route in routes:
        lines.append(f"  ├─ {route.endpoint or 'no DNAT'} ({route.probability:.2%}):")
        lines += [f"  │    {_step(step)}" for step in route.path[shared:]]
    return lines


def render_text(packet: Packet, trace: Trace) -> str:
    """The trace as the text `kproxy-nft trace` prints."""
    lines = [f"{packet.protocol.value} {packet.src} → {packet.destination}", "path:"]
    lines += _path_lines(trace) or ["  (no rule of ours matched)"]
    if trace.endpoints:
        lines.append("endpoints:")
        lines += [f"  {e.address:<24} {e.probability:8.2%}" for e in trace.endpoints]
    lines.append(f"masquerade: {'yes' if trace.masquerade else 'no'}")
    lines.append(f"verdict: {trace.verdict}")
    if trace.reasons:
        lines.append("reasons:")
        lines += [f"  - {reason}" for reason in trace.reasons]
    return "\n".join(lines) + "\n"
