"""`kproxy-nft trace`: one packet through the rules, offline or as the kernel holds them. Pure.

    packet.py    the packet (`parse_packet`), a branch of the walk (`Flow`), a path entry (`Step`)
    walk.py      chains, jumps, random choices and hooks in kernel order; the `Trace` value
    iptables.py  kube-proxy's iptables layout (iptables-save text, or our compiler's rules)
    nftables.py  our nftables layout (the compiled table, or `nft list` text)
    reasons.py   the why, in Service terms (endpoint selection, policies, source ranges)
    text.py      the human rendering; `Trace.as_dict` is the JSON contract (docs/TRACE.md)

The same walk traces a live node (`--live`: the CLI reads the kernel and hands the text here)
and the rules compiled from manifests, so offline and live answers come from one code path.
Which layout a node has is its proxier's business (`Proxier.trace_program`,
`Proxier.live_trace_program`): nothing here branches on the proxy mode.
"""

from __future__ import annotations

from kproxy_nft.kernel.iptables_text import KernelState
from kproxy_nft.model import IPFamily, NodeContext
from kproxy_nft.trace.iptables import IptablesProgram
from kproxy_nft.trace.nftables import NftablesProgram, NftTable, tables_from_listing
from kproxy_nft.trace.packet import Packet, TraceInputError, parse_packet
from kproxy_nft.trace.walk import EndpointChance, Program, Trace, summarize, walk


def node_addresses(node: NodeContext, extra: tuple[str, ...] = ()) -> frozenset[str]:
    """The addresses the node owns (loopback aside): its node IPs, interface addresses, `extra`."""
    return frozenset((*node.node_ips, *node.local_addresses, *extra))


def trace(program: Program, packet: Packet, local: frozenset[str], reasons: tuple[str, ...] = ()) -> Trace:
    """Walk `packet` through `program`; `reasons` (from `reasons.explain`) come first in the trace."""
    return summarize(walk(program, packet, local), reasons)


def iptables_program(state: KernelState, local: frozenset[str]) -> Program:
    """`iptables-save` of a node (parsed with `kernel.iptables_text.parse_save`), ready to walk."""
    return IptablesProgram(state, local)


def nftables_program(listing: str, family: IPFamily, local: frozenset[str]) -> Program | None:
    """Our table of `family` in `nft list ruleset|table` text, ready to walk (None: not there)."""
    table: NftTable | None = tables_from_listing(listing).get(family)
    return NftablesProgram(table, local) if table is not None else None


__all__ = [
    "EndpointChance",
    "Packet",
    "Program",
    "Trace",
    "TraceInputError",
    "iptables_program",
    "node_addresses",
    "nftables_program",
    "parse_packet",
    "trace",
]
