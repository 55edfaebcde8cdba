"""DNS messages in, DNS messages out: the wire-level rules around `resolver.lookup`.

`respond(wire, records, transport)` turns one received message into the bytes to send back,
or None when nothing should be sent. Pure (no sockets); the server (`discovery.server`)
only moves bytes. The rules are those of CoreDNS's server and `request` package:

* Bytes that do not parse as a DNS message, and responses (QR set), are dropped: answering
  garbage or responses only helps reflection attacks.
* An opcode other than QUERY gets NOTIMP; a message without exactly one question FORMERR;
  EDNS version > 0 gets BADVERS (`plugin/pkg/edns.Version`).
* Answers are authoritative (AA), recursion is not available (RA clear, as in the seed's
  `dig` output), RD and CD are copied from the query.
* EDNS is echoed (`request.SizeAndDo`): version 0, the client's UDP payload size and DO
  bit, no options (this server implements none).
* Size (`request.Scrub`): UDP answers must fit the client's EDNS payload size, or 512 bytes
  without EDNS (and never less than 512); TCP answers 65535 bytes. A larger answer keeps as
  many records as fit, in section order, and sets TC, so the client retries over TCP.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rrset

from kproxy_nft.discovery.records import RecordSet
from kproxy_nft.discovery.resolver import RR, Answer, lookup

Transport = Literal["udp", "tcp"]
MIN_UDP_SIZE = 512  # RFC 1035 / dns.MinMsgSize: also the floor for a smaller EDNS payload
MAX_TCP_SIZE = 65535  # dns.MaxMsgSize


def respond(wire: bytes, records: RecordSet, transport: Transport) -> bytes | None:
    """The reply to one received message, or None to drop it."""
    try:
        query = dns.message.from_wire(wire)
    except Exception:  # noqa: BLE001 - any parse failure (dnspython raises many kinds): drop it
        return None
    if query.flags & dns.flags.QR:
        return None
    if query.opcode() != dns.opcode.QUERY:
        return _encode(query, Answer(dns.rcode.NOTIMP), transport)
    if len(query.question) != 1:
        return _encode(query, Answer(dns.rcode.FORMERR), transport)
    if query.edns > 0:
        return _encode(query, Answer(dns.rcode.BADVERS), transport)
    question = query.question[0]
    answer = lookup(records, question.name, question.rdtype, question.rdclass)
    return _encode(query, answer, transport)


def size_limit(query: dns.message.Message, transport: Transport) -> int:
    """How large the reply may be (CoreDNS `request.Size` / `edns.Size`)."""
    if transport == "tcp":
        return MAX_TCP_SIZE
    return max(MIN_UDP_SIZE, query.payload) if query.edns >= 0 else MIN_UDP_SIZE


def _rrsets(rrs: Iterable[RR]) -> list[dns.rrset.RRset]:
    """One RRset per record, so that truncation can drop single records and order is kept."""
    out = []
    for rr in rrs:
        rrset = dns.rrset.RRset(rr.name, dns.rdataclass.IN, rr.rdata.rdtype)
        rrset.add(rr.rdata, rr.ttl)
        out.append(rrset)
    return out


def _message(query: dns.message.Message, answer: Answer, keep: int | None = None) -> dns.message.Message:
    """The reply message with the first `keep` records of all sections (all when None)."""
    reply = dns.message.Message(id=query.id)
    reply.flags = dns.flags.QR | dns.flags.AA | (query.flags & (dns.flags.RD | dns.flags.CD))
    reply.set_opcode(query.opcode())
    reply.question = list(query.question[:1])
    if query.edns >= 0 or answer.rcode == dns.rcode.BADVERS:
        reply.use_edns(0, query.ednsflags & dns.flags.DO, payload=query.payload, options=[])
    reply.set_rcode(answer.rcode)
    sections = (answer.answer, answer.authority, answer.additional)
    remaining = sum(len(s) for s in sections) if keep is None else keep
    targets = (reply.answer, reply.authority, reply.additional)
    for target, section in zip(targets, sections, strict=True):
        target.extend(_rrsets(section[:remaining]))
        remaining -= min(remaining, len(section))
    if keep is not None:
        reply.flags |= dns.flags.TC
    return reply


def _encode(query: dns.message.Message, answer: Answer, transport: Transport) -> bytes:
    """Wire format within the size limit: everything, else the longest prefix that fits, with TC."""
    limit = size_limit(query, transport)
    try:
        return _message(query, answer).to_wire(max_size=limit)
    except dns.exception.TooBig:
        pass
    # Binary search for the most records (in section order) that fit: none always fit (the
    # question is at most 255 bytes of name), all of them did not.
    low, high = 0, len(answer.answer) + len(answer.authority) + len(answer.additional) - 1
    while low < high:
        middle = (low + high + 1) // 2
        try:
            _message(query, answer, middle).to_wire(max_size=limit)
        except dns.exception.TooBig:
            high = middle - 1
        else:
            low = middle
    return _message(query, answer, low).to_wire(max_size=limit)
