"""Hypothesis strategies for hostile manifests: valid objects first, then broken on purpose.

The promise under test (tests/test_fuzz_manifests.py, tests/kernel/test_fuzz_load.py): whatever a
manifest file holds, reading it ends in one clean `ManifestError` line, or in rules the kernel
loads. So the strategies here build *valid* clusters of every kind the proxy reads (Service of
every type, EndpointSlice, legacy Endpoints, ServiceCIDR, `kind: List`) and then break them in
three layers:

1. objects: a field replaced with a hostile value chosen by what the field held (an address
   gets special, non-canonical, wrong-family or zoned addresses, an integer huge, negative,
   unicode-digit or wrongly typed numbers, a string a line break, zone or injection after it,
   anything control characters, unicode, wrong types), a field dropped, a list entry
   duplicated, a hostile key added to a mapping. `mutated_documents` does one to three such
   edits anywhere in a cluster; `one_field_attacked` and `one_string_affixed` one edit in a
   small Service and its partner, so that every field is hit often;
2. syntax (`Raw`): scalars the YAML/JSON dumpers cannot write but a file can hold (integers of
   thousands of digits, nesting hundreds deep, YAML tags and aliases, NaN, lone surrogates);
3. bytes (`corrupted`): the rendered file cut short, with bytes inserted, invalid UTF-8, a BOM,
   another encoding.

The valid objects draw addresses and ports from small pools, so that services collide on the
same cluster IP, node port or external IP, and from the odd corners validation lets through
(multicast external IPs, broadcast endpoints, overlapping source ranges): those reach the
compilers and must still load.

`dump_outputs` is what `kproxy-nft dump` prints for a state (both iptables families and the
nftables script), shared by the fast and the kernel tests. Not a test module: no assertions.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from hypothesis import currently_in_test_context, event
from hypothesis import strategies as st

from kproxy_nft.compile import iptables as ipt
from kproxy_nft.compile import nftables as nft
from kproxy_nft.model import ClusterState, IPFamily, NodeContext
from kproxy_nft.sources.manifests import Manifests

Doc = dict[str, Any]
T = TypeVar("T")
Path_ = tuple[str | int, ...]

# ---------------------------------------------------------------------------------------------
# pools of valid values (small, so that objects collide)
# ---------------------------------------------------------------------------------------------

SERVICE_NAMES = ("web", "db", "api-1", "a")
NAMESPACES = ("default", "shop", "kube-system")
PORT_NAMES = ("http", "https", "dns", "metrics", "p-1")
PROTOCOLS = ("TCP", "UDP", "SCTP")
NODES = ("node1", "node2", "node-3.example")
ZONES = ("zone-a", "zone-b", "Zone_C.1")
CLUSTER_IPS = {4: [f"10.96.0.{i}" for i in range(1, 6)], 6: [f"fd00:96::{i:x}" for i in range(1, 6)]}
# Endpoints: pod addresses, plus addresses validation lets through that are odd for a pod
# (another service's cluster IP, a node IP, multicast, broadcast, the first/last of a range).
ENDPOINT_IPS = {
    4: ["10.1.0.5", "10.1.0.6", "10.1.1.7", "10.96.0.1", "192.168.1.2", "239.1.2.3", "255.255.255.255",
        "10.0.0.0", "100.64.0.1", "240.0.0.1"],
    6: ["fd00:1::5", "fd00:1::6", "fd00:96::1", "2001:db8::ffff:1", "ff05::2", "64:ff9b::a00:5", "fd00:1::"],
}
EXTERNAL_IPS = {
    4: ["192.0.2.1", "192.0.2.2", "10.96.0.1", "239.1.1.1", "255.255.255.255", "192.168.1.2"],
    6: ["2001:db8::1", "2001:db8::2", "ff05::1", "fd00:96::1"],
}
LB_IPS = {4: ["198.51.100.1", "198.51.100.2", "192.0.2.1"], 6: ["2001:db8:1::1", "2001:db8::1"]}
SOURCE_RANGES = ["10.0.0.0/8", "10.1.0.0/16", "192.168.0.0/16", "203.0.113.7/24", " 198.51.100.0/24 ",
                 "0.0.0.0/0", "1.2.3.4/32", "fd00::/8", "fd00:1::/64", "2001:DB8::/32", "::/0"]
SERVICE_CIDRS = {4: ["10.96.0.0/16", "10.96.0.0/28"], 6: ["fd00:96::/112", "fd00::/64"]}
NODE_PORTS = [30000, 30001, 30080, 32767, 1, 65535]
TARGET_PORT_NAMES = ("http", "web-8080", "a1")

# ---------------------------------------------------------------------------------------------
# hostile values
# ---------------------------------------------------------------------------------------------

# Digits of other scripts: str.isdigit() is true for each, int() takes some ("١٢", "８０") and
# refuses others ("²").
UNICODE_DIGITS = ["²", "80²", "١٢", "８０", "𝟠𝟘", "8\u200b0", "⁸⁰"]
INJECTIONS = [
    "web\n", "web\r", "web\r\n-A KUBE-SERVICES -j DNAT --to-destination 1.2.3.4:22",
    "\n-A KUBE-SERVICES -j ACCEPT\nCOMMIT\n*filter", "-j DROP", "--to-destination 6.6.6.6",
    "fe80::1%eth0", "fe80::1%lo -j RETURN\n-A KUBE-SERVICES -j DNAT --to-destination [fd00::666]:1",
    "10.0.0.1%x", "fd00::1%25eth0", "} ; flush ruleset ; {", "}\ntable ip x { chain y { } }\n", "@service-ips",
    "a\"b", 'a" -j ACCEPT "', "a\\", "a\\\"", "'", "#", "# comment", ";", "$(reboot)", "`id`", "${HOME}",
    "", " ", "\t", "\x00", "web\x00", "\x07", "\x1b[31mred\x1b[0m", "\x7f", "\x85", "\u2028", "\u2029", "\ufeff",
    "\ud800", "wéb", "ｗｅｂ", "web\u200b", "Ω", "🐍", "WEB", "Web", "-web", "web-", "web.", ".web", "we_b", "we b",
    "a" * 63, "a" * 64, "a" * 254, "x" * 10_000, "9" * 5000, "0", "-1", "080", "65536", "80", "http", "TCP", "tcp",
    "ICMP", "IPv4", "IPv6", "FQDN", "None", "null", "true", "~", "ClusterIP", "Local", "VIP", "*", "a/b", "a:b",
    "10.0.0.1/24", "10.0.0.1:80", "[fd00::1]:80", "kubernetes.io/service-name",
    *UNICODE_DIGITS,
]
# Addresses the API server refuses for endpoints and external IPs (and we for cluster IPs)…
REFUSED_IPS = ["127.0.0.1", "127.1.2.3", "0.0.0.0", "::", "::1", "224.0.0.1", "224.0.0.251", "ff02::1", "ff12::1",
               "169.254.169.254", "fe80::1", "::ffff:10.0.0.1"]
# …and odd ones it admits (multicast, broadcast, shared, reserved, documentation ranges).
ODD_IPS = ["255.255.255.255", "239.1.1.1", "ff05::1", "100.64.0.1", "240.0.0.1", "192.0.2.1", "2001:db8::1",
           "64:ff9b::1", "fd00::1", "10.0.0.0"]
SPECIAL_IPS = REFUSED_IPS + ODD_IPS
NON_CANONICAL_IPS = ["010.0.0.1", "10.0.0.01", "10.0.000.1", "FD00::1", "fd00:0:0::1", "fd00::0001", "0x0a.0.0.1",
                     "10.1", "10.0.0.1.", " 10.0.0.1", "10.0.0.1 ", "10.0.0.1\n", "1.2.3.4/32", "fd00::1/128",
                     "fd00::1%eth0", "[fd00::1]", "::ffff:10.0.0.1", "::10.0.0.1", "1.2.3.4.5", "10.0.0.256",
                     "fd00:::1", "fd00::1::2", "10.0.0.-1", "１０.0.0.1"]
BAD_CIDRS = ["10.0.0.0/33", "fd00::/129", "10.0.0.0/-1", "10.0.0.0/8%x", "fd00::/8%eth0", "10.0.0.0/08", "10.0.0.0/",
             "/8", "10.0.0.0/8/8", "10.0.0.0 /8", "10.0.0.0/255.0.0.0", "10.0.0.1/8", "FD00::/8", "10.0.0.0/8\n",
             "0.0.0.0/0", "::/0", "1.2.3.4", "224.0.0.0/4", "127.0.0.0/8"]
SPECIAL_INTS = [0, -1, -80, 1, 65535, 65536, 70000, 2**15, 2**16, 2**31, 2**32, 2**63, -(2**63), 2**64, 10**30,
                86400, 86401, 10800, 30000, 32767, 32768]


@dataclass(frozen=True)
class Raw:
    """File text the YAML/JSON dumpers cannot produce, put where a value goes.

    `yaml` is the text in a YAML file (one line, valid after `key: ` and after `- `); `json`
    the text in a JSON file. Rendering writes a placeholder and substitutes the text after.
    """

    yaml: str
    json: str


# JSON nested deeper than the interpreter's recursion room is refused ("nested too deeply"). The
# old reader (json.loads of the whole file) and the new one (msgspec, item by item) reach that
# room a few levels apart (982-986 below the caller, measured): in that band the two paths
# cannot agree. JSON depths skip it, with a margin for where in a document the value sits;
# YAML's limit is libyaml's own 1,000 levels, the same for both paths.
_JSON_DISAGREE = range(940, 1020)


def _nested(depth: int, mapping: bool) -> Raw:
    def text(levels: int) -> str:
        return '{"a": ' * levels + "1" + "}" * levels if mapping else "[" * levels + "]" * levels

    json_depth = depth
    if depth in _JSON_DISAGREE:
        json_depth = _JSON_DISAGREE.start - 1 if depth < 980 else _JSON_DISAGREE.stop
    return Raw(text(depth), text(json_depth))


RAW_SCALARS = [
    Raw("9" * 4300, "9" * 4300), Raw("9" * 4301, "9" * 4301), Raw("-" + "9" * 5000, "-" + "9" * 5000),
    Raw("1e400", "1e400"), Raw("-0", "-0"), Raw("80.0", "80.0"), Raw("8e1", "8e1"), Raw(".nan", "NaN"),
    Raw(".inf", "Infinity"), Raw("-.inf", "-Infinity"), Raw("0x50", "80"), Raw("0o120", "80"), Raw("1_000", "1000"),
    Raw("1:20", "80"), Raw("2024-01-01", '"2024-01-01"'), Raw("2024-01-01T00:00:00Z", '"2024-01-01T00:00:00Z"'),
    Raw("!!binary aGVsbG8=", '"aGVsbG8="'), Raw("!!python/object/apply:os.system [id]", '{"$ref": "#"}'),
    Raw("!!set {a: null}", '{"a": null}'), Raw("!!str 80", '"80"'), Raw("!!int 80", "80"), Raw("!!float 80", "80.0"),
    Raw("!!bool yes", "true"), Raw("!!null ''", "null"), Raw("&x 80", "80"), Raw("*nowhere", "nowhere"),
    Raw("yes", "true"), Raw("off", "false"), Raw("~", "null"), Raw("'unterminated", '"unterminated'),
    Raw('"\\0"', '"\\u0000"'), Raw('"\\ud800"', '"\\ud800"'), Raw('"\\U0010FFFF"', '"\\udbff\\udfff"'),
    Raw('"a\\nb"', '"a\\nb"'), Raw('"\\x1b[2J"', '"\\u001b[2J"'), Raw("[a, b", "[1, 2"), Raw("{a: 1", '{"a": 1'),
    Raw("}", "}"), Raw("- a", "-"), Raw("@x", "@x"), Raw("%TAG", "%TAG"), Raw("? a", "?"), Raw("<<: {a: 1}", "{}"),
]

hostile_strings = st.one_of(
    st.sampled_from(INJECTIONS),
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=8).map(lambda s: "web" + s),
    st.builds(lambda a, b: a + b, st.sampled_from(["web", "10.0.0.1", "fd00::1", "http"]), st.sampled_from(INJECTIONS)),
)
# Depths at the parsers' and the interpreter's limits (libyaml refuses 1,000 levels; Python's
# recursion limit is 1,000 frames, minus however deep the caller already is), deepest first.
depths = st.one_of(st.sampled_from([999, 998, 995, 990, 980, 950, 900, 1000, 1001, 500, 100, 2]), st.integers(1, 1100))
nesting = st.builds(_nested, depths, st.booleans())
raw_values = st.one_of(st.sampled_from(RAW_SCALARS), nesting)
wrong_types: st.SearchStrategy[Any] = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True), st.just([]), st.just({}),
    st.lists(st.sampled_from(["10.0.0.1", 80, None, "web"]), min_size=1, max_size=3),
    st.dictionaries(st.sampled_from(["a", "ip", "name", "port"]), st.sampled_from([1, "x", None]), min_size=1,
                    max_size=2),
)
hostile_ints = st.one_of(
    st.sampled_from(SPECIAL_INTS), st.integers(-(2**70), 2**70), st.integers(-5, 70000),
    st.sampled_from(["80", " 80", "80\n", "0x50", "8080", "１２", "²", "⁸⁰", "٨٠"]), st.sampled_from(RAW_SCALARS[:14]),
)


anything: st.SearchStrategy[Any] = st.one_of(hostile_strings, wrong_types, raw_values, hostile_ints)


def pick(draw: st.DrawFn, options: Sequence[T]) -> T:
    """One of `options`, shrinking toward the first (cheaper than a new `sampled_from` per draw)."""
    return options[draw(st.integers(0, len(options) - 1))]


def _family(value: str) -> int | None:
    try:
        return ipaddress.ip_network(value.strip(), strict=False).version
    except ValueError:
        return None


zoned_addresses = st.builds("{}%{}".format, st.sampled_from(ENDPOINT_IPS[6] + EXTERNAL_IPS[6] + CLUSTER_IPS[6]),
                            st.sampled_from(["eth0", "1", "lo -j ACCEPT", "x\ny", "} ; {", "a b"]))
# Replacements for an address field: special, misspelled, of the other family, with a zone.
_ADDRESSES = {
    family: st.one_of(
        st.sampled_from(REFUSED_IPS),
        st.sampled_from(ODD_IPS),
        st.sampled_from(NON_CANONICAL_IPS),
        st.sampled_from(ENDPOINT_IPS[other] + EXTERNAL_IPS[other] + CLUSTER_IPS[other]),
        st.sampled_from(BAD_CIDRS + SOURCE_RANGES),
        st.ip_addresses().map(str),
        zoned_addresses,
        hostile_strings,
    )
    for family, other in ((4, 6), (6, 4))
}


# Put after (or before) a valid value: what a line break, a zone or a stray character does to it.
AFFIXES = ["\n", "%eth0", " ", "\r\n", "\x00", "-", "/32", "\n-A KUBE-SERVICES -j ACCEPT", " } ; flush ruleset ; {"]


def affixed(draw: st.DrawFn, old: str) -> str:
    """`old` made hostile by a small edit: a suffix (mostly) or prefix, another case, a leading zero."""
    how = draw(st.integers(0, 5))
    if how <= 2:
        return old + pick(draw, AFFIXES)
    if how == 3:
        return pick(draw, AFFIXES) + old
    if how == 4:
        return old.upper() if old != old.upper() else old.lower()
    return re.sub(r"(:)([0-9a-f])" if ":" in old else r"(^)([0-9])", r"\g<1>0\2", old, count=1)  # fd00:096::1


def replacement(draw: st.DrawFn, old: Any) -> Any:
    """A hostile value for a field that held `old`, chosen by what kind of value `old` is."""
    how = draw(st.integers(0, 5))
    if how == 0:
        return draw(anything)
    if isinstance(old, bool):
        return pick(draw, ["true", "True", 1, 0, "yes", None])
    if isinstance(old, int):
        return draw(hostile_ints)
    if isinstance(old, str) and how <= 2:
        return affixed(draw, old)
    if isinstance(old, str) and (family := _family(old)) is not None:
        return draw(_ADDRESSES[family])
    if isinstance(old, str):
        return draw(hostile_strings)
    if isinstance(old, list):
        how = draw(st.integers(0, 3))
        if how == 0:
            return []
        if how == 1:
            return old * 9 if len(old) < 10 else old[:1]  # many (duplicate) items
        return [draw(anything)] if how == 2 else draw(anything)
    if isinstance(old, dict):
        return pick(draw, [{}, [old], None])
    return draw(anything)


# ---------------------------------------------------------------------------------------------
# valid objects
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PortSpec:
    """One Service port, as its slices must repeat it (name, target port number, protocol)."""

    name: str
    protocol: str
    target: int


def _ips(draw: st.DrawFn, pool: dict[int, list[str]], families: Sequence[int], max_size: int) -> list[str]:
    choices = [ip for f in families for ip in pool[f]]
    return draw(st.lists(st.sampled_from(choices), max_size=max_size, unique=True))


@st.composite
def services(draw: st.DrawFn, name: str, namespace: str) -> tuple[Doc, list[PortSpec], list[int]]:
    """A valid Service of any type, with the ports its slices must name and its families."""
    svc_type = pick(draw, ["ClusterIP", "NodePort", "LoadBalancer", "ClusterIP", "ExternalName"])
    families = pick(draw, [[4], [6], [4, 6], [6, 4]])
    spec: Doc = {"type": svc_type} if draw(st.booleans()) or svc_type != "ClusterIP" else {}
    meta: Doc = {"name": name}
    if namespace != "default" or draw(st.booleans()):
        meta["namespace"] = namespace
    if draw(st.integers(0, 9)) == 0:
        meta["labels"] = pick(draw, [{"service.kubernetes.io/service-proxy-name": "other"},
                                     {"service.kubernetes.io/headless": ""}, {"app": "web"}])
    headless = svc_type == "ClusterIP" and draw(st.integers(0, 9)) == 0
    if svc_type == "ExternalName":
        spec["externalName"] = "example.com"
    elif headless:
        spec["clusterIP"] = "None"
        if draw(st.booleans()):
            spec["clusterIPs"] = ["None"]
    else:
        ips = [pick(draw, CLUSTER_IPS[f]) for f in families]
        spec["clusterIP"] = ips[0]
        if draw(st.booleans()) or len(ips) > 1:
            spec["clusterIPs"] = ips
        spec["ipFamilies"] = [f"IPv{f}" for f in families]
        spec["ipFamilyPolicy"] = "SingleStack" if len(families) == 1 else "RequireDualStack"
    external = svc_type in ("NodePort", "LoadBalancer")

    ports: list[Doc] = []
    specs: list[PortSpec] = []
    count = draw(st.integers(0 if headless or svc_type == "ExternalName" else 1, 3))
    names = draw(st.lists(st.sampled_from(PORT_NAMES), min_size=count, max_size=count, unique=True))
    numbers = draw(st.lists(st.sampled_from([80, 443, 53, 8080, 1, 65535]), min_size=count, max_size=count,
                            unique=True))
    node_ports = draw(st.lists(st.sampled_from(NODE_PORTS), min_size=count, max_size=count, unique=True))
    for i in range(count):
        port: Doc = {"port": numbers[i]}
        if count > 1 or draw(st.booleans()):
            port["name"] = names[i]
        protocol = pick(draw, PROTOCOLS)
        if protocol != "TCP" or draw(st.booleans()):
            port["protocol"] = protocol
        target = pick(draw, [numbers[i], 8080, 9376, 1, 65535])
        written = pick(draw, [target, str(target), None, pick(draw, TARGET_PORT_NAMES)])
        if written is not None:
            port["targetPort"] = written
        if external and draw(st.integers(0, 4)) > 0:
            port["nodePort"] = node_ports[i]
        if draw(st.integers(0, 5)) == 0:
            port["appProtocol"] = "kubernetes.io/h2c"
        ports.append(port)
        specs.append(PortSpec(port.get("name", ""), protocol, target))
    if ports or draw(st.booleans()):
        spec["ports"] = ports
    if draw(st.integers(0, 2)) == 0:
        spec["selector"] = {"app": name}

    if svc_type != "ExternalName" and draw(st.integers(0, 2)) == 0:
        spec["externalIPs"] = _ips(draw, EXTERNAL_IPS, pick(draw, [[4], [6], [4, 6]]), 3)
    policy_local = False
    if (external or spec.get("externalIPs")) and draw(st.booleans()):
        spec["externalTrafficPolicy"] = pick(draw, ["Cluster", "Local"])
        policy_local = spec["externalTrafficPolicy"] == "Local"
    if draw(st.integers(0, 2)) == 0:
        spec["internalTrafficPolicy"] = pick(draw, ["Cluster", "Local"])
    if draw(st.integers(0, 2)) == 0:
        spec["sessionAffinity"] = pick(draw, ["None", "ClientIP"])
        if spec["sessionAffinity"] == "ClientIP" and draw(st.booleans()):
            spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": pick(draw, [1, 10800, 86400])}}
    if draw(st.integers(0, 3)) == 0:
        spec["trafficDistribution"] = pick(draw, ["PreferClose", "PreferSameZone", "PreferSameNode"])

    doc: Doc = {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}
    if svc_type == "LoadBalancer":
        if policy_local and draw(st.booleans()):
            spec["healthCheckNodePort"] = pick(draw, NODE_PORTS)
        if draw(st.integers(0, 3)) == 0:
            spec["loadBalancerSourceRanges"] = draw(st.lists(st.sampled_from(SOURCE_RANGES), max_size=4, unique=True))
        ingress: list[Doc] = []
        for ip in _ips(draw, LB_IPS, families, 2):
            entry: Doc = {"ip": ip}
            mode = pick(draw, [None, None, "VIP", "Proxy"])
            if mode:
                entry["ipMode"] = mode
            ingress.append(entry)
        if draw(st.integers(0, 4)) == 0:
            ingress.append({"hostname": "lb.example.com"})
        if ingress:
            doc["status"] = {"loadBalancer": {"ingress": ingress}}
    return doc, specs, families


@st.composite
def endpoint_slices(draw: st.DrawFn, service: str, namespace: str, ports: Sequence[PortSpec], family: int) -> Doc:
    """A valid EndpointSlice for a service's ports (IPv4, IPv6 or FQDN)."""
    address_type = pick(draw, [f"IPv{family}", f"IPv{family}", f"IPv{family}", "FQDN"])
    endpoints = []
    for _ in range(draw(st.integers(0, 3))):
        if address_type == "FQDN":
            addresses = ["pod-1.example.com"]
        else:
            addresses = draw(st.lists(st.sampled_from(ENDPOINT_IPS[family]), min_size=1, max_size=2, unique=True))
        ep: Doc = {"addresses": addresses}
        conditions = {k: draw(st.booleans()) for k in ("ready", "serving", "terminating") if draw(st.booleans())}
        if conditions or draw(st.booleans()):
            ep["conditions"] = conditions
        if draw(st.booleans()):
            ep["nodeName"] = pick(draw, NODES)
        if draw(st.integers(0, 2)) == 0:
            ep["zone"] = pick(draw, ZONES)
        if draw(st.integers(0, 3)) == 0:
            ep["hostname"] = "pod-1"
        if draw(st.integers(0, 3)) == 0:
            ep["hints"] = {"forZones": [{"name": z} for z in draw(st.lists(st.sampled_from(ZONES), max_size=2))]}
            if draw(st.booleans()):
                ep["hints"]["forNodes"] = [{"name": n} for n in draw(st.lists(st.sampled_from(NODES), max_size=2))]
        if draw(st.integers(0, 3)) == 0:
            ep["targetRef"] = {"kind": "Pod", "namespace": namespace, "name": "pod-1"}
        endpoints.append(ep)
    slice_ports = []
    for p in ports:
        entry: Doc = {"name": p.name, "port": p.target, "protocol": p.protocol}
        if draw(st.integers(0, 9)) == 0:
            del entry[pick(draw, ["name", "port", "protocol"])]  # valid: ignored or defaulted
        slice_ports.append(entry)
    suffix = pick(draw, ["abc12", "x", "0", "a.b"])
    labels = {"kubernetes.io/service-name": service, "endpointslice.kubernetes.io/managed-by": "test"}
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{service}-{suffix}", "namespace": namespace, "labels": labels},
            "addressType": address_type, "endpoints": endpoints, "ports": slice_ports}


@st.composite
def legacy_endpoints(draw: st.DrawFn, service: str, namespace: str, ports: Sequence[PortSpec], family: int) -> Doc:
    """A valid v1 Endpoints of one family (it is converted to a slice)."""
    subsets = []
    for _ in range(draw(st.integers(0, 2))):
        subset: Doc = {}
        for key in ("addresses", "notReadyAddresses"):
            addresses = []
            for ip in draw(st.lists(st.sampled_from(ENDPOINT_IPS[family]), max_size=3, unique=True)):
                addresses.append({"ip": ip, "nodeName": pick(draw, NODES)} if draw(st.booleans()) else {"ip": ip})
            if addresses:
                subset[key] = addresses
        chosen = draw(st.lists(st.sampled_from(list(ports)), max_size=3, unique=True)) if ports else []
        # Several ports are all named (the Service's are); a single unnamed one has no name.
        subset["ports"] = [{"name": p.name, "port": p.target, "protocol": p.protocol} if p.name
                           else {"port": p.target, "protocol": p.protocol} for p in chosen]
        subsets.append(subset)
    return {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": service, "namespace": namespace},
            "subsets": subsets}


@st.composite
def service_cidrs(draw: st.DrawFn) -> Doc:
    families = pick(draw, [[4], [6], [4, 6], [6, 4]])
    return {"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
            "metadata": {"name": pick(draw, ["kubernetes", "extra.cidr"])},
            "spec": {"cidrs": [pick(draw, SERVICE_CIDRS[f]) for f in families]}}


OTHER_KINDS: list[Doc] = [
    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "b"}},
    {"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration", "mode": "nftables"},
    {"apiVersion": "v1beta1", "kind": "Service", "metadata": {"name": "old"}},
]


@st.composite
def valid_documents(draw: st.DrawFn) -> list[Doc]:
    """A small valid cluster: Services, their slices or Endpoints, ServiceCIDRs, other kinds."""
    docs: list[Doc] = []
    used: set[tuple[str, str]] = set()
    for _ in range(draw(st.integers(1, 3))):
        name, namespace = pick(draw, SERVICE_NAMES), pick(draw, NAMESPACES)
        if (name, namespace) in used:
            continue
        used.add((name, namespace))
        svc, ports, families = draw(services(name, namespace))
        docs.append(svc)
        for family in families:
            for _ in range(pick(draw, [1, 0, 2])):
                docs.append(draw(endpoint_slices(name, namespace, ports, family)))
        if draw(st.integers(0, 3)) == 0:
            docs.append(draw(legacy_endpoints(name, namespace, ports, families[0])))
    if draw(st.integers(0, 3)) == 0:
        docs.append(draw(service_cidrs()))
    if draw(st.integers(0, 5)) == 0:
        docs.append(copy.deepcopy(pick(draw, OTHER_KINDS)))
    return draw(st.permutations(docs))


def wrap_in_list(docs: list[Doc], typed: bool) -> Doc:
    """`kubectl get -o yaml` output: a `List`, or a typed list whose items carry no kind."""
    if typed and docs and all(d.get("kind") == docs[0].get("kind") for d in docs):
        items = [{k: v for k, v in d.items() if k not in ("kind", "apiVersion")} for d in docs]
        return {"apiVersion": docs[0].get("apiVersion"), "kind": f"{docs[0].get('kind')}List", "items": items}
    return {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": docs}


# ---------------------------------------------------------------------------------------------
# mutations of the object tree
# ---------------------------------------------------------------------------------------------


def tree_paths(node: Any, prefix: Path_ = ()) -> list[Path_]:
    """Every position in a tree of dicts and lists (the root excluded)."""
    out: list[Path_] = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += tree_paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += tree_paths(value, (*prefix, i))
    return out


def _parent(tree: Any, path: Path_) -> Any:
    for part in path[:-1]:
        tree = tree[part]
    return tree


def _kind(value: Any) -> str:
    if isinstance(value, str) and _family(value) is not None:
        return "address"
    return type(value).__name__


def pick_path(draw: st.DrawFn, tree: Any) -> Path_:
    """A position in `tree`: first a kind of value (address, str, int, bool, list, dict), then one
    of that kind, so that the few address and number fields are hit as often as the many others."""
    groups: dict[str, list[Path_]] = {}
    for path in tree_paths(tree):
        groups.setdefault(_kind(_parent(tree, path)[path[-1]]), []).append(path)
    return pick(draw, groups[pick(draw, sorted(groups))])


@st.composite
def mutate_once(draw: st.DrawFn, tree: list[Any]) -> list[Any]:
    """One hostile edit anywhere in the tree: replace, drop, duplicate, add a key, rename a key."""
    tree = copy.deepcopy(tree)
    path = pick_path(draw, tree)
    parent, key = _parent(tree, path), path[-1]
    old = parent[key]
    op = pick(draw, ["replace", "replace", "replace", "drop", "duplicate", "add-key", "rename-key"])
    if op == "drop":
        del parent[key]
    elif op == "duplicate" and isinstance(old, list) and old:
        old.append(copy.deepcopy(pick(draw, old)))
    elif op == "duplicate":
        if isinstance(parent, list):
            parent.append(copy.deepcopy(old))
        else:
            parent[key] = [old, copy.deepcopy(old)]
    elif op == "add-key" and isinstance(old, dict):
        old[draw(st.one_of(hostile_strings, st.sampled_from(["port", "ip", "name", "kind", "spec", "items"])))] = \
            draw(st.one_of(hostile_strings, wrong_types, hostile_ints))
    elif op == "rename-key" and isinstance(parent, dict):
        del parent[key]
        parent[draw(st.one_of(hostile_strings, st.just(str(key).upper()), st.just(f"{key} ")))] = old
    else:
        parent[key] = replacement(draw, old)
    return tree


@st.composite
def mutated_documents(draw: st.DrawFn, max_mutations: int = 3) -> list[Any]:
    """Valid documents (maybe in a `List`) with one to `max_mutations` hostile edits."""
    docs: list[Any] = draw(valid_documents())
    if draw(st.integers(0, 3)) == 0:
        docs = [wrap_in_list(docs, typed=draw(st.booleans()))]
    for _ in range(draw(st.integers(1, max_mutations))):
        if not tree_paths(docs):
            break
        docs = draw(mutate_once(docs))
    return docs


# One class of hostile value per branch, so that each is drawn as often as the others.
hostile_values: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from(SPECIAL_IPS), st.sampled_from(NON_CANONICAL_IPS), st.sampled_from(BAD_CIDRS), zoned_addresses,
    st.sampled_from(INJECTIONS), st.sampled_from(UNICODE_DIGITS), st.sampled_from(SPECIAL_INTS), wrong_types,
    raw_values,
)


@st.composite
def one_field_attacked(draw: st.DrawFn) -> list[Any]:
    """A Service and one partner (slice, Endpoints or ServiceCIDR), one field of one replaced or dropped.

    Small objects, so that every field is hit often, with every class of hostile value.
    """
    svc, ports, families = draw(services("web", "shop"))
    partner = pick(draw, ["slice", "endpoints", "cidr"])
    if partner == "slice":
        other = draw(endpoint_slices("web", "shop", ports, families[0]))
    elif partner == "endpoints":
        other = draw(legacy_endpoints("web", "shop", ports, families[0]))
    else:
        other = draw(service_cidrs())
    docs: list[Any] = [svc, other]
    target = docs[draw(st.integers(0, 1))]
    path = pick_path(draw, target)
    parent = _parent(target, path)
    how = draw(st.integers(0, 5))
    if how == 0:
        del parent[path[-1]]
    elif how == 1:
        parent[path[-1]] = draw(hostile_values)
    else:  # a value chosen for the field's kind (an address for an address…)
        parent[path[-1]] = replacement(draw, parent[path[-1]])
    return [wrap_in_list(docs, typed=False)] if draw(st.integers(0, 4)) == 0 else docs


@st.composite
def one_string_affixed(draw: st.DrawFn) -> list[Any]:
    """A Service and a slice (or Endpoints), one string of either (a name, an address, a
    label value…) with a line break, a zone or a stray character put after (or before) it: the
    probe's `web\\n` and `fe80::1%<text>`, in every string field."""
    svc, ports, families = draw(services("web", "shop"))
    builder = endpoint_slices if draw(st.booleans()) else legacy_endpoints
    docs = [svc, draw(builder("web", "shop", ports, families[0]))]
    strings = [path for path in tree_paths(docs) if isinstance(_parent(docs, path)[path[-1]], str)]
    path = pick(draw, strings)
    old = _parent(docs, path)[path[-1]]
    _parent(docs, path)[path[-1]] = (old + pick(draw, AFFIXES)) if draw(st.booleans()) else affixed(draw, old)
    return docs


# ---------------------------------------------------------------------------------------------
# rendering to file bytes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManifestFile:
    """What the test writes to disk: a name suffix (`.yaml`, `.json`) and the file's bytes."""

    suffix: str
    data: bytes

    def write(self, directory: Path, stem: str = "manifest") -> Path:
        path = directory / f"{stem}{self.suffix}"
        path.write_bytes(self.data)
        return path


_PLACEHOLDER = "Qz{}RAWzQ"
_YamlDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml's: several times faster


def _swap_raw(node: Any, raws: list[Raw]) -> Any:
    """The tree with every `Raw` replaced by a unique plain placeholder word."""
    if isinstance(node, Raw):
        raws.append(node)
        return _PLACEHOLDER.format(len(raws) - 1)
    if isinstance(node, dict):
        return {k: _swap_raw(v, raws) for k, v in node.items()}
    if isinstance(node, list):
        return [_swap_raw(v, raws) for v in node]
    return node


def render(docs: list[Any], fmt: str, flow: bool | None = False, unicode: bool = True) -> ManifestFile:
    """The documents as one file: multi-document YAML, or JSON (several documents: a `List`)."""
    raws: list[Raw] = []
    swapped = [_swap_raw(d, raws) for d in docs]
    if fmt == "json":
        body = swapped[0] if len(swapped) == 1 else wrap_in_list(swapped, typed=False)
        text = json.dumps(body, ensure_ascii=not unicode, indent=2 if flow is False else None)
        quote = '"{}"'
    else:
        options = {"default_flow_style": flow, "allow_unicode": unicode, "sort_keys": False, "width": 10_000,
                   "explicit_start": True}
        try:
            text = yaml.dump_all(swapped, Dumper=_YamlDumper, **options)
        except UnicodeEncodeError:  # libyaml cannot write a lone surrogate; PyYAML escapes it
            text = yaml.dump_all(swapped, Dumper=yaml.SafeDumper, **options)
        quote = "{}"
    for i, raw in enumerate(raws):
        text = text.replace(quote.format(_PLACEHOLDER.format(i)), raw.json if fmt == "json" else raw.yaml)
    # A lone surrogate cannot be encoded: YAML escapes it, JSON with ensure_ascii=False does not.
    return ManifestFile(f".{fmt}", text.encode("utf-8", "surrogatepass"))


@st.composite
def rendered(draw: st.DrawFn, docs: st.SearchStrategy[list[Any]]) -> ManifestFile:
    fmt = pick(draw, ["yaml", "yaml", "json"])
    return render(draw(docs), fmt, flow=pick(draw, [False, None, True]), unicode=draw(st.booleans()))


def valid_files() -> st.SearchStrategy[ManifestFile]:
    return rendered(valid_documents())


def mutated_files(max_mutations: int = 3) -> st.SearchStrategy[ManifestFile]:
    return rendered(mutated_documents(max_mutations))


def attacked_files() -> st.SearchStrategy[ManifestFile]:
    return rendered(one_field_attacked())


def affixed_files() -> st.SearchStrategy[ManifestFile]:
    return rendered(one_string_affixed())


@st.composite
def raw_injected_files(draw: st.DrawFn) -> ManifestFile:
    """A valid cluster with one value anywhere replaced by a `Raw` (YAML tag, huge number, …)."""
    docs: list[Any] = draw(valid_documents())
    if draw(st.booleans()):  # the fields read before any schema: kind, apiVersion, metadata, items
        paths = [(i, key) for i, doc in enumerate(docs) for key in ("kind", "apiVersion", "metadata", "items")]
    else:
        paths = tree_paths(docs)
    path = pick(draw, paths)
    _parent(docs, path)[path[-1]] = draw(raw_values)
    return render(docs, pick(draw, ["yaml", "json"]), flow=pick(draw, [False, None]))


INVALID_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80",
                b"\xe2\x82", b"\x00", b"\x1b", b"\r", b"\t", b"\x85", b"\xef\xbb\xbf", b"\n---\n", b"\n...\n", b": ",
                b"- ", b"{", b"[", b'"', b"'", b"&a", b"*a", b"!", b"%", b"#", b"\\", b"\n  ", b"\n\t"]


@st.composite
def corrupted(draw: st.DrawFn, files: st.SearchStrategy[ManifestFile]) -> ManifestFile:
    """A rendered file with its bytes damaged: cut short, bytes inserted or overwritten, re-encoded."""
    file = draw(files)
    data = file.data
    op = pick(draw, ["truncate", "insert", "insert", "overwrite", "bom", "utf16", "crlf", "tabs"])
    at = draw(st.integers(0, len(data)))
    if op == "truncate":
        data = data[:at]
    elif op == "insert":
        data = data[:at] + draw(st.one_of(st.sampled_from(INVALID_UTF8), st.binary(min_size=1, max_size=4))) + \
            data[at:]
    elif op == "overwrite":
        data = data[:at] + draw(st.binary(min_size=1, max_size=3)) + data[at + 3:]
    elif op == "bom":
        data = b"\xef\xbb\xbf" + data
    elif op == "utf16":
        data = data.decode("utf-8", "surrogatepass").encode("utf-16", "surrogatepass")
    elif op == "crlf":
        data = data.replace(b"\n", b"\r\n")
    else:
        data = data.replace(b"  ", b"\t")
    return dataclasses.replace(file, data=data)


# ---------------------------------------------------------------------------------------------
# nodes, and what `kproxy-nft dump` prints
# ---------------------------------------------------------------------------------------------

NODE_CONTEXTS = (
    NodeContext(hostname="node1", cluster_cidrs=("10.0.0.0/8",)),
    NodeContext(hostname="node2", node_ips=("192.168.1.2", "fd00:1::2"), zone="zone-a",
                cluster_cidrs=("10.1.0.0/16", "fd00:1::/64"), nodeport_addresses=("primary",), masquerade_all=True,
                localhost_nodeports=True, service_cidrs=("10.96.0.0/16", "fd00:96::/112")),
    NodeContext(hostname="node-3.example", zone="Zone_C.1", nodeport_addresses=("192.168.0.0/16", "127.0.0.0/8",
                "fd00::/8"), localhost_nodeports=True, local_addresses=("192.168.1.3", "fd00::3"), masquerade_bit=0),
    NodeContext(hostname="other", node_ips=("fd00:1::9",), nodeport_addresses=("0.0.0.0/0", "::/0"),
                masquerade_bit=31),
)
nodes = st.sampled_from(NODE_CONTEXTS)


@dataclass(frozen=True)
class DumpOutput:
    """`kproxy-nft dump` for one state: iptables-restore input per family, the nft script."""

    iptables: dict[IPFamily, str]
    nft: str


def with_service_cidrs(node: NodeContext, manifests: Manifests) -> NodeContext:
    """ServiceCIDR objects add to the node's service CIDRs, as the CLI's `load_inputs` does."""
    cidrs = tuple(dict.fromkeys((*node.service_cidrs, *manifests.service_cidrs)))
    return dataclasses.replace(node, service_cidrs=cidrs)


def dump_outputs(state: ClusterState, node: NodeContext) -> DumpOutput:
    """Both compilers' output for `state`, the way `kproxy-nft dump` renders it."""
    iptables = {family: ipt.render_restore(ipt.compile_ruleset(state, node, family)) for family in IPFamily}
    return DumpOutput(iptables, nft.render_script(nft.compile_all(state, node)))


def note(what: str) -> None:
    """Count an outcome in `--hypothesis-show-statistics` (outside a property: nothing)."""
    if currently_in_test_context():
        event(what)
