"""The records of a `RecordSet` as master files, as `kproxy-nft dns records` prints them.

The listing is not a second implementation of the records: it walks the names the
Kubernetes DNS specification (schema 1.1.0) defines for each object and asks
`resolver.lookup` for them, so the file shows exactly what the server answers:

* the apex SOA and NS (with the name server's address), and `dns-version` TXT (§2.2);
* per Service: A/AAAA of every cluster IP (§2.3.1) or of every ready endpoint (§2.4.1),
  CNAME for ExternalName (§2.5), SRV per named port (§2.3.2, §2.4.2), and A/AAAA of
  `<hostname>.<service>.<ns>.svc.<zone>` per ready endpoint (CoreDNS answers those for
  every Service, so every PTR target below resolves);
* PTR for every cluster IP and ready endpoint IP (§2.3.3, §2.4.3), in the reverse zones.

Names CoreDNS also answers but the specification does not define (an SRV at the Service
name, addresses at an SRV name, underscore-less port names) are served, not listed.
Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass

import dns.name
import dns.rcode
import dns.rdatatype
import dns.reversename

from kproxy_nft.discovery.records import REVERSE_ZONES, SCHEMA_VERSION, RecordSet, ServiceKind
from kproxy_nft.discovery.resolver import RR, lookup

_ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)


@dataclass(frozen=True)
class Block:
    """Records listed under one comment line (the apex, or one Service)."""

    title: str
    records: tuple[RR, ...]


@dataclass(frozen=True)
class ZoneListing:
    """One served zone and its records."""

    zone: dns.name.Name
    blocks: tuple[Block, ...]

    @property
    def records(self) -> tuple[RR, ...]:
        return tuple(rr for block in self.blocks for rr in block.records)


Question = tuple[dns.name.Name, dns.rdatatype.RdataType]


def _answers(records: RecordSet, questions: list[Question], with_additional: bool = False) -> tuple[RR, ...]:
    """The records owned by each questioned name, as the resolver answers them (deduplicated)."""
    found: dict[tuple[dns.name.Name, int, str], RR] = {}
    for name, rdtype in questions:
        answer = lookup(records, name, rdtype)
        if answer.rcode != dns.rcode.NOERROR:
            continue
        extra = answer.additional if with_additional else ()
        for rr in (*(r for r in answer.answer if r.name == name and r.rdata.rdtype == rdtype), *extra):
            found.setdefault((rr.name, rr.rdata.rdtype, rr.rdata.to_text()), rr)
    return tuple(found.values())


def _service_questions(records: RecordSet, index: int) -> list[Question]:
    svc = records.services[index]
    name = records.service_name(svc.namespace, svc.name)
    questions: list[Question] = [(name, t) for t in (*_ADDRESS_TYPES, dns.rdatatype.CNAME)]
    groups = records.groups(svc.namespace, svc.name)
    ports = svc.ports if svc.kind is ServiceKind.CLUSTER_IP else tuple(p for g in groups for p in g.ports)
    for port in dict.fromkeys(p for p in ports if p.name):
        srv = dns.name.Name((f"_{port.name}", f"_{port.protocol.lower()}")).concatenate(name)
        questions.append((srv, dns.rdatatype.SRV))
    labels = dict.fromkeys(address.label for group in groups for address in group.addresses)
    questions += [(dns.name.Name((label,)).concatenate(name), t) for label in labels for t in _ADDRESS_TYPES]
    return questions


def _all_ips(records: RecordSet) -> Iterator[str]:
    for svc in records.services:
        yield from svc.cluster_ips
    for group in records.endpoints:
        yield from (address.ip for address in group.addresses)


def _ip_order(ip: str) -> tuple[int, int]:
    address = ipaddress.ip_address(ip)
    return (address.version, int(address))


def zone_listings(records: RecordSet) -> tuple[ZoneListing, ...]:
    """The forward zone, then each reverse zone that has PTR records."""
    zone = records.zone
    apex = Block(
        f"zone {zone.to_text()} (Kubernetes DNS-Based Service Discovery, schema {SCHEMA_VERSION})",
        _answers(records, [(zone, dns.rdatatype.SOA)])
        + _answers(records, [(zone, dns.rdatatype.NS)], with_additional=True)
        + _answers(records, [(dns.name.Name(("dns-version",)).concatenate(zone), dns.rdatatype.TXT)]),
    )
    blocks = [apex]
    for i, svc in enumerate(records.services):
        found = _answers(records, _service_questions(records, i))
        if found:
            blocks.append(Block(f"Service {svc.namespace}/{svc.name} ({svc.kind.value})", found))
    listings = [ZoneListing(zone, tuple(blocks))]

    ips = sorted(set(_all_ips(records)), key=_ip_order)
    for reverse in REVERSE_ZONES:
        names = [dns.reversename.from_address(ip) for ip in ips]
        pointers = _answers(records, [(n, dns.rdatatype.PTR) for n in names if n.is_subdomain(reverse)])
        if pointers:
            head = _answers(records, [(reverse, dns.rdatatype.SOA)])
            head += _answers(records, [(reverse, dns.rdatatype.NS)], with_additional=True)
            listings.append(
                ZoneListing(reverse, (Block(f"zone {reverse.to_text()}", head), Block("pointer records", pointers)))
            )
    return tuple(listings)


def render_master_files(records: RecordSet) -> str:
    """All listings as master-file text: one `$ORIGIN` section per zone, absolute names."""
    sections = []
    for listing in zone_listings(records):
        lines = [f"$ORIGIN {listing.zone.to_text()}"]
        for block in listing.blocks:
            lines.append(f"; {block.title}")
            lines.extend(rr.to_text() for rr in block.records)
        sections.append("\n".join(lines) + "\n")
    return "\n".join(sections)
