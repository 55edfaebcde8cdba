"""The kernel's iptables state as data, read from and written back to `iptables-save` text.

`parse_save` turns `iptables-save` output into a `KernelState` (tables → chains → rule texts,
each the text after `-A CHAIN `, exactly as printed); `render_save` is its inverse, so that
`parse_save(render_save(s)) == s`. Built-in chains carry their policy; user chains have none.

This module only reads and writes the text format: what the rules mean (their canonical form)
is `iptables_rule`'s business, what to change is `iptables_plan`'s. Pure: no subprocess.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from kproxy_nft.model import IPFamily

# The chains each table has built in (iptables-save lists them first, with a policy).
BUILTIN_CHAINS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "filter": ("INPUT", "FORWARD", "OUTPUT"),
        "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
        "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
        "raw": ("PREROUTING", "OUTPUT"),
        "security": ("INPUT", "FORWARD", "OUTPUT"),
    }
)


class SaveFormatError(ValueError):
    """Text that is not `iptables-save` output; the message names the line."""


@dataclass(frozen=True, slots=True)  # slots: one per chain, 110,000 at 10k Services (7 MiB less)
class KernelChain:
    name: str
    rules: tuple[str, ...] = ()
    policy: str | None = None  # ACCEPT/DROP for a built-in chain, None for a user chain

    @property
    def builtin(self) -> bool:
        return self.policy is not None


@dataclass(frozen=True)
class KernelTable:
    """One table; `chains` keeps iptables-save's order (built-in chains first)."""

    name: str
    chains: Mapping[str, KernelChain] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A read-only view over a private copy; a dict handed over by the planner, which keeps
        # no reference to it, is wrapped without copying (110,000 chains at 10,000 services).
        if not isinstance(self.chains, MappingProxyType):
            object.__setattr__(self, "chains", MappingProxyType(dict(self.chains)))

    @classmethod
    def of(cls, name: str, chains: Iterable[KernelChain]) -> KernelTable:
        return cls(name, {c.name: c for c in chains})

    def is_builtin(self, chain: str) -> bool:
        found = self.chains.get(chain)
        return found.builtin if found else chain in BUILTIN_CHAINS.get(self.name, ())

    def rules(self, chain: str) -> tuple[str, ...]:
        found = self.chains.get(chain)
        return found.rules if found else ()


@dataclass(frozen=True)
class KernelState:
    """What one family's iptables holds in the tables that were read."""

    family: IPFamily
    tables: Mapping[str, KernelTable] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tables", MappingProxyType(dict(self.tables)))

    def table(self, name: str) -> KernelTable:
        """The table, or an empty one when it was not read or does not exist yet."""
        return self.tables.get(name) or KernelTable(name)

    def replace_table(self, table: KernelTable) -> KernelState:
        return KernelState(self.family, {**self.tables, table.name: table})


_CHAIN_LINE = re.compile(r":(\S+) (\S+)(?: \[\d+:\d+\])?")
_COUNTERS = re.compile(r"\[\d+:\d+\] ")


def parse_save(text: str, family: IPFamily = IPFamily.V4) -> KernelState:
    """Parse `iptables-save` output (with or without `-c` counters) into a `KernelState`."""
    tables: dict[str, KernelTable] = {}
    name: str | None = None
    chains: dict[str, tuple[str | None, list[str]]] = {}

    def fail(number: int, why: str) -> SaveFormatError:
        return SaveFormatError(f"iptables-save output, line {number}: {why}")

    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            if name is not None:
                raise fail(number, f"table {line[1:]} starts before COMMIT of {name}")
            name, chains = line[1:], {}
        elif name is None:
            raise fail(number, f"outside a table: {line!r}")
        elif line == "COMMIT":
            tables[name] = KernelTable.of(
                name, (KernelChain(c, tuple(rules), None if p == "-" else p) for c, (p, rules) in chains.items())
            )
            name = None
        elif line.startswith(":"):
            m = _CHAIN_LINE.fullmatch(line)
            if not m:
                raise fail(number, f"bad chain line {line!r}")
            chains[m.group(1)] = (m.group(2), [])
        else:
            rule = _COUNTERS.sub("", line, count=1) if line.startswith("[") else line
            chain, _, rest = rule[3:].partition(" ") if rule.startswith("-A ") else ("", "", "")
            if chain not in chains:
                raise fail(number, f"not a rule of a declared chain: {line!r}")
            chains[chain][1].append(rest)
    if name is not None:
        raise fail(len(text.splitlines()), f"table {name} has no COMMIT")
    return KernelState(family, tables)


def render_table(table: KernelTable) -> list[str]:
    """One table as iptables-save prints it (without its comment lines)."""
    lines = [f"*{table.name}"]
    lines += [f":{c.name} {c.policy or '-'} [0:0]" for c in table.chains.values()]
    lines += [f"-A {c.name} {rule}".rstrip() for c in table.chains.values() for rule in c.rules]
    lines.append("COMMIT")
    return lines


def render_save(state: KernelState) -> str:
    """The state as `iptables-save` text, loadable by `iptables-restore`."""
    lines: list[str] = []
    for table in state.tables.values():
        lines += render_table(table)
    return "\n".join(lines) + "\n" if lines else ""


def strip_comments(save_output: str) -> str:
    """iptables-save output without its `# Generated/Completed … <timestamp>` lines."""
    return "".join(line for line in save_output.splitlines(keepends=True) if not line.startswith("#"))


# ---------------------------------------------------------------------------------------------
# connection counters (`kproxy-nft top`)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DnatCounter:
    """The DNAT rule of one `KUBE-SEP-…` chain and its packet counter from `iptables-save -c`.

    A NAT rule sees only the first packet of a connection (the rest follow conntrack), so the
    packet count is the number of new connections sent to that endpoint.
    """

    chain: str
    service: str | None  # the rule's comment: the service port, `ns/name:port`
    destination: str  # `ip:port`, `[ip6]:port` as iptables prints it
    packets: int


# iptables-save prints the matches in its own order, so each part is found on its own.
_COUNTED_RULE = re.compile(r"\[(\d+):\d+\] -A (\S+) (.*)")
_COMMENT = re.compile(r'--comment (?:"([^"]*)"|(\S+))')
_TO_DESTINATION = re.compile(r"-j DNAT .*--to-destination (\S+)")
_DESTINATION = re.compile(r"(?:^| )-d (\S+?)(?:/(?:32|128))?(?: |$)")
_DPORT = re.compile(r"--dport (\d+)")
_PROTOCOL = re.compile(r"(?:^| )-p (\w+)")
CLUSTER_IP_SUFFIX = " cluster IP"  # the comment of a service port's KUBE-SERVICES rule


def _comment(rule: str) -> str | None:
    m = _COMMENT.search(rule)
    return None if m is None else (m.group(1) if m.group(1) is not None else m.group(2))


def dnat_counters(save_output: str, chain_prefix: str = "KUBE-SEP-") -> list[DnatCounter]:
    """The DNAT rules of the chains named `chain_prefix…` in `iptables-save -c -t nat` output."""
    out = []
    for line in save_output.splitlines():
        m = _COUNTED_RULE.fullmatch(line.rstrip())
        if m is None or not m.group(2).startswith(chain_prefix):
            continue
        target = _TO_DESTINATION.search(m.group(3))
        if target is not None:
            out.append(DnatCounter(m.group(2), _comment(m.group(3)), target.group(1), int(m.group(1))))
    return out


def cluster_ip_frontends(save_output: str) -> dict[str, str]:
    """Service port (`ns/name:port`) → its cluster IP as `ip:port/proto` (`[ip6]:port/proto`),
    from the `KUBE-SERVICES` rules commented `… cluster IP` (kube-proxy's comment)."""
    out = {}
    for line in save_output.splitlines():
        rule = _COUNTERS.sub("", line, count=1)
        if not rule.startswith("-A KUBE-SERVICES "):
            continue
        comment = _comment(rule)
        if not comment or not comment.endswith(CLUSTER_IP_SUFFIX):
            continue
        ip, port, proto = _DESTINATION.search(rule), _DPORT.search(rule), _PROTOCOL.search(rule)
        if ip and port and proto:
            address = f"[{ip.group(1)}]" if ":" in ip.group(1) else ip.group(1)
            out[comment.removesuffix(CLUSTER_IP_SUFFIX)] = f"{address}:{port.group(1)}/{proto.group(1)}"
    return out
