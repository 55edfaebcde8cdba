"""DNS records (spec schema 1.1.0 as CoreDNS serves them): the record set, the resolver, the wire rules.

Everything here is pure: no sockets. The running server is tested in tests/kernel/test_dns_server.py.
"""

from __future__ import annotations

from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.reversename
import dns.zone
import pytest
from click.testing import CliRunner, Result

from kproxy_nft.cli import main
from kproxy_nft.discovery.load import load_record_set
from kproxy_nft.discovery.protocol import respond
from kproxy_nft.discovery.records import (
    NO_PORT,
    DnsService,
    EndpointAddress,
    EndpointGroup,
    Port,
    RecordOptions,
    RecordSet,
    ServiceKind,
    build_record_set,
    zone_name,
)
from kproxy_nft.discovery.resolver import Answer, address_from_reverse, lookup, srv_weight
from kproxy_nft.discovery.server import DnsServer, ManifestRecords, nameserver_ips, parse_listen
from kproxy_nft.discovery.zonefile import render_master_files, zone_listings
from tests.helpers import EXAMPLES, GOLDEN

TCP80 = Port("http", "TCP", 80)


def group(service: str, *addresses: EndpointAddress, ports: tuple[Port, ...] = (Port("http", "TCP", 8080),),
          namespace: str = "shop", name: str = "") -> EndpointGroup:  # fmt: skip
    return EndpointGroup(namespace, service, name or f"{service}-abc", addresses, ports)


def cluster(*objects: DnsService | EndpointGroup, **options: object) -> RecordSet:
    services = [o for o in objects if isinstance(o, DnsService)]
    groups = [o for o in objects if isinstance(o, EndpointGroup)]
    return build_record_set(services, groups, RecordOptions(**options))  # type: ignore[arg-type]


WEB = DnsService("shop", "web", ServiceKind.CLUSTER_IP, ("10.96.0.20",), (TCP80, Port("admin", "TCP", 9000)))
DUAL = DnsService("shop", "dual", ServiceKind.CLUSTER_IP, ("10.96.0.30", "fd00::30"), (TCP80,))
SINGLE = DnsService("shop", "single", ServiceKind.CLUSTER_IP, ("10.96.0.40",), (Port("", "TCP", 8000),))
DB = DnsService("shop", "db", ServiceKind.HEADLESS, (), (Port("pg", "TCP", 5432),))
DB_PODS = group(
    "db",
    EndpointAddress("10.1.0.5", "db-0"),
    EndpointAddress("10.1.0.6", "db-1"),
    EndpointAddress("10.1.0.7"),
    ports=(Port("pg", "TCP", 15432), Port("", "TCP", 9187)),
)
EMPTY = DnsService("shop", "empty", ServiceKind.HEADLESS)
V6 = DnsService("shop", "v6", ServiceKind.HEADLESS)
V6_PODS = group("v6", EndpointAddress("fd00::1:5"), ports=(NO_PORT,))
EXT = DnsService("shop", "upstream", ServiceKind.EXTERNAL_NAME, external_name="api.example.com")
ALIAS = DnsService("shop", "alias", ServiceKind.EXTERNAL_NAME, external_name="web.shop.svc.cluster.local")
WEB_PODS = group("web", EndpointAddress("10.1.0.8"), EndpointAddress("10.1.0.9"))
CLUSTER = cluster(WEB, DUAL, SINGLE, DB, DB_PODS, EMPTY, V6, V6_PODS, EXT, ALIAS, WEB_PODS)


def ask(name: str, rdtype: str = "A", records: RecordSet = CLUSTER) -> Answer:
    return lookup(records, dns.name.from_text(name), dns.rdatatype.from_text(rdtype))


def texts(answer: Answer, section: str = "answer") -> list[str]:
    """`TYPE rdata` of each record in a section (owner and TTL checked separately)."""
    return [f"{dns.rdatatype.to_text(rr.rdata.rdtype)} {rr.rdata.to_text()}" for rr in getattr(answer, section)]


def rcode(name: str, rdtype: str = "A") -> str:
    answer = ask(name, rdtype)
    if answer.rcode == dns.rcode.NOERROR and not answer.answer:
        return "NODATA"
    return dns.rcode.to_text(answer.rcode)


# ---------------------------------------------------------------------------------------------
# records, row by row
# ---------------------------------------------------------------------------------------------


def test_clusterip_service_has_an_address_record_per_cluster_ip() -> None:
    assert texts(ask("web.shop.svc.cluster.local")) == ["A 10.96.0.20"]
    assert texts(ask("dual.shop.svc.cluster.local")) == ["A 10.96.0.30"]
    assert texts(ask("dual.shop.svc.cluster.local", "AAAA")) == ["AAAA fd00::30"]
    assert rcode("web.shop.svc.cluster.local", "AAAA") == "NODATA"  # exists, no IPv6 address
    answer = ask("web.shop.svc.cluster.local")
    assert answer.answer[0].ttl == 5 and answer.rcode == dns.rcode.NOERROR and not answer.authority


def test_headless_service_has_a_record_per_ready_endpoint_and_per_hostname() -> None:
    assert texts(ask("db.shop.svc.cluster.local")) == ["A 10.1.0.5", "A 10.1.0.6", "A 10.1.0.7"]
    assert texts(ask("db-0.db.shop.svc.cluster.local")) == ["A 10.1.0.5"]
    assert texts(ask("10-1-0-7.db.shop.svc.cluster.local")) == ["A 10.1.0.7"]  # no hostname: the dashed IP
    assert texts(ask("v6.shop.svc.cluster.local", "AAAA")) == ["AAAA fd00::1:5"]
    assert texts(ask("fd00--1-5.v6.shop.svc.cluster.local", "AAAA")) == ["AAAA fd00::1:5"]
    assert rcode("db-9.db.shop.svc.cluster.local") == "NXDOMAIN"
    assert rcode("empty.shop.svc.cluster.local") == "NXDOMAIN"  # spec §2.4.1: no ready endpoints


def test_endpoint_names_of_clusterip_services_resolve_too() -> None:
    """CoreDNS answers `<endpoint>.<service>` for any Service with endpoints, so PTR targets resolve."""
    assert texts(ask("10-1-0-8.web.shop.svc.cluster.local")) == ["A 10.1.0.8"]


def test_srv_records_for_clusterip_services_use_the_service_port() -> None:
    answer = ask("_http._tcp.web.shop.svc.cluster.local", "SRV")
    assert texts(answer) == ["SRV 0 100 80 web.shop.svc.cluster.local."]
    assert texts(answer, "additional") == ["A 10.96.0.20"]
    assert answer.additional[0].name == dns.name.from_text("web.shop.svc.cluster.local")
    assert texts(ask("_admin._tcp.web.shop.svc.cluster.local", "SRV")) == ["SRV 0 100 9000 web.shop.svc.cluster.local."]
    assert rcode("_http._udp.web.shop.svc.cluster.local", "SRV") == "NXDOMAIN"
    assert rcode("_nope._tcp.web.shop.svc.cluster.local", "SRV") == "NXDOMAIN"


def test_srv_records_for_headless_services_use_the_endpoint_port_and_name() -> None:
    answer = ask("_pg._tcp.db.shop.svc.cluster.local", "SRV")
    assert texts(answer) == [
        "SRV 0 33 15432 db-0.db.shop.svc.cluster.local.",
        "SRV 0 33 15432 db-1.db.shop.svc.cluster.local.",
        "SRV 0 33 15432 10-1-0-7.db.shop.svc.cluster.local.",
    ]
    assert [rr.name.to_text() for rr in answer.additional] == [
        "db-0.db.shop.svc.cluster.local.",
        "db-1.db.shop.svc.cluster.local.",
        "10-1-0-7.db.shop.svc.cluster.local.",
    ]


def test_srv_weights_are_coredns_weights() -> None:
    assert [srv_weight(n) for n in (1, 2, 3, 4, 6, 7, 100, 101, 500)] == [100, 50, 33, 25, 16, 14, 1, 1, 1]
    # A dual-stack Service matches once per cluster IP: one SRV record (deduplicated), weight 50.
    assert texts(ask("_http._tcp.dual.shop.svc.cluster.local", "SRV")) == ["SRV 0 50 80 dual.shop.svc.cluster.local."]
    assert texts(ask("_http._tcp.dual.shop.svc.cluster.local", "SRV"), "additional") == [
        "A 10.96.0.30",
        "AAAA fd00::30",
    ]


def test_seed_srv_example_answers_as_in_the_notes() -> None:
    """notes 6.2.2: `dig _https-port._tcp.sample-clusterip-multi.default.svc.cluster.local SRV`."""
    records, _ = load_record_set([str(EXAMPLES)], RecordOptions())
    answer = ask("_https-port._tcp.sample-clusterip-multi.default.svc.cluster.local", "SRV", records)
    assert [rr.to_text() for rr in answer.answer] == [
        "_https-port._tcp.sample-clusterip-multi.default.svc.cluster.local.\t5\tIN\tSRV\t"
        "0 100 8443 sample-clusterip-multi.default.svc.cluster.local."
    ]
    assert [rr.to_text() for rr in answer.additional] == [
        "sample-clusterip-multi.default.svc.cluster.local.\t5\tIN\tA\t10.102.199.133"
    ]


def test_unnamed_ports_have_no_srv_name_but_the_service_name_answers_srv() -> None:
    assert texts(ask("single.shop.svc.cluster.local", "SRV")) == ["SRV 0 100 8000 single.shop.svc.cluster.local."]
    # At the Service name CoreDNS lists every port, the weight shared between them.
    assert texts(ask("web.shop.svc.cluster.local", "SRV")) == [
        "SRV 0 50 80 web.shop.svc.cluster.local.",
        "SRV 0 50 9000 web.shop.svc.cluster.local.",
    ]
    assert rcode("v6.shop.svc.cluster.local", "SRV") == "NODATA"  # a slice without ports: no SRV


def test_ptr_records_for_cluster_ips_and_endpoint_ips() -> None:
    assert texts(ask("20.0.96.10.in-addr.arpa", "PTR")) == ["PTR web.shop.svc.cluster.local."]
    assert texts(ask("5.0.1.10.in-addr.arpa", "PTR")) == ["PTR db-0.db.shop.svc.cluster.local."]
    assert texts(ask("8.0.1.10.in-addr.arpa", "PTR")) == ["PTR 10-1-0-8.web.shop.svc.cluster.local."]
    v6 = dns.reversename.from_address("fd00::1:5").to_text()
    assert texts(ask(v6, "PTR")) == ["PTR fd00--1-5.v6.shop.svc.cluster.local."]
    assert texts(ask(dns.reversename.from_address("fd00::30").to_text(), "PTR")) == ["PTR dual.shop.svc.cluster.local."]
    assert rcode("99.0.1.10.in-addr.arpa", "PTR") == "NXDOMAIN"
    assert rcode("0.1.10.in-addr.arpa", "PTR") == "NXDOMAIN"  # CoreDNS: a partial reverse name never parses
    assert rcode("web.shop.svc.cluster.local", "PTR") == "NODATA"
    assert address_from_reverse(dns.name.from_text("47.0.1.10.in-addr.arpa")) == "10.1.0.47"
    assert address_from_reverse(dns.name.from_text("047.0.1.10.in-addr.arpa")) is None


def test_external_name_is_a_cname() -> None:
    assert texts(ask("upstream.shop.svc.cluster.local", "CNAME")) == ["CNAME api.example.com."]
    # No upstream to follow it to: the CNAME alone, for the client's resolver to chase.
    assert texts(ask("upstream.shop.svc.cluster.local")) == ["CNAME api.example.com."]
    # Inside the zone the target is followed, as CoreDNS does.
    answer = ask("alias.shop.svc.cluster.local")
    assert texts(answer) == ["CNAME web.shop.svc.cluster.local.", "A 10.96.0.20"]
    assert answer.answer[1].name == dns.name.from_text("web.shop.svc.cluster.local")
    assert rcode("upstream.shop.svc.cluster.local", "SRV") == "NODATA"
    assert rcode("x.upstream.shop.svc.cluster.local") == "NXDOMAIN"
    assert rcode("web.shop.svc.cluster.local", "CNAME") == "NODATA"


def test_dns_version_and_soa_and_ns() -> None:
    answer = ask("dns-version.cluster.local", "TXT")
    assert texts(answer) == ['TXT "1.1.0"'] and answer.answer[0].ttl == 28800
    assert rcode("web.shop.svc.cluster.local", "TXT") == "NODATA"
    soa = ask("cluster.local", "SOA")
    assert texts(soa) == [f"SOA ns.dns.cluster.local. hostmaster.cluster.local. {CLUSTER.serial} 7200 1800 86400 5"]
    ns = ask("cluster.local", "NS")
    assert texts(ns) == ["NS ns.dns.cluster.local."] and texts(ns, "additional") == ["A 127.0.0.1"]
    assert texts(ask("ns.dns.cluster.local")) == ["A 127.0.0.1"]


def test_ns_names_the_service_whose_endpoint_we_are() -> None:
    """Listening on a kube-dns endpoint, the NS record names kube-dns (CoreDNS `nsAddrs`)."""
    kube_dns = DnsService("kube-system", "kube-dns", ServiceKind.CLUSTER_IP, ("10.96.0.10",), (Port("dns", "UDP", 53),))
    pod = group("kube-dns", EndpointAddress("10.1.0.2"), namespace="kube-system")
    answer = ask("cluster.local", "NS", cluster(kube_dns, pod, nameservers=("10.1.0.2",)))
    assert texts(answer) == ["NS kube-dns.kube-system.svc.cluster.local."]
    assert texts(answer, "additional") == ["A 10.96.0.10"]


@pytest.mark.parametrize(
    ("name", "rdtype", "expected"),
    [
        ("cluster.local", "A", "NODATA"),  # the apex
        ("svc.cluster.local", "A", "NODATA"),
        ("pod.cluster.local", "A", "NODATA"),
        ("shop.svc.cluster.local", "A", "NODATA"),  # a namespace with Services
        ("kube-system.svc.cluster.local", "A", "NODATA"),  # a namespace every cluster has
        ("nowhere.svc.cluster.local", "A", "NXDOMAIN"),  # a namespace nobody knows
        ("nope.shop.svc.cluster.local", "A", "NXDOMAIN"),
        ("web.shop.svc.cluster.local", "MX", "NODATA"),
        ("web.shop.svc.cluster.local", "ANY", "NODATA"),
        ("nope.shop.svc.cluster.local", "MX", "NXDOMAIN"),
        ("nope.shop.svc.cluster.local", "TXT", "NODATA"),  # CoreDNS: TXT is never NXDOMAIN
        ("nope.shop.svc.cluster.local", "NS", "NODATA"),  # nor NS
        ("a.b.c.web.shop.svc.cluster.local", "A", "NXDOMAIN"),  # too long
        ("web.shop.nope.cluster.local", "A", "NXDOMAIN"),  # neither svc nor pod
        ("10-1-0-8.shop.pod.cluster.local", "A", "NXDOMAIN"),  # pod records disabled (CoreDNS default)
        ("dns.cluster.local", "A", "NXDOMAIN"),
        ("_http._tcp.web.shop.svc.cluster.local", "A", "NOERROR"),  # CoreDNS: addresses at an SRV name
        ("http.tcp.web.shop.svc.cluster.local", "SRV", "NOERROR"),  # underscores are optional
        ("_._tcp.web.shop.svc.cluster.local", "SRV", "NOERROR"),  # an empty port matches any
        ("WEB.Shop.SVC.cluster.LOCAL", "A", "NOERROR"),  # case-insensitive
        ("20.0.96.10.in-addr.arpa", "A", "NXDOMAIN"),  # CoreDNS: only PTR at reverse names
        ("example.com", "A", "REFUSED"),  # not our zone: no upstream here
        ("cluster.local", "AXFR", "REFUSED"),  # no zone transfers
    ],
)
def test_nxdomain_versus_nodata_as_coredns(name: str, rdtype: str, expected: str) -> None:
    assert rcode(name, rdtype) == expected


def test_negative_answers_carry_the_soa_in_authority() -> None:
    for name in ("nope.shop.svc.cluster.local", "shop.svc.cluster.local", "99.0.1.10.in-addr.arpa"):
        answer = ask(name, "PTR" if "arpa" in name else "A")
        assert not answer.answer and len(answer.authority) == 1
        soa = answer.authority[0]
        assert soa.rdata.rdtype == dns.rdatatype.SOA and soa.ttl == 5
        assert soa.name == (dns.name.from_text("in-addr.arpa") if "arpa" in name else CLUSTER.zone)
    assert ask("example.com").authority == ()


def test_answers_keep_the_case_the_client_used() -> None:
    answer = ask("WEB.shop.svc.Cluster.Local")
    assert answer.answer[0].name.to_text() == "WEB.shop.svc.Cluster.Local."
    assert ask("nope.shop.svc.Cluster.Local").authority[0].name.to_text() == "Cluster.Local."


def test_other_zones_and_ttls() -> None:
    records = cluster(WEB, zone="corp.example", ttl=30)
    assert texts(ask("web.shop.svc.corp.example", records=records)) == ["A 10.96.0.20"]
    assert ask("web.shop.svc.corp.example", records=records).answer[0].ttl == 30
    assert rcode("web.shop.svc.cluster.local") == "NOERROR"
    assert lookup(records, dns.name.from_text("web.shop.svc.cluster.local"), dns.rdatatype.A).rcode == dns.rcode.REFUSED
    assert ask("nope.svc.corp.example", records=records).authority[0].ttl == 30  # min(300, ttl)
    with pytest.raises(ValueError, match="reverse zone"):
        zone_name("in-addr.arpa")
    assert zone_name("Cluster.Local.") == dns.name.from_text("cluster.local")


# ---------------------------------------------------------------------------------------------
# the record set from manifests
# ---------------------------------------------------------------------------------------------

HEADLESS_YAML = """\
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: None
  ports: [{name: pg, port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-x1
  namespace: shop
  labels: {kubernetes.io/service-name: db}
addressType: IPv4
ports: [{name: pg, port: 5432, protocol: TCP}]
endpoints:
- {addresses: [10.1.0.5], hostname: db-0, conditions: {ready: true}}
- {addresses: [10.1.0.6], hostname: db-1, conditions: {ready: false}}
- {addresses: [10.1.0.7]}
"""


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_manifests_become_a_record_set(tmp_path: Path) -> None:
    records, _ = load_record_set([str(write(tmp_path, HEADLESS_YAML))], RecordOptions())
    # Not ready is left out; `ready` unset counts as ready (CoreDNS `endpointsliceReady`).
    assert texts(ask("db.shop.svc.cluster.local", records=records)) == ["A 10.1.0.5", "A 10.1.0.7"]
    assert ask("db-1.db.shop.svc.cluster.local", records=records).rcode == dns.rcode.NXDOMAIN
    assert texts(ask("_pg._tcp.db.shop.svc.cluster.local", "SRV", records)) == [
        "SRV 0 50 5432 db-0.db.shop.svc.cluster.local.",
        "SRV 0 50 5432 10-1-0-7.db.shop.svc.cluster.local.",
    ]


def test_serial_depends_on_content_only(tmp_path: Path) -> None:
    one, _ = load_record_set([str(write(tmp_path, HEADLESS_YAML))], RecordOptions())
    again, _ = load_record_set([str(tmp_path / "m.yaml")], RecordOptions())
    other, _ = load_record_set([str(write(tmp_path, HEADLESS_YAML.replace("10.1.0.7", "10.1.0.8")))], RecordOptions())
    assert one.serial == again.serial != other.serial


def dns_cli(*args: str) -> Result:
    return CliRunner().invoke(main, ["dns", *args])


@pytest.mark.parametrize(
    ("replace", "message"),
    [
        (("clusterIP: None", "type: ExternalName"), "m.yaml: Service shop/db: spec.externalName: required"),
        (("hostname: db-0", "hostname: DB_0"),
         "m.yaml: document 2 (EndpointSlice shop/db-x1): endpoints[0].hostname: 'DB_0'"),
        (("port: 5432}]\n---", "port: 0}]\n---"), "m.yaml: document 1 (Service shop/db): spec.ports[0].port"),
    ],
)
def test_bad_input_is_one_line_naming_file_and_field(tmp_path: Path, replace: tuple[str, str], message: str) -> None:
    path = write(tmp_path, HEADLESS_YAML.replace(*replace))
    for command in ("records", "serve"):
        result = dns_cli(command, "-f", str(path))
        assert result.exit_code == 2, result.output
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_bad_options_exit_2() -> None:
    assert dns_cli("serve", "-f", str(EXAMPLES), "--listen", "localhost").exit_code == 2
    assert "--listen" in dns_cli("serve", "-f", str(EXAMPLES), "--listen", "1.2.3.4:99999").stderr
    assert dns_cli("records", "-f", str(EXAMPLES), "--zone", "a..b").exit_code == 2
    assert dns_cli("records", "-f", str(EXAMPLES), "--ns-ip", "nope").exit_code == 2


# ---------------------------------------------------------------------------------------------
# the zone listing
# ---------------------------------------------------------------------------------------------


def test_golden_zone_of_the_seed() -> None:
    result = dns_cli("records", "-f", str(EXAMPLES))
    assert result.exit_code == 0, result.output
    assert result.stdout == (GOLDEN / "examples.zone").read_text()


def test_listing_is_valid_master_files_answered_by_the_server() -> None:
    """Each section loads as a zone, and every listed record is what a query returns."""
    text = render_master_files(CLUSTER)
    for section, listing in zip(text.split("\n\n"), zone_listings(CLUSTER), strict=True):
        zone = dns.zone.from_text(section, origin=listing.zone, relativize=False, check_origin=True)
        assert zone.origin == listing.zone
        for rr in listing.records:
            answer = lookup(CLUSTER, rr.name, rr.rdata.rdtype)
            assert rr.rdata in [a.rdata for a in answer.answer + answer.additional], rr.to_text()
    listed = {rr.to_text() for listing in zone_listings(CLUSTER) for rr in listing.records}
    assert "_pg._tcp.db.shop.svc.cluster.local.\t5\tIN\tSRV\t0 33 15432 db-0.db.shop.svc.cluster.local." in listed
    assert "upstream.shop.svc.cluster.local.\t5\tIN\tCNAME\tapi.example.com." in listed
    assert not [r for r in listed if "empty.shop" in r]
    zones = [listing.zone.to_text() for listing in zone_listings(CLUSTER)]
    assert zones == ["cluster.local.", "in-addr.arpa.", "ip6.arpa."]


# ---------------------------------------------------------------------------------------------
# the wire rules
# ---------------------------------------------------------------------------------------------


def reply(query: dns.message.Message, transport: str = "udp", records: RecordSet = CLUSTER) -> dns.message.Message:
    wire = respond(query.to_wire(), records, transport)  # type: ignore[arg-type]
    assert wire is not None
    return dns.message.from_wire(wire)


BIG = cluster(
    DnsService("shop", "big", ServiceKind.HEADLESS),
    group("big", *(EndpointAddress(f"10.2.0.{i + 1}") for i in range(120)), ports=(NO_PORT,)),
)


def test_flags_authoritative_no_recursion() -> None:
    response = reply(dns.message.make_query("web.shop.svc.cluster.local", "A"))
    assert response.flags & dns.flags.AA and response.flags & dns.flags.QR
    assert response.flags & dns.flags.RD and not response.flags & dns.flags.RA
    assert response.edns < 0  # no EDNS asked, none given
    query = dns.message.make_query("web.shop.svc.cluster.local", "A")
    query.flags &= ~dns.flags.RD
    assert not reply(query).flags & dns.flags.RD


def test_edns_is_echoed() -> None:
    query = dns.message.make_query("web.shop.svc.cluster.local", "A", use_edns=0, payload=1400, want_dnssec=True)
    response = reply(query)
    assert response.edns == 0 and response.payload == 1400 and response.ednsflags & dns.flags.DO
    assert response.options == ()
    bad = dns.message.make_query("web.shop.svc.cluster.local", "A", use_edns=1)
    assert reply(bad).rcode() == dns.rcode.BADVERS and not reply(bad).answer


def test_large_answers_are_truncated_over_udp_only() -> None:
    query = dns.message.make_query("big.shop.svc.cluster.local", "A")
    small = reply(query, records=BIG)
    assert small.flags & dns.flags.TC and len(small.to_wire()) <= 512
    assert 0 < len(small.answer[0]) < 120
    edns = reply(dns.message.make_query("big.shop.svc.cluster.local", "A", use_edns=0, payload=1232), records=BIG)
    assert edns.flags & dns.flags.TC and len(edns.to_wire()) <= 1232 and len(edns.answer[0]) > len(small.answer[0])
    full = reply(query, "tcp", records=BIG)
    assert not full.flags & dns.flags.TC and len(full.answer[0]) == 120
    roomy = reply(dns.message.make_query("big.shop.svc.cluster.local", "A", use_edns=0, payload=4096), records=BIG)
    assert not roomy.flags & dns.flags.TC and len(roomy.answer[0]) == 120


def test_malformed_messages_are_dropped_and_odd_ones_refused() -> None:
    good = dns.message.make_query("web.shop.svc.cluster.local", "A").to_wire()
    for junk in (b"", b"\x00", b"\xff" * 11, good[:20], good + b"\x00\x01", b"\x12\x34" + b"\x00" * 10 + b"\xc0"):
        assert respond(junk, CLUSTER, "udp") is None, junk
    response = dns.message.make_response(dns.message.make_query("web.shop.svc.cluster.local", "A"))
    assert respond(response.to_wire(), CLUSTER, "udp") is None  # a response: never answered
    notify = dns.message.make_query("cluster.local", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    assert reply(notify).rcode() == dns.rcode.NOTIMP
    empty = dns.message.Message()
    assert reply(empty).rcode() == dns.rcode.FORMERR


# ---------------------------------------------------------------------------------------------
# the server's pure helpers: listen addresses and the manifest provider
# ---------------------------------------------------------------------------------------------


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_listen("[::1]:53") == ("::1", 53)
    for bad in ("5353", "::1:53", "localhost:53", "1.2.3.4:x", "1.2.3.4:70000", ":53"):
        with pytest.raises(ValueError):
            parse_listen(bad)
    assert nameserver_ips("0.0.0.0") == ("127.0.0.1",) and nameserver_ips("10.96.0.10") == ("10.96.0.10",)


def test_manifest_provider_reloads_on_change_and_keeps_the_last_good_set(tmp_path: Path) -> None:
    path = write(tmp_path, HEADLESS_YAML)
    source = ManifestRecords([str(tmp_path)], RecordOptions())
    first = source()
    assert source.refresh() is None and source() is first
    write(tmp_path, HEADLESS_YAML.replace("10.1.0.7", "10.1.0.77"))
    assert "reloaded" in (source.refresh() or "")
    assert texts(ask("10-1-0-77.db.shop.svc.cluster.local", records=source())) == ["A 10.1.0.77"]
    path.write_text("{{ not yaml")
    message = source.refresh() or ""
    assert message.startswith("reload failed, still serving the previous records: ") and "m.yaml" in message
    assert texts(ask("10-1-0-77.db.shop.svc.cluster.local", records=source())) == ["A 10.1.0.77"]
    write(tmp_path, HEADLESS_YAML, "more.yaml")  # a new file in the directory counts as a change
    path.unlink()
    assert "reloaded" in (source.refresh() or "") and source.reloads == 2


def test_server_replies_follow_the_provider_and_keep_each_query_id() -> None:
    """The server's memo of replies never leaks one query's ID or an old record set into a reply."""
    current = [CLUSTER]
    server = DnsServer(lambda: current[0], "127.0.0.1", 0)  # not started: no socket is opened
    query = dns.message.make_query("web.shop.svc.cluster.local", "A")
    for query_id in (1, 2, 1):
        query.id = query_id
        wire = server.handle(query.to_wire(), "udp")
        assert wire is not None and dns.message.from_wire(wire).id == query_id
        assert [rr.to_text() for rr in dns.message.from_wire(wire).answer] == [
            "web.shop.svc.cluster.local. 5 IN A 10.96.0.20"
        ]
    current[0] = cluster(DnsService("shop", "web", ServiceKind.CLUSTER_IP, ("10.96.0.21",), (TCP80,)))
    wire = server.handle(query.to_wire(), "udp")
    assert wire is not None and [rr.to_text() for rr in dns.message.from_wire(wire).answer] == [
        "web.shop.svc.cluster.local. 5 IN A 10.96.0.21"
    ]
    assert server.handle(b"junk", "udp") is None and server.handle(b"junk", "udp") is None
    assert server.stats.dropped == 2 and server.stats.errors == 0
    current[0] = None  # type: ignore[list-item]  # a broken provider: logged, dropped, never raised
    assert server.handle(query.to_wire(), "udp") is None and server.stats.errors == 1
