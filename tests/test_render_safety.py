"""Defence in depth: a hostile string in the model never becomes rule text of its own.

The model objects here are built directly, bypassing `kproxy_nft.validation`, as a bug there
would let them through: a valid model with hostile text (line breaks, quotes, `%` zones,
`-A KUBE-SERVICES …`, `} ; …`, NUL, non-ASCII, very long strings) in one or two of its string
fields, and for each kind of string field a run with that field alone hostile. Compiling then
either refuses (`render.UnsafeValue`) or gives text that holds exactly the rules the compiler
meant, line for line, made only of values inside their grammar (`assert_inputs_safe`, an
oracle built on `ipaddress` that shares nothing with `render`). `nft -c` checks accepted
scripts against a kernel in tests/kernel/test_render_safety_nft.py, with these strategies.
Below those: unit tests and properties of `compile.render` itself.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from kproxy_nft.compile import iptables, nftables
from kproxy_nft.compile.render import UnsafeValue, address, cidr, name, quote
from kproxy_nft.kernel.iptables_rule import tokenize
from kproxy_nft.kernel.iptables_text import parse_save
from kproxy_nft.model import (
    ClusterState,
    Endpoint,
    IPFamily,
    LocalMode,
    NodeContext,
    Protocol,
    ServicePort,
    ServicePortName,
    TrafficPolicy,
)

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# strategies: a valid model, then hostile text in one or two of its string fields
# ---------------------------------------------------------------------------------------------

INJECTIONS = [
    "", " ", "\t", "\n", "\r\n", "\0", "\x0b", "\x85", "\u2028", "%", '"', "'", "\\", "{", "}", ";", "#", ",",
    "é", "١٠", "\U0001f4a3",
    "\n-A KUBE-SERVICES -d 6.6.6.6/32 -j DNAT --to-destination 6.6.6.6:53",
    '" -j ACCEPT -m comment --comment "',
    " -j DNAT --to-destination 6.6.6.6:53",
    "; add rule ip kproxy-nft services accept",
    " } ; flush ruleset ; table ip evil {",
    " . tcp . 80 : goto evil, 6.6.6.6",
    "\nCOMMIT\n*nat\n",
]
BITS = st.sampled_from(INJECTIONS) | st.text(min_size=1, max_size=12)


# Ways to make hostile text from a valid value and a bit of hostile text.
HOSTILE: list[Callable[[str, str], str]] = [
    lambda base, bit: f"{base}%{bit}",  # an IPv6 zone: `ipaddress` takes anything after the `%`
    lambda base, bit: base + "%eth0",
    lambda base, bit: base + bit,
    lambda base, bit: bit + base,
    lambda base, bit: base.upper(),
    lambda base, bit: base * 40,  # very long
    lambda base, bit: bit,
]


ODD_BUT_VALID_ADDRESSES = ["0.0.0.0", "255.255.255.255", "::", "FD00::B", "fd00:0:0:0:0:0:0:a", "::ffff:10.0.0.9",
                           "1:2:3:4:5:6:7::", "::2:3:4:5:6:7:8", "64:ff9b::192.0.2.33"]
ADDRESSES = st.one_of(
    st.sampled_from(["10.0.0.1", "10.0.0.2", "10.1.0.7", "192.0.2.7", "fd00::1", "fd00::2", "2001:db8::7"]),
    st.ip_addresses().map(str),
    st.sampled_from(ODD_BUT_VALID_ADDRESSES),
)


@st.composite
def valid_cidrs(draw: st.DrawFn) -> str:
    ip = draw(st.ip_addresses())
    if draw(st.booleans()) and draw(st.booleans()):
        return str(ip)  # a bare address, as `--cluster-cidr 10.0.0.1` may give
    return f"{ip}/{draw(st.integers(0, ip.max_prefixlen))}"  # host bits allowed, as the API does


CIDRS = st.sampled_from(["10.0.0.0/8", "10.1.0.0/16", "192.0.2.0/24", "fd00::/64", "0.0.0.0/0"]) | valid_cidrs()
LABELS = st.sampled_from(["a", "ns1", "web", "db-1", "0", "x" * 63]) | st.from_regex(
    r"[a-z0-9]([-a-z0-9]{0,8}[a-z0-9])?", fullmatch=True
)
NODE_NAMES = st.sampled_from(["node1", "node2", "node1.example.com"])
ZONES = st.sampled_from(["zone-a", "zone-b"])
PORTS = st.sampled_from([80, 53, 8080]) | st.integers(1, 65535)
NODE_PORTS = st.none() | st.integers(30000, 32767)


def strings(valid: st.SearchStrategy[str], min_size: int = 0) -> st.SearchStrategy[tuple[str, ...]]:
    return st.lists(valid, min_size=min_size, max_size=2).map(tuple)


@st.composite
def endpoints(draw: st.DrawFn) -> Endpoint:
    ready = draw(st.booleans())
    return Endpoint(
        ip=draw(ADDRESSES),
        port=draw(PORTS),
        ready=ready,
        serving=ready or draw(st.booleans()),
        terminating=not ready and draw(st.booleans()),
        node_name=draw(st.none() | NODE_NAMES),
        zone=draw(st.none() | ZONES),
        zone_hints=frozenset(draw(strings(ZONES))),
        node_hints=frozenset(draw(strings(NODE_NAMES))),
    )


SERVICE_PORTS = st.builds(
    ServicePort,
    name=st.builds(ServicePortName, LABELS, LABELS, st.just("") | LABELS, st.sampled_from(Protocol)),
    port=PORTS,
    target_port=st.integers(1, 65535) | LABELS,
    service_type=st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]),
    cluster_ips=strings(ADDRESSES, min_size=1),
    node_port=NODE_PORTS,
    external_ips=strings(ADDRESSES),
    load_balancer_ips=strings(ADDRESSES),
    load_balancer_source_ranges=strings(CIDRS),
    external_traffic_policy=st.sampled_from(TrafficPolicy),
    internal_traffic_policy=st.sampled_from(TrafficPolicy),
    session_affinity_seconds=st.none() | st.integers(1, 86400),
    health_check_node_port=NODE_PORTS,
    traffic_distribution=st.none() | st.just("PreferClose"),
)
# Each service port with its endpoints: unique and in kube-proxy's order (by address), as the model says.
SERVICES = st.tuples(
    SERVICE_PORTS,
    st.lists(endpoints(), max_size=3, unique_by=lambda ep: ep.address).map(
        lambda eps: tuple(sorted(eps, key=lambda ep: ep.address))
    ),
)
NODES = st.builds(
    NodeContext,
    hostname=NODE_NAMES,
    node_ips=strings(ADDRESSES),
    zone=st.none() | ZONES,
    cluster_cidrs=strings(CIDRS),
    masquerade_all=st.booleans(),
    nodeport_addresses=strings(st.just("primary") | CIDRS),
    localhost_nodeports=st.booleans(),
    service_cidrs=strings(CIDRS),
    local_addresses=strings(ADDRESSES),
    detect_local_mode=st.sampled_from(LocalMode),
    pod_cidrs=strings(CIDRS),
    pod_bridge_interface=st.sampled_from(["", "cbr0", "br-pods"]),
    pod_interface_name_prefix=st.sampled_from(["", "veth", "cali"]),
)

Path = tuple[str | int, ...]


def string_fields(value: object, path: Path = ()) -> Iterator[Path]:
    """Where `value` holds plain strings (enums aside): dataclass fields, tuple and set items."""
    if type(value) is str:
        yield path
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from string_fields(getattr(value, f.name), (*path, f.name))
    elif isinstance(value, tuple | list | frozenset):
        for i, item in enumerate(_items(value)):
            yield from string_fields(item, (*path, i))


def _items(value: tuple[object, ...] | list[object] | frozenset[object]) -> list[object]:
    return sorted(value) if isinstance(value, frozenset) else list(value)  # type: ignore[type-var]


def at(value: object, path: Path) -> object:
    for step in path:
        value = _items(value)[step] if isinstance(step, int) else getattr(value, step)  # type: ignore[arg-type]
    return value


def replaced(value: T, path: Path, new: str) -> T:
    """`value` with the string at `path` (from `string_fields`) replaced by `new`."""
    if not path:
        return new  # type: ignore[return-value]
    head, *rest = path
    if isinstance(value, tuple | list | frozenset):
        items = _items(value)
        items[head] = replaced(items[head], tuple(rest), new)  # type: ignore[index]
        return type(value)(items)  # type: ignore[return-value]
    return dataclasses.replace(value, **{str(head): replaced(getattr(value, str(head)), tuple(rest), new)})  # type: ignore[type-var]


def kind(path: Path) -> str:
    """The field a path of a model `([(service port, endpoints), …], node)` leads to: `endpoint.ip`."""
    owner = "node" if path[0] == 1 else "endpoint" if path[2] == 1 else "service"
    return ".".join([owner, *(step for step in path if isinstance(step, str))])


# Every kind of string field, and which of them reach rule text.
RENDERED = [
    "service.name.namespace", "service.name.name", "service.name.port", "service.cluster_ips",
    "service.external_ips", "service.load_balancer_ips", "service.load_balancer_source_ranges", "endpoint.ip",
    "node.node_ips", "node.local_addresses", "node.cluster_cidrs", "node.service_cidrs", "node.nodeport_addresses",
    "node.pod_cidrs", "node.pod_bridge_interface", "node.pod_interface_name_prefix",
]
NOT_RENDERED = [
    "service.target_port", "service.service_type", "service.traffic_distribution", "endpoint.node_name",
    "endpoint.zone", "endpoint.zone_hints", "endpoint.node_hints", "node.hostname", "node.zone",
]


@st.composite
def models(draw: st.DrawFn, min_services: int = 0, max_hostile: int = 2,
           poison: str | None = None) -> tuple[ClusterState, NodeContext]:
    """A node and up to two service ports with endpoints, 0 to `max_hostile` fields hostile.

    Valid models make the compilers reach every rule; one hostile field at a time shows that
    each field's guard holds on its own. With `poison`, exactly one field of that kind (see
    `kind`) is hostile. Shrinks towards the valid model and the one field.
    """
    size = draw(st.sampled_from(range(min_services, 3)))
    model = (draw(st.lists(SERVICES, min_size=size, max_size=size)), draw(NODES))
    for _ in range(1 if poison else draw(st.sampled_from(range(max_hostile + 1)))):
        paths = [path for path in string_fields(model) if poison in (None, kind(path))]
        assume(paths)
        path = draw(st.sampled_from(paths))
        model = replaced(model, path, draw(st.sampled_from(HOSTILE))(str(at(model, path)), draw(BITS)))
    services, node = model
    state = ClusterState({svc.name: svc for svc, _ in services}, {svc.name: eps for svc, eps in services})
    return state, node


# ---------------------------------------------------------------------------------------------
# the oracle: what an accepted model must look like
# ---------------------------------------------------------------------------------------------


def _parses(parse: Callable[[str], object], text: str) -> bool:
    try:
        parse(text)
    except ValueError:
        return False
    return "%" not in text  # `ipaddress` takes a zone, and anything after it


def is_address(text: str) -> bool:
    return _parses(ipaddress.ip_address, text)


def is_cidr(text: str) -> bool:
    return _parses(lambda t: ipaddress.ip_network(t, strict=False), text)


def is_label(text: str) -> bool:
    return len(text) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", text, re.ASCII) is not None


def assert_inputs_safe(state: ClusterState, node: NodeContext, family: IPFamily) -> None:
    """Every value that reaches the rules of `family` is a plain address, CIDR or DNS label.

    Neither parser admits blanks, quotes, separators or line breaks, so such values cannot add
    an argument, a rule or a command. Hostname, zones and hints only select endpoints.
    """
    for svc in state.services.values():
        spn = svc.name
        assert is_label(spn.namespace) and is_label(spn.name) and (spn.port == "" or is_label(spn.port)), spn
        for ip in (*svc.cluster_ips, *svc.external_ips, *svc.load_balancer_ips):
            assert is_address(ip), ip
        assert all(is_cidr(c) for c in svc.load_balancer_source_ranges), svc.load_balancer_source_ranges
        for ep in state.endpoints_of(spn):
            rendered = (":" in ep.ip) is (family is IPFamily.V6)  # the compilers' family test
            assert not rendered or is_address(ep.ip), ep.ip
    for ip in (*node.node_ips, *node.local_addresses):
        assert is_address(ip), ip
    for text in (*node.cluster_cidrs, *node.service_cidrs, *node.nodeport_addresses):
        assert text == "primary" or is_cidr(text), text


def compiled(compile_ruleset: Callable[[ClusterState, NodeContext, IPFamily], T], state: ClusterState,
             node: NodeContext) -> list[T]:
    """Each family's ruleset that compiles; a refusal must be an UnsafeValue, nothing else."""
    out = []
    for family in IPFamily:
        try:
            ruleset = compile_ruleset(state, node, family)
        except UnsafeValue:
            continue
        assert_inputs_safe(state, node, family)
        out.append(ruleset)
    event(f"families compiled: {len(out)}")
    return out


# ---------------------------------------------------------------------------------------------
# (a) iptables: the restore text parses back into exactly the compiled chains and rules
# ---------------------------------------------------------------------------------------------


def check_iptables(state: ClusterState, node: NodeContext) -> None:
    """Refused, or the restore text parses back into exactly the compiled chains and rules."""
    for ruleset in compiled(iptables.compile_ruleset, state, node):
        text = iptables.render_restore(ruleset, with_jumps=False)
        parsed = parse_save(text, ruleset.family)
        assert list(parsed.tables) == [table.name for table in ruleset.tables]
        for table in ruleset.tables:
            got = [(chain.name, chain.rules) for chain in parsed.tables[table.name].chains.values()]
            assert got == [(chain.name, chain.rules) for chain in table.chains]
        # The jumps from built-in chains (constants) add one line each, and nothing else.
        assert iptables.render_restore(ruleset).count("\n") == text.count("\n") + len(ruleset.jumps)
        # Only comments are quoted: every other argument is a bare word of its own.
        for table in ruleset.tables:
            for chain in table.chains:
                for rule in chain.rules:
                    tokens = tokenize(rule)
                    quoted = [i for i, token in enumerate(tokens) if token.quoted]
                    assert all(i > 0 and tokens[i - 1].text == "--comment" for i in quoted), rule


@settings(max_examples=150, deadline=None)
@given(models())
def test_iptables_renders_exactly_its_rules_or_refuses(model: tuple[ClusterState, NodeContext]) -> None:
    check_iptables(*model)


# ---------------------------------------------------------------------------------------------
# (b) nftables: every line of the script is one we meant, and no line holds a second command
# ---------------------------------------------------------------------------------------------


def meant_lines(ruleset: nftables.Ruleset) -> list[str]:
    """The lines `render_script` is meant to write for `ruleset`, one per declaration, rule or set."""
    family = ruleset.nft_family
    lines = [f"table {family} {nftables.TABLE} {{", f'\tcomment "{nftables.TABLE_COMMENT}"']
    for decl in ruleset.sets:
        lines += [f"\t{decl.keyword} {decl.name} {{", *(f"\t\t{line}" for line in decl.body), "\t}"]
    for chain in ruleset.all_chains():
        lines.append(f"\tchain {chain.name} {{")
        if chain.hook is not None:
            lines.append(f"\t\t{chain.hook.header()}")
        lines += [f"\t\t{rule}" for rule in chain.rules]
        lines.append("\t}")
    lines.append("}")
    for set_name, elements in ruleset.elements().items():
        if elements:
            assert len(elements) <= nftables.ELEMENTS_PER_COMMAND
            items = ", ".join(key if value is None else f"{key} : {value}" for key, value in elements.items())
            lines.append(f"add element {family} {nftables.TABLE} {set_name} {{ {items} }}")
    return lines


_PRINTABLE = re.compile(r"[ -~]*")
_HOOK = re.compile(r"type (filter|nat) hook [a-z]+ priority -?[0-9]+; policy accept;")


# The one quoted string we write: an interface name (or prefix*) from `render.interface`.
_QUOTED_INTERFACE = re.compile(r'iifname (?:!= )?"[A-Za-z0-9_.-]{1,15}\*?"')


def assert_one_statement(text: str) -> None:
    """Printable ASCII, braces balanced, and no `;` (a second statement) or `#` (cutting the rest)."""
    unquoted = _QUOTED_INTERFACE.sub("iifname IFACE", text)
    assert _PRINTABLE.fullmatch(text) and ";" not in text and "#" not in text and '"' not in unquoted, text
    depth = 0
    for char in text:
        depth += {"{": 1, "}": -1}.get(char, 0)
        assert depth >= 0, text
    assert depth == 0, text


def check_nftables(state: ClusterState, node: NodeContext) -> None:
    """Refused, or every line is one we meant and holds one statement (no `;`, `#`, stray brace)."""
    rulesets = compiled(nftables.compile_ruleset, state, node)
    if not rulesets:
        return
    script = nftables.render_script(rulesets)
    assert script.split("\n") == [line for ruleset in rulesets for line in meant_lines(ruleset)] + [""]
    for ruleset in rulesets:
        for chain in ruleset.all_chains():
            assert re.fullmatch(r"[A-Za-z0-9][-A-Za-z0-9/]*", chain.name), chain.name
            assert chain.hook is None or _HOOK.fullmatch(chain.hook.header())
            for rule in chain.rules:
                assert_one_statement(rule)
        for elements in ruleset.elements().values():
            for key, value in elements.items():
                for text in (key, value or ""):
                    assert_one_statement(text)
                    assert "," not in text and "{" not in text, text  # a second element


@settings(max_examples=150, deadline=None)
@given(models())
def test_nftables_renders_exactly_its_lines_or_refuses(model: tuple[ClusterState, NodeContext]) -> None:
    check_nftables(*model)


# ---------------------------------------------------------------------------------------------
# each kind of field on its own
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field_kind", RENDERED + NOT_RENDERED)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(data=st.data())
def test_each_field_alone_is_refused_or_harmless(field_kind: str, data: st.DataObject) -> None:
    """One hostile field of each kind: every guard holds on its own, in both compilers."""
    state, node = data.draw(models(poison=field_kind))
    check_iptables(state, node)
    check_nftables(state, node)


def test_every_string_field_is_classified() -> None:
    """A new string field in the model must be added to RENDERED or NOT_RENDERED (and maybe to render)."""
    svc = ServicePort(ServicePortName("a", "b", "c"), 80, "http", cluster_ips=("10.0.0.1",), external_ips=("1.1.1.1",),
                      load_balancer_ips=("1.1.1.2",), load_balancer_source_ranges=("0.0.0.0/0",),
                      traffic_distribution="PreferClose")
    ep = Endpoint("10.1.0.1", 80, node_name="n", zone="z", zone_hints=frozenset({"z"}), node_hints=frozenset({"n"}))
    node = NodeContext(node_ips=("10.0.0.2",), zone="z", cluster_cidrs=("10.0.0.0/8",), nodeport_addresses=("primary",),
                       service_cidrs=("10.96.0.0/12",), local_addresses=("10.0.0.3",), pod_cidrs=("10.1.0.0/24",))
    assert {kind(path) for path in string_fields(([(svc, (ep,))], node))} == {*RENDERED, *NOT_RENDERED}


# ---------------------------------------------------------------------------------------------
# compile.render itself
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "fe80::1%eth0", "fe80::1%0", "fe80::1%", "fe80::1%eth0\n-A KUBE-SERVICES -j DNAT --to-destination 6.6.6.6:1",
    "10.0.0.1%eth0", "::ffff:10.0.0.1%1",
])
def test_zone_ids_are_refused(text: str) -> None:
    assert is_address(text.split("%")[0])  # what comes before the zone is a fine address
    with pytest.raises(UnsafeValue, match="zone|IP"):
        address(text, "zone IP")
    with pytest.raises(UnsafeValue):
        cidr(text + "/64")


@pytest.mark.parametrize("text", [
    "10.0.0.1", "0.0.0.0", "255.255.255.255", "192.0.2.7", "::", "::1", "fd00::a", "FD00::A", "2001:db8:0:0:0:0:0:1",
    "1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7::", "::2:3:4:5:6:7:8", "::ffff:10.0.0.1", "64:ff9b::192.0.2.33",
    "1:2:3:4:5:6:10.0.0.1", "fe80::1",
])
def test_plain_addresses_are_accepted_unchanged(text: str) -> None:
    assert address(text) is text
    assert cidr(text) is text and cidr(f"{text}/{16 if '.' in text and ':' not in text else 64}")


@pytest.mark.parametrize("text", [
    "", " ", "10.0.0.1 ", " 10.0.0.1", "10.0.0.1\n", "10.0.0.01", "010.0.0.1", "256.0.0.1", "10.0.0", "10.0.0.1.2",
    "1.2.3.4/8", "[fd00::1]", "fd00::1::2", "1:2:3:4:5:6:7:8:9", "1::2:3:4:5:6:7:8", "12345::", "fd00:::1",
    "fd00::g", "::ffff:10.0.0.256", "١٠.0.0.1", "10.0.0.1\x00", "10.0.0.1 -j DNAT", "10.0.0.1,10.0.0.2",
])
def test_anything_else_is_refused_as_an_address(text: str) -> None:
    with pytest.raises(UnsafeValue):
        address(text)


@pytest.mark.parametrize("text", ["10.0.0.0/33", "fd00::/129", "10.0.0.0/08", "10.0.0.0/255.0.0.0", "10.0.0.0/",
                                  "10.0.0.0/8\n", "10.0.0.0/8 ", "/8", "10.0.0.0/8/8"])
def test_malformed_cidrs_are_refused(text: str) -> None:
    with pytest.raises(UnsafeValue):
        cidr(text)


@pytest.mark.parametrize(("text", "ok"), [
    ("web", True), ("a", True), ("0", True), ("db-1", True), ("x" * 63, True), ("x" * 64, False), ("", False),
    ("web\n", False), ("Web", False), ("-a", False), ("a-", False), ("a_b", False), ("a.b", False), ("a/b", False),
    ("a b", False), ("ns1:p", False), ("wéb", False),
])
def test_names_are_dns_labels(text: str, ok: bool) -> None:
    if ok:
        assert name(text) is text
    else:
        with pytest.raises(UnsafeValue):
            name(text)


_ADDRESS_CHARS = "0123456789abcdefABCDEF:.%/ \n"


@st.composite
def near_addresses(draw: st.DrawFn) -> str:
    """Valid spellings, their mutations, and random text made of address characters."""
    ip = draw(st.ip_addresses())
    spellings = [str(ip), ip.exploded, str(ip).upper()]
    if ip.version == 6 and ip.ipv4_mapped is not None:
        spellings.append(f"::ffff:{ip.ipv4_mapped}")
    text = draw(st.sampled_from(spellings))
    i = draw(st.integers(0, len(text)))
    return draw(st.sampled_from([
        text,
        text[:i] + draw(st.sampled_from(_ADDRESS_CHARS)) + text[i:],
        text[:i] + text[i + 1:],
        draw(st.text(alphabet=_ADDRESS_CHARS, max_size=45)),
    ]))


@settings(max_examples=500, deadline=None)
@given(near_addresses() | st.text(max_size=50))
def test_what_address_accepts_ipaddress_parses_without_a_zone(text: str) -> None:
    try:
        address(text)
    except UnsafeValue:
        return
    ip = ipaddress.ip_address(text)
    assert "%" not in text and ip.version == (6 if ":" in text else 4)
    if ip.version == 4:
        assert str(ip) == text  # leading zeros are refused, so IPv4 text is canonical


@settings(max_examples=300, deadline=None)
@given(st.ip_addresses())
def test_every_spelling_of_every_address_is_accepted(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    """The other half: no valid input is turned into an outage."""
    for text in (str(ip), ip.exploded, str(ip).upper()):
        assert address(text) == text
    if ip.version == 6:
        v4 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        assert address(f"{':'.join(ip.exploded.split(':')[:6])}:{v4}")  # the low 32 bits as IPv4


@settings(max_examples=300, deadline=None)
@given(st.ip_addresses(), st.integers(0, 128), near_addresses() | st.text(max_size=50))
def test_cidrs_are_what_ip_network_reads_without_a_zone(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, prefix: int, text: str
) -> None:
    valid = f"{ip}/{prefix % (ip.max_prefixlen + 1)}"
    assert cidr(valid) == valid and is_cidr(valid)
    for candidate in (text, f"{text}/{prefix}"):
        try:
            cidr(candidate)
        except UnsafeValue:
            continue
        assert is_cidr(candidate), candidate


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40))
def test_names_are_what_a_label_check_accepts(text: str) -> None:
    try:
        name(text)
    except UnsafeValue:
        assert not is_label(text)
    else:
        assert is_label(text)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=40))
def test_quote_gives_one_iptables_token_or_refuses(text: str) -> None:
    try:
        quoted = quote(text)
    except UnsafeValue:
        assert not _PRINTABLE.fullmatch(text)  # control characters, non-ASCII
        return
    assert "\n" not in quoted and "\r" not in quoted
    assert [token.text for token in tokenize(f"--comment {quoted}")] == ["--comment", text]


def test_refusals_are_one_bounded_line_naming_the_kind_of_value() -> None:
    with pytest.raises(UnsafeValue) as refused:
        address("10.0.0.1\n" + "-A KUBE-SERVICES -j DNAT " * 100, "endpoint IP")
    message = str(refused.value)
    assert "endpoint IP" in message and "\n" not in message and len(message) < 120
    assert isinstance(refused.value, ValueError)
