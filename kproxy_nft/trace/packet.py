"""The packet a trace follows, and the walk's per-branch state (`Flow`) and path entries (`Step`).

`parse_packet` turns the command line's `--src IP --dst IP:PORT --protocol P` into a `Packet`,
refusing what no kernel would send (a host name, no port, IPv4 to IPv6) with `TraceInputError`.
A `Flow` is one possible fate of the packet while the rules are walked: the random choices of
`-m statistic` / `numgen` split a walk into flows, each with its probability.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field

from kproxy_nft.model import IPFamily, Protocol, ip_family

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


class TraceInputError(ValueError):
    """A packet that cannot be traced as given; the message is the one line to show."""


@dataclass(frozen=True)
class Packet:
    """The first packet of a new connection: source address, destination address and port, protocol."""

    src: str
    dst: str
    port: int
    protocol: Protocol

    @property
    def family(self) -> IPFamily:
        return ip_family(self.dst)

    @property
    def destination(self) -> str:
        """`ip:port`, IPv6 in brackets (an endpoint's spelling)."""
        return join_address(self.dst, self.port)


def join_address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


_BRACKETED = re.compile(r"\[([^\]]+)\]:(\d+)")


def _address(text: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise TraceInputError(f"{what}: {text!r} is not an IP address (host names are not resolved)") from None


def parse_packet(src: str, dst: str, protocol: str = "tcp") -> Packet:
    """The packet of `--src IP --dst IP:PORT|[IPv6]:PORT --protocol tcp|udp|sctp`."""
    source = _address(src, "--src")
    m = _BRACKETED.fullmatch(dst)
    if m:
        ip_text, port_text = m.group(1), m.group(2)
    elif dst.count(":") == 1:
        ip_text, port_text = dst.split(":")
    else:
        raise TraceInputError(f"--dst: {dst!r} needs a port: IP:PORT, or [IPv6]:PORT")
    destination = _address(ip_text, "--dst")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise TraceInputError(f"--dst: port {port_text!r} must be a number between 1 and 65535")
    if ip_family(source) is not ip_family(destination):
        raise TraceInputError(f"--src {source} and --dst {destination} are of different IP families")
    try:
        proto = Protocol(protocol.upper())
    except ValueError:
        raise TraceInputError(f"--protocol: {protocol!r} is not one of tcp, udp, sctp") from None
    return Packet(source, destination, int(port_text), proto)


def is_local(ip: str, local: frozenset[str]) -> bool:
    """Whether the node owns `ip` (one of `local`, or loopback)."""
    addr = ipaddress.ip_address(ip)
    return str(addr) in local or any(addr in net for net in LOOPBACK if net.version == addr.version)


@dataclass(frozen=True)
class Step:
    """One entry of a trace's path: a rule that matched, or a map element that was looked up."""

    table: str | None = None
    chain: str | None = None
    rule: str | None = None
    map: str | None = None
    element: str | None = None

    def as_dict(self) -> dict[str, str]:
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class Flow:
    """The packet as one branch of the walk has made it so far.

    `dst`/`port` change with a DNAT (`endpoint` then names it); `mark` is the fwmark (masquerade
    bit); `accepted`: a rule of ours accepted it explicitly; `notes`: what the walk could not
    evaluate (a match it does not know), shown as reasons.
    """

    src: str
    dst: str
    port: int
    protocol: str  # lower case, as both rule languages spell it
    original_dst: str
    original_port: int
    mark: int = 0
    endpoint: str | None = None
    masquerade: bool = False
    accepted: bool = False
    path: tuple[Step, ...] = ()
    notes: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def of(cls, packet: Packet) -> Flow:
        proto = packet.protocol.lowercase
        return cls(packet.src, packet.dst, packet.port, proto, packet.dst, packet.port)

    def through(self, step: Step) -> Flow:
        return dataclasses.replace(self, path=(*self.path, step))

    def noting(self, note: str) -> Flow:
        return self if note in self.notes else dataclasses.replace(self, notes=(*self.notes, note))

    def translated(self, ip: str, port: int) -> Flow:
        return dataclasses.replace(self, dst=ip, port=port, endpoint=join_address(ip, port))

