"""A `Trace` for people: plain lines (path, endpoints with their chances, masquerade, verdict, reasons)."""

from __future__ import annotations

from kproxy_nft.trace.packet import Packet, Step
from kproxy_nft.trace.walk import Trace


def _step(step: Step) -> str:
    if step.map is not None:
        return f"@{step.map}: {step.element}"
    return f"{step.table} {step.chain}: {step.rule}"


def render_text(packet: Packet, trace: Trace) -> str:
    """The trace as the text `kproxy-nft trace` prints."""
    lines = [f"{packet.protocol.value} {packet.src} → {packet.destination}", "path:"]
    lines += [f"  {_step(step)}" for step in trace.path] or ["  (no rule of ours matched)"]
    if trace.endpoints:
        lines.append("endpoints:")
        lines += [f"  {e.address:<24} {e.probability:8.2%}" for e in trace.endpoints]
    lines.append(f"masquerade: {'yes' if trace.masquerade else 'no'}")
    lines.append(f"verdict: {trace.verdict}")
    if trace.reasons:
        lines.append("reasons:")
        lines += [f"  - {reason}" for reason in trace.reasons]
    return "\n".join(lines) + "\n"
