"""Pure parsing of the kernel's nf_tables change notifications (what `nft monitor` reads).

Every committed nf_tables transaction is announced on the NFNLGRP_NFTABLES multicast group of
NETLINK_NETFILTER: one message per object it created or deleted (table, chain, rule, set,
set elements, stateful object, flowtable), each naming its table and family, then one
NFT_MSG_NEWGEN carrying the new generation and the committing process (NFTA_GEN_PROC_PID).
`CommitReader` turns received bytes into `Commit`s (the objects, then who committed them), and
`Interest` says which of those objects are ours, so the socket side (`nft_monitor`) only does
I/O. No I/O here: tested with recorded bytes (tests/test_nft_monitor.py).

Message layouts from the kernel's uapi headers (`linux/netlink.h`, `linux/netfilter/nfnetlink.h`,
`linux/netfilter/nf_tables.h`): nlmsghdr (host byte order), nfgenmsg (family, version, res_id),
then netlink attributes; nf_tables puts its numbers in network byte order.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

NFNL_SUBSYS_NFTABLES = 10
NFNLGRP_NFTABLES = 7
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER

# enum nf_tables_msg_types → (operation, object kind). The GET ones never appear on the group.
_MESSAGES = {
    0: ("new", "table"), 2: ("del", "table"),
    3: ("new", "chain"), 5: ("del", "chain"),
    6: ("new", "rule"), 8: ("del", "rule"),
    9: ("new", "set"), 11: ("del", "set"),
    12: ("new", "setelem"), 14: ("del", "setelem"),
    18: ("new", "obj"), 20: ("del", "obj"),
    22: ("new", "flowtable"), 24: ("del", "flowtable"),
}
NFT_MSG_NEWGEN = 15
# For every kind, attribute 1 is its table; the name is attribute 3 for a chain (NFTA_CHAIN_NAME),
# 2 otherwise (NFTA_RULE_CHAIN, NFTA_SET_NAME, NFTA_SET_ELEM_LIST_SET, NFTA_OBJ_NAME, …).
_TABLE_ATTR = 1
_NAME_ATTR = {"table": 1, "chain": 3}
NFTA_RULE_EXPRESSIONS = 4
NFTA_GEN_ID, NFTA_GEN_PROC_PID = 1, 2
# Inside a rule: list element → expression name/data → immediate data → verdict → chain.
NFTA_LIST_ELEM = 1
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFTA_IMMEDIATE_DATA = 2
NFTA_DATA_VERDICT = 2
NFTA_VERDICT_CHAIN = 2

# nfgenmsg.nfgen_family (NFPROTO_*) → the family's name in nft syntax.
FAMILIES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}

_NLMSGHDR = struct.Struct("=IHHII")
_NLATTR = struct.Struct("=HH")


@dataclass(frozen=True)
class ObjectChange:
    """One object a transaction created or deleted. `name`: the chain of a rule, the set of
    elements, the object's own name otherwise; `jumps`: the chains a rule's verdicts name."""

    op: str
    kind: str
    family: str
    table: str
    name: str = ""
    jumps: tuple[str, ...] = ()


@dataclass(frozen=True)
class Commit:
    """A committed transaction: what it changed and who committed it (pid None: not said)."""

    generation: int | None
    pid: int | None
    changes: tuple[ObjectChange, ...]


class MessageError(ValueError):
    """Bytes that are not a well-formed netlink message."""


def _attributes(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each netlink attribute in `data`."""
    offset = 0
    while offset + _NLATTR.size <= len(data):
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size or offset + length > len(data):
            raise MessageError(f"attribute length {length} at offset {offset} of {len(data)}")
        yield kind & NLA_TYPE_MASK, data[offset + _NLATTR.size: offset + length]
        offset += (length + 3) & ~3


def _string(payload: bytes) -> str:
    return payload.split(b"\0", 1)[0].decode(errors="replace")


def _first(data: bytes, wanted: int) -> bytes | None:
    return next((payload for kind, payload in _attributes(data) if kind == wanted), None)


def _verdict_chains(expressions: bytes) -> tuple[str, ...]:
    """The chains named by `jump`/`goto` verdicts among a rule's expressions."""
    chains = []
    for kind, element in _attributes(expressions):
        if kind != NFTA_LIST_ELEM or _string(_first(element, NFTA_EXPR_NAME) or b"") != "immediate":
            continue
        data = _first(element, NFTA_EXPR_DATA) or b""
        verdict = _first(_first(data, NFTA_IMMEDIATE_DATA) or b"", NFTA_DATA_VERDICT)
        chain = _first(verdict or b"", NFTA_VERDICT_CHAIN)
        if chain is not None:
            chains.append(_string(chain))
    return tuple(chains)


def parse_message(msg_type: int, body: bytes) -> ObjectChange | tuple[int | None, int | None] | None:
    """One nf_tables message (after the nlmsghdr): an `ObjectChange`, (generation, pid) for
    NFT_MSG_NEWGEN, or None for anything else."""
    if msg_type >> 8 != NFNL_SUBSYS_NFTABLES or len(body) < 4:
        return None
    family, attrs = FAMILIES.get(body[0], str(body[0])), body[4:]
    message = msg_type & 0xFF
    if message == NFT_MSG_NEWGEN:
        values = dict(_attributes(attrs))
        gen, pid = values.get(NFTA_GEN_ID), values.get(NFTA_GEN_PROC_PID)
        return (struct.unpack("!I", gen[:4])[0] if gen and len(gen) >= 4 else None,
                struct.unpack("!I", pid[:4])[0] if pid and len(pid) >= 4 else None)
    if message not in _MESSAGES:
        return None
    op, kind = _MESSAGES[message]
    values = dict(_attributes(attrs))
    table = _string(values.get(_TABLE_ATTR, b""))
    name = _string(values.get(_NAME_ATTR.get(kind, 2), b""))
    jumps = _verdict_chains(values.get(NFTA_RULE_EXPRESSIONS, b"")) if kind == "rule" else ()
    return ObjectChange(op, kind, family, table, name, jumps)


def split_messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, body) of each netlink message in one datagram."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, msg_type, _flags, _seq, _port = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise MessageError(f"message length {length} at offset {offset} of {len(data)}")
        yield msg_type, data[offset + _NLMSGHDR.size: offset + length]
        offset += (length + 3) & ~3


# A dump of every table (what `nft list tables` prints), asked for on a socket of our own.
NFT_MSG_GETTABLE = 1
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
_NFGENMSG_ANY_FAMILY = b"\0\0\0\0"  # nfgenmsg: AF_UNSPEC, NFNETLINK_V0, res_id 0


def table_dump_request(sequence: int) -> bytes:
    """NFT_MSG_GETTABLE as a dump over every family: the kernel answers one table message per
    table, names only, then NLMSG_DONE."""
    msg_type = NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETTABLE
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(_NFGENMSG_ANY_FAMILY), msg_type, NLM_F_REQUEST | NLM_F_DUMP,
                            sequence, 0)
    return header + _NFGENMSG_ANY_FAMILY


def tables_in_dump(data: bytes) -> tuple[list[str], bool, int]:
    """One datagram of the answer to `table_dump_request`: the tables in it (`"ip kproxy-nft"`),
    whether the dump ended, and the error number the kernel sent instead (0: none)."""
    tables: list[str] = []
    for msg_type, body in split_messages(data):
        if msg_type == NLMSG_DONE:
            return tables, True, 0
        if msg_type == NLMSG_ERROR:
            error = -struct.unpack_from("=i", body)[0] if len(body) >= 4 else 0
            return tables, True, error
        change = parse_message(msg_type, body)
        if isinstance(change, ObjectChange) and change.kind == "table" and change.op == "new":
            tables.append(f"{change.family} {change.name}")
    return tables, False, 0


@dataclass
class CommitReader:
    """Collects object messages until their transaction's NFT_MSG_NEWGEN (the kernel sends the
    objects first). Feed it datagrams in order; it returns the commits they complete."""

    _pending: list[ObjectChange] = field(default_factory=list)

    def feed(self, datagram: bytes) -> list[Commit]:
        commits = []
        for msg_type, body in split_messages(datagram):
            parsed = parse_message(msg_type, body)
            if isinstance(parsed, ObjectChange):
                self._pending.append(parsed)
            elif parsed is not None:
                commits.append(Commit(parsed[0], parsed[1], tuple(self._pending)))
                self._pending.clear()
        return commits

    def lost(self) -> None:
        """Messages were dropped (the socket overran): what was collected is incomplete."""
        self._pending.clear()


@dataclass(frozen=True)
class Interest:
    """Which nf_tables objects are ours.

    `tables`: (family, table) pairs wholly ours (nftables mode: `ip kproxy-nft`, `ip6 kproxy-nft`).
    `shared_tables`: tables others write too (iptables-nft's `ip nat`, …), where only chains whose
    name starts with `chain_prefix`, and rules jumping to one, are ours; deleting such a table is
    ours too (it takes our chains with it).
    """

    tables: frozenset[tuple[str, str]] = frozenset()
    shared_tables: frozenset[tuple[str, str]] = frozenset()
    chain_prefix: str = "KUBE-"

    def touched(self, change: ObjectChange) -> str | None:
        """The table of ours `change` touched ("ip kproxy-nft", "ip nat"), None if not ours."""
        key = (change.family, change.table)
        where = f"{change.family} {change.table}"
        if key in self.tables:
            return where
        if key not in self.shared_tables:
            return None
        if change.kind == "table" and change.op == "del":
            return where
        if change.kind in ("chain", "rule") and change.name.startswith(self.chain_prefix):
            return where
        if any(jump.startswith(self.chain_prefix) for jump in change.jumps):
            return where
        return None

    def touched_by(self, commit: Commit) -> frozenset[str]:
        """Every table of ours the commit touched."""
        return frozenset(filter(None, (self.touched(change) for change in commit.changes)))

    def chains_touched_by(self, commit: Commit) -> frozenset[str] | None:
        """The chains of ours whose rules the commit changed, and as `@name` the sets whose
        elements it changed (nft's spelling of a set reference); None when it touched more (a
        table, a set's declaration): then only a comparison of everything will do."""
        chains = set()
        for change in commit.changes:
            if self.touched(change) is None:
                continue
            if change.kind == "setelem":
                chains.add(f"@{change.name}")
            elif change.kind in ("chain", "rule"):
                chains.add(change.name)
            else:
                return None
        return frozenset(chains)
