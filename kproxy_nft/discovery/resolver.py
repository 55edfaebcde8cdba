"""Answer one DNS question from a `RecordSet` the way CoreDNS's `kubernetes` plugin does.

`lookup(records, qname, qtype)` is a pure function returning an `Answer` (rcode and the
three sections). It follows the structure of CoreDNS (`plugin/kubernetes/handler.go`,
`kubernetes.go`, `parse.go`, `reverse.go` and `plugin/backend_lookup.go`) closely, because
"which names exist" in cluster DNS is defined by that code rather than by a static zone:

* Names parse as `[_port._proto.|endpoint.]service.namespace.svc.<zone>`; anything longer,
  or not ending in `svc`/`pod`, is NXDOMAIN. Ports and protocols match case-insensitively
  and an empty one (`_._tcp`) matches any; underscores are optional, as in CoreDNS.
* `<zone>`, `svc.<zone>`, `pod.<zone>` and an existing namespace `<ns>.svc.<zone>` are
  NODATA; an unknown namespace or Service, or a headless Service without ready endpoints,
  is NXDOMAIN (spec §2.4.1). Pod records (`pods disabled`, CoreDNS's default) are NXDOMAIN.
* A/AAAA at a Service name: every cluster IP of the family, or every ready endpoint of a
  headless Service; at `<endpoint>.<service>...` (any Service type, as CoreDNS answers it)
  the addresses of endpoints with that hostname; at an SRV name, the addresses too.
* SRV: one record per matching (port, address), target the Service name (ClusterIP) or the
  endpoint name (headless), priority 0, weight `floor(100 / n)` over the n matches
  (CoreDNS's weight loop), A/AAAA of the targets in the additional section.
* PTR for cluster IPs and ready endpoint IPs; CNAME for ExternalName Services (followed
  inside the zone; outside it there is no upstream here, so the CNAME alone is returned,
  which is what CoreDNS answers when its upstream has nothing).
* TXT answers `dns-version` and is NODATA for every other name, SOA queries get the zone's
  SOA, NS at the apex names `ns.dns.<zone>`; other types are NODATA or NXDOMAIN after the
  same name checks. Negative answers carry the zone's SOA in the authority section.

Queries outside the served zones are REFUSED: this server has no upstream to forward to.
"""

from __future__ import annotations

import functools
import ipaddress
import math
from collections.abc import Sequence
from dataclasses import dataclass

import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype

from kproxy_nft.discovery.records import (
    NO_PORT,
    REVERSE_ZONES,
    SCHEMA_TTL,
    SCHEMA_VERSION,
    DnsService,
    RecordSet,
    ServiceKind,
    is_ip,
)

IN = dns.rdataclass.IN
A, AAAA, CNAME, NS, PTR, SOA, SRV, TXT = (
    dns.rdatatype.A,
    dns.rdatatype.AAAA,
    dns.rdatatype.CNAME,
    dns.rdatatype.NS,
    dns.rdatatype.PTR,
    dns.rdatatype.SOA,
    dns.rdatatype.SRV,
    dns.rdatatype.TXT,
)
_MAX_CNAME_CHAIN = 7  # backend_lookup.go stops following CNAMEs after this many
_NS_LABELS = ("ns", "dns")  # CoreDNS's name server name: ns.dns.<zone>


@dataclass(frozen=True)
class RR:
    """One resource record of an answer."""

    name: dns.name.Name
    ttl: int
    rdata: dns.rdata.Rdata

    def to_text(self) -> str:
        """The record as one master-file line (absolute names, tab separated)."""
        rdtype = dns.rdatatype.to_text(self.rdata.rdtype)
        return f"{self.name.to_text()}\t{self.ttl}\tIN\t{rdtype}\t{self.rdata.to_text()}"


@dataclass(frozen=True)
class Answer:
    """The response to one question: rcode and the answer, authority and additional sections."""

    rcode: dns.rcode.Rcode
    answer: tuple[RR, ...] = ()
    authority: tuple[RR, ...] = ()
    additional: tuple[RR, ...] = ()


class _NameError(Exception):
    """The queried name does not exist (CoreDNS's errNoItems / errNsNotExposed / errInvalidRequest)."""


@dataclass(frozen=True)
class _Hit:
    """One match of a lookup (CoreDNS's `msg.Service`): an address or name, and where it lives."""

    host: str  # an IP, or a domain name for ExternalName, or "" for text
    target: dns.name.Name  # the owner name an SRV/NS answer points at (msg.Domain(Key))
    port: int = NO_PORT.number
    text: str = ""
    ttl: int = 0

    @property
    def rdtype(self) -> dns.rdatatype.RdataType:
        """What this hit turns into: A, AAAA, TXT or CNAME (`msg.Service.HostType`)."""
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            return TXT if self.text else CNAME
        return A if ip.version == 4 else AAAA


@dataclass(frozen=True)
class _Query:
    records: RecordSet
    qname: dns.name.Name
    qtype: int
    zone: dns.name.Name  # the matched zone, spelled as the client spelled it

    @property
    def reverse(self) -> bool:
        return self.zone in REVERSE_ZONES


def lookup(records: RecordSet, qname: dns.name.Name, qtype: int, qclass: int = IN) -> Answer:
    """Answer `qname`/`qtype` from `records` (NOERROR, NODATA, NXDOMAIN or REFUSED)."""
    zone = _matching_zone(records, qname)
    if zone is None or qclass != IN or qtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR):
        return Answer(dns.rcode.REFUSED)  # not ours; zone transfers are not offered
    q = _Query(records, qname, qtype, zone)
    soa = _soa(q)
    extra: list[RR] = []
    try:
        if q.qtype in (A, AAAA):
            answer = _addresses(q, qname, q.qtype, ())
        elif q.qtype == TXT:
            answer = [_rr(q.qname, hit.ttl, TXT, hit.text) for hit in _services(q, qname)]
        elif q.qtype == CNAME:
            hits = _services(q, qname)
            first = hits[0] if hits else None  # CoreDNS looks at the first match only
            answer = [_rr(qname, first.ttl, CNAME, _fqdn(first.host))] if first and first.rdtype == CNAME else []
        elif q.qtype == PTR:
            answer = _pointers(q)
        elif q.qtype == SRV:
            answer, extra = _srv(q)
        elif q.qtype == SOA:
            answer = [soa]
        elif q.qtype == NS and qname == zone:
            answer, extra = _name_servers(q)
        else:
            # handler.go: "Do a fake A lookup, so we can distinguish between NODATA and NXDOMAIN".
            _addresses(q, qname, A, ())
            answer = []
    except _NameError:
        return Answer(dns.rcode.NXDOMAIN, authority=(soa,))
    if not answer:
        return Answer(dns.rcode.NOERROR, authority=(soa,))
    return Answer(dns.rcode.NOERROR, tuple(answer), (), tuple(extra))


# ---------------------------------------------------------------------------------------------
# name → matches (CoreDNS Kubernetes.Services / Records / findServices)
# ---------------------------------------------------------------------------------------------


def _matching_zone(records: RecordSet, qname: dns.name.Name) -> dns.name.Name | None:
    """The longest served zone containing qname, in the client's spelling (CoreDNS keeps its case)."""
    zones = [z for z in records.zones if qname.is_subdomain(z)]
    if not zones:
        return None
    depth = max(len(z) for z in zones)
    return dns.name.Name(qname.labels[-depth:])


def _relative(name: dns.name.Name, zone: dns.name.Name) -> list[str]:
    """The labels of `name` below `zone`, lower-cased (CoreDNS compares case-insensitively)."""
    return [label.decode("latin-1").lower() for label in name.relativize(zone).labels]


def _services(q: _Query, name: dns.name.Name, qtype: int | None = None) -> list[_Hit]:
    """What `name` refers to for `qtype` (default: the query's type); raises _NameError."""
    qtype = q.qtype if qtype is None else qtype
    labels = _relative(name, q.zone)
    if qtype == TXT:
        # Only `dns-version.<zone>` has text; every other TXT question is NODATA, never NXDOMAIN.
        if labels == ["dns-version"]:
            return [_Hit("", name, text=SCHEMA_VERSION, ttl=SCHEMA_TTL)]
        return []
    if qtype == NS:
        return _ns_hits(q)  # CoreDNS answers this for any name: NS is never NXDOMAIN
    if labels == list(_NS_LABELS):
        return [hit for hit in _ns_hits(q) if hit.rdtype == qtype]  # `isDefaultNS`: ns.dns.<zone> A/AAAA
    hits = _records(q, labels)
    if qtype == SRV:
        hits = [hit for hit in hits if hit.rdtype != CNAME]  # "SRV for external services is not yet implemented"
    return hits


def _records(q: _Query, labels: list[str]) -> list[_Hit]:
    """CoreDNS `parseRequest` + `Records` + `findServices` for the labels below the zone."""
    if labels in ([], ["svc"], ["pod"]):
        return []  # the apex, svc.<zone> and pod.<zone> exist and hold nothing: NODATA
    *rest, kind = labels
    if kind not in ("svc", "pod"):
        raise _NameError
    namespace = rest.pop() if rest else ""
    service = rest.pop() if rest else ""
    endpoint = port = protocol = ""
    if len(rest) == 1:
        endpoint = rest[0]
    elif len(rest) == 2:
        port, protocol = (label.removeprefix("_") for label in rest)
    elif rest:
        raise _NameError  # "a query that is too long to answer"
    if q.reverse or namespace not in q.records.namespaces or kind == "pod":
        raise _NameError  # reverse names never parse; pod records are disabled (CoreDNS's default)
    if not service:
        return []  # an existing namespace: NODATA
    svc = q.records.service(namespace, service)
    if svc is None:
        raise _NameError
    hits = _service_hits(q, svc, endpoint, port, protocol)
    if hits is None:
        raise _NameError
    return hits


def _port_matches(want_port: str, want_protocol: str, name: str, protocol: str) -> bool:
    """CoreDNS `matchPortAndProtocol`: case-insensitive, an empty wanted value matches anything."""
    return (not want_port or want_port == name.lower()) and (not want_protocol or want_protocol == protocol.lower())


def _service_hits(q: _Query, svc: DnsService, endpoint: str, port: str, protocol: str) -> list[_Hit] | None:
    """The matches in one Service, or None when nothing matched (NXDOMAIN)."""
    records, ttl = q.records, q.records.ttl
    base = records.service_name(svc.namespace, svc.name, q.zone)
    if svc.kind is ServiceKind.EXTERNAL_NAME:
        # Ports are not checked: `_x._tcp.<extname svc>` is the same CNAME. An endpoint label or
        # an IP-valued externalName gives nothing.
        if endpoint or is_ip(svc.external_name):
            return None
        return [_Hit(svc.external_name, base, ttl=ttl)]
    if svc.kind is ServiceKind.HEADLESS or endpoint:
        hits = [
            _Hit(address.ip, dns.name.Name((address.label,)).concatenate(base), p.number, ttl=ttl)
            for group in records.groups(svc.namespace, svc.name)
            for address in group.addresses
            if not endpoint or endpoint == address.label.lower()
            for p in group.ports
            if _port_matches(port, protocol, p.name, p.protocol)
        ]
        return hits or None
    matched = [p for p in svc.ports or (NO_PORT,) if _port_matches(port, protocol, p.name, p.protocol)]
    if not matched:
        return None
    return [_Hit(ip, base, p.number, ttl=ttl) for p in matched for ip in svc.cluster_ips]


def _ns_hits(q: _Query) -> list[_Hit]:
    """CoreDNS `nsAddrs`: the Service whose endpoint is one of our addresses, else ns.dns.<zone>."""
    records, ttl = q.records, q.records.ttl
    hits: list[_Hit] = []
    for ip in records.nameservers:
        for group in records.groups_with_address(ip):
            svc = records.service(group.namespace, group.service)
            if svc is None or svc.kind is ServiceKind.EXTERNAL_NAME:
                continue
            base = records.service_name(svc.namespace, svc.name, q.zone)
            if svc.kind is ServiceKind.HEADLESS:
                hits.extend(
                    _Hit(a.ip, dns.name.Name((a.label,)).concatenate(base), ttl=ttl) for a in group.addresses
                )
            elif svc.cluster_ips:
                hits.append(_Hit(svc.cluster_ips[0], base, ttl=ttl))
    if not hits:
        own = dns.name.Name(_NS_LABELS).concatenate(q.zone)
        hits = [_Hit(ip, own, ttl=ttl) for ip in records.nameservers]
    return hits


# ---------------------------------------------------------------------------------------------
# matches → records (CoreDNS plugin/backend_lookup.go)
# ---------------------------------------------------------------------------------------------


def _addresses(q: _Query, name: dns.name.Name, rdtype: int, chain: tuple[RR, ...]) -> list[RR]:
    """plugin.A / plugin.AAAA: address records for `name`, following in-zone CNAMEs."""
    records: list[RR] = []
    seen: set[str] = set()
    for hit in _services(q, name):
        kind = hit.rdtype
        if kind == CNAME:
            target = dns.name.from_text(_fqdn(hit.host))
            if target == name or len(chain) > _MAX_CNAME_CHAIN:
                continue  # "x CNAME x is a direct loop"
            cname = _rr(name, hit.ttl, CNAME, target.to_text())
            if any(rr.rdata == cname.rdata for rr in chain):
                continue
            if not target.is_subdomain(q.zone):
                records.append(cname)  # no upstream to ask: the CNAME alone
                continue
            try:
                followed = _addresses(q, target, rdtype, (*chain, cname))
            except _NameError:
                continue
            if followed:
                records.extend((cname, *followed))
        elif kind == rdtype and hit.host not in seen:
            seen.add(hit.host)
            records.append(_rr(name, hit.ttl, rdtype, hit.host))
    return records


def srv_weight(matches: int) -> int:
    """CoreDNS's SRV weight when `matches` records share priority 0 (each counted as weight 100).

    `w1 := 100.0 / float64(100*n); w1 *= 100; weight := uint16(math.Floor(w1))`, at least 1:
    the same float64 arithmetic, so 1 match gives 100, 3 give 33, 7 give 14 and 200 give 1.
    """
    return max(1, math.floor(100.0 / float(100 * matches) * 100))


def _srv(q: _Query) -> tuple[list[RR], list[RR]]:
    hits = _services(q, q.qname)
    weight = srv_weight(len(hits)) if hits else 0
    records: list[RR] = []
    extra: list[RR] = []
    seen: set[tuple[dns.name.Name, int | str]] = set()
    for hit in hits:
        if hit.port == NO_PORT.number:
            continue
        if (hit.target, hit.port) not in seen:
            seen.add((hit.target, hit.port))
            records.append(_rr(q.qname, hit.ttl, SRV, f"0 {weight} {hit.port} {hit.target.to_text()}"))
        if (hit.target, hit.host) not in seen:
            seen.add((hit.target, hit.host))
            extra.append(_rr(hit.target, hit.ttl, hit.rdtype, hit.host))
    return records, extra


def _pointers(q: _Query) -> list[RR]:
    """plugin.PTR via `Kubernetes.Reverse`."""
    ip = address_from_reverse(q.qname)
    if ip is None:
        _records(q, _relative(q.qname, q.zone))  # a forward name: NODATA if it exists
        return []
    targets = q.records.ptr_targets(ip)
    if not targets:
        raise _NameError
    return [_rr(q.qname, q.records.ttl, PTR, target.to_text()) for target in targets]


def _name_servers(q: _Query) -> tuple[list[RR], list[RR]]:
    records: list[RR] = []
    extra: list[RR] = []
    for hit in _ns_hits(q):
        extra.append(_rr(hit.target, hit.ttl, hit.rdtype, hit.host))
        ns = _rr(q.qname, hit.ttl, NS, hit.target.to_text())
        if ns not in records:
            records.append(ns)
    return records, extra


def _soa(q: _Query) -> RR:
    """CoreDNS `plugin.SOA`: TTL min(300, ttl), ns.dns/hostmaster names, fixed timers."""
    ttl = q.records.ttl
    mname = dns.name.Name(_NS_LABELS).concatenate(q.zone)
    rname = dns.name.Name(("hostmaster",)).concatenate(q.zone)
    text = f"{mname.to_text()} {rname.to_text()} {q.records.serial} 7200 1800 86400 {ttl}"
    return _rr(q.zone, min(300, ttl), SOA, text)


def _rr(name: dns.name.Name, ttl: int, rdtype: int, text: str) -> RR:
    if rdtype == TXT:
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return RR(name, ttl, _rdata(rdtype, text))


@functools.lru_cache(maxsize=1 << 16)
def _rdata(rdtype: int, text: str) -> dns.rdata.Rdata:
    """Parsed rdata, memoized: parsing text is most of the cost of an answer, and rdata is immutable."""
    return dns.rdata.from_text(IN, dns.rdatatype.RdataType.make(rdtype), text)


def _fqdn(host: str) -> str:
    """An ExternalName as an absolute name (`dns.Fqdn`)."""
    return host if host.endswith(".") else host + "."


def address_from_reverse(name: dns.name.Name) -> str | None:
    """The IP a reverse name stands for, or None (CoreDNS `dnsutil.ExtractAddressFromReverse`)."""
    labels = [label.decode("latin-1") for label in name.labels[:-1]]
    text = ".".join(labels).lower() + "."
    for zone, join in ((REVERSE_ZONES[0], _join_v4), (REVERSE_ZONES[1], _join_v6)):
        suffix = "." + zone.to_text()
        if text.endswith(suffix):
            try:
                return str(ipaddress.ip_address(join(text[: -len(suffix)].split(".")[::-1])))
            except ValueError:
                return None
    return None


def _join_v4(labels: Sequence[str]) -> str:
    text = ".".join(labels)
    if not all(label.isdigit() for label in labels):
        raise ValueError(text)
    return text


def _join_v6(nibbles: Sequence[str]) -> str:
    # Go's reverse6 joins groups of four labels with ':' and ignores a trailing remainder.
    return ":".join("".join(nibbles[i * 4 : i * 4 + 4]) for i in range(len(nibbles) // 4))
