"""Fuzzing the manifest reader and both compilers with hostile files (fast, no root).

The promise: whatever a manifest file holds, `read_manifests` ends in one clean `ManifestError`
(one printable line, starting with the file's path, shorter than 1,000 characters), or in a
state both compilers turn into rule text, for both families, that our own parsers read back,
where every address is a plain address (no `%zone`, nothing after it) and nothing can start a
rule, a command or a comment of its own. Any other exception (ValueError, RecursionError,
TypeError, KeyError, a pydantic error, …) is a bug.

The strategies are in tests/fuzz_strategies.py; whether the kernel really loads the accepted
output is tests/kernel/test_fuzz_load.py's business.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from kproxy_nft.kernel.iptables_rule import canonical, tokenize
from kproxy_nft.kernel.iptables_text import BUILTIN_CHAINS, parse_save
from kproxy_nft.kernel.nftables import parse_listing
from kproxy_nft.model import ClusterState, IPFamily, NodeContext
from kproxy_nft.sources.manifests import ManifestError, read_manifests
from tests.fuzz_strategies import (
    NODE_CONTEXTS,
    DumpOutput,
    ManifestFile,
    affixed_files,
    attacked_files,
    corrupted,
    dump_outputs,
    mutated_files,
    nodes,
    note,
    raw_injected_files,
    render,
    valid_files,
    with_service_cidrs,
)

MAX_MESSAGE = 1000


def fuzz(examples: int) -> settings:
    # One bug at a time: shrinking several distinct failures at once takes minutes.
    return settings(max_examples=examples, deadline=None, report_multiple_bugs=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ---------------------------------------------------------------------------------------------
# what "clean" means
# ---------------------------------------------------------------------------------------------


def assert_clean_message(message: str, path: Path | None = None) -> None:
    """One printable line (no line break of any kind, no escape sequence), bounded."""
    assert len(message.splitlines()) == 1 and "\n" not in message and "\r" not in message, repr(message[:300])
    assert message.isprintable(), repr(message[:300])
    assert len(message) < MAX_MESSAGE, repr(message[:300])
    if path is not None:
        assert message.startswith(f"{path}"), repr(message[:300])


def assert_plain_address(text: str, option: str) -> None:
    """An address, network or `address:port` as the compilers write it: nothing else in it."""
    assert "%" not in text, (option, text)
    if option == "--to-destination":
        host, _, port = text.rpartition(":")
        assert port.isdigit() and 1 <= int(port) <= 65535, (option, text)
        text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        assert ":" not in text or host.startswith("["), (option, text)
    ipaddress.ip_network(text, strict=False)  # raises on anything but a plain address or CIDR


_IPT_ADDRESS_OPTIONS = ("-s", "-d", "--to-destination", "--mask")
_IPT_LINE = re.compile(r"\*(filter|nat)|:[A-Z0-9-]{1,28} - \[0:0\]|-[AI] [A-Z0-9-]{1,28} .+|COMMIT")


def assert_iptables_text(text: str, family: IPFamily) -> None:
    """iptables-restore input that our parsers read, with plain addresses only."""
    assert "%" not in text
    lines = text.splitlines()
    for line in lines:
        assert line.isprintable() and _IPT_LINE.fullmatch(line), repr(line[:300])
    # Our iptables-save parser takes the `-A` lines; the `-I` jumps go to built-in chains.
    appended = "\n".join(line for line in lines if not line.startswith("-I "))
    state = parse_save(appended, family)
    rules = [(table.name, chain.name, rule) for table in state.tables.values()
             for chain in table.chains.values() for rule in chain.rules]
    assert len(rules) == sum(line.startswith("-A ") for line in lines)
    table = ""
    for line in lines:
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-I "):
            assert line.split()[1] in BUILTIN_CHAINS[table], line
            rules.append((table, line.split()[1], line.split(" ", 3)[3]))
    for table, chain, rule in rules:
        target = _JUMP.search(rule)
        if target and target.group(1).startswith("KUBE-"):
            assert target.group(1) in state.tables[table].chains, (chain, rule)
        assert_iptables_rule(rule, family)


_JUMP = re.compile(r"(?:^| )-[jg] (\S+)")


@functools.lru_cache(maxsize=100_000)  # most rules are the same from one example to the next
def assert_iptables_rule(rule: str, family: IPFamily) -> None:
    """One rule our rule parser reads, whose tokens carry plain addresses, ports and names only."""
    canonical(rule, family)
    tokens = tokenize(rule)
    for previous, token in zip([None, *tokens], tokens, strict=False):
        option = previous.text if previous is not None and not previous.quoted else ""
        if option in _IPT_ADDRESS_OPTIONS:
            assert_plain_address(token.text, option)
        elif option in ("--dport", "--sport"):
            assert token.text.isdigit() and 1 <= int(token.text) <= 65535, rule
        elif option == "--probability":
            assert 0 < float(token.text) <= 1, rule
        elif option != "--comment" and not token.quoted:
            # Nothing else carries an address, or anything from the input but a name.
            assert not re.search(r"[.:%]", token.text), (token, rule)


_NFT_NAME = re.compile(r"[A-Za-z0-9/-]+")
_NFT_HEADER = re.compile(r"type (filter|nat) hook \w+ priority -?\d+; policy accept;")
_NFT_ADDRESSISH = re.compile(r"[0-9a-fA-F]*[.:][0-9a-fA-F.:/]*")


def _nft_tables(script: str) -> Iterator[str]:
    """Each `table … { … }` block of an nft script (a block ends at a `}` in column 0)."""
    block: list[str] = []
    for line in script.splitlines():
        if line.startswith("table "):
            block = [line]
        elif block:
            block.append(line)
            if line == "}":
                yield "\n".join(block)
                block = []
    assert not block, "a table without its closing brace"


def assert_nft_script(script: str) -> None:
    """An `nft -f` script our listing parser reads, every jump to a declared chain, plain addresses."""
    assert "%" not in script and "#" not in script
    assert script.count("{") == script.count("}")
    tables = list(_nft_tables(script))
    assert len(tables) == 2
    for block in tables:
        sets, chains, _ = parse_listing(block)
        assert all(_NFT_NAME.fullmatch(name) for name in (*sets, *chains)), (sorted(sets), sorted(chains))
        for chain in chains.values():
            assert chain.header is None or _NFT_HEADER.fullmatch(chain.header), chain.header
    for line in script.splitlines():
        assert_nft_line(line.strip())


_NFT_WORDS = re.compile(r"[\s,{}]+")
_NFT_NUMBER = re.compile(r"(?<![\w.:-])\d+(?![\w.:])")
_NFT_GLUED = re.compile(r"[.:]\S|\S[.:]")  # a `.` or `:` that is not a separator of its own


@functools.lru_cache(maxsize=100_000)  # most lines are the same from one example to the next
def assert_nft_line(body: str) -> None:
    """One line: one statement, no comment, addresses and prefixes that parse, 16-bit numbers."""
    assert body.isprintable(), repr(body[:300])
    if body.startswith('comment "'):
        return
    assert ";" not in body or _NFT_HEADER.fullmatch(body), repr(body[:300])
    assert body.count("{") == body.count("}") or body.endswith("{") or body == "}", repr(body[:300])
    if body.startswith("add element "):
        # Element numbers are ports and numgen indexes: within 16 bits.
        assert all(int(n) <= 65535 for n in _NFT_NUMBER.findall(body)), body[:300]
    for word in _NFT_WORDS.split(body):
        if _NFT_ADDRESSISH.fullmatch(word) and any(c.isdigit() for c in word):
            ipaddress.ip_network(word, strict=False)  # an address or prefix, nothing else
        else:
            assert not _NFT_GLUED.search(word), (word, body[:300])


def _special(ip: str) -> bool:
    assert "%" not in ip, ip
    address = ipaddress.ip_address(ip)
    link_local_multicast = address in ipaddress.ip_network("224.0.0.0/24") or (
        address.version == 6 and address.packed[0] == 0xFF and address.packed[1] & 0x0F == 0x02)
    return (address.is_unspecified or address.is_loopback or address.is_link_local or link_local_multicast
            or (address.version == 6 and address.ipv4_mapped is not None))


def assert_state_is_admissible(state: ClusterState) -> None:
    """What reached the model holds only what the API server admits (independently of validation.py)."""
    for svc in state.services.values():
        for ip in (*svc.cluster_ips, *svc.external_ips, *svc.load_balancer_ips):
            assert ipaddress.ip_address(ip).compressed == ip and not _special(ip), (svc.name, ip)
        for ip in (*svc.cluster_ips, *svc.load_balancer_ips):
            assert not ipaddress.ip_address(ip).is_multicast and ip != "255.255.255.255", (svc.name, ip)
        for port in (svc.port, svc.node_port, svc.health_check_node_port, svc.target_port):
            assert port is None or isinstance(port, str) or 1 <= port <= 65535, (svc.name, port)
        for cidr in svc.load_balancer_source_ranges:
            assert "%" not in cidr and ipaddress.ip_network(cidr, strict=False), (svc.name, cidr)
    for name, endpoints in state.endpoints.items():
        for ep in endpoints:
            assert ipaddress.ip_address(ep.ip).compressed == ep.ip and not _special(ep.ip), (name, ep)
            assert 1 <= ep.port <= 65535, (name, ep)


def assert_dump_is_sound(out: DumpOutput) -> None:
    for family, text in out.iptables.items():
        assert_iptables_text(text, family)
    assert_nft_script(out.nft)


# How deep the frame that calls `read_manifests` is when `kproxy-nft dump` runs (its console
# script, then click's), under Python's default recursion limit of 1,000.
CLI_CALLER_DEPTH = 9


@contextmanager
def default_recursion_limit() -> Iterator[None]:
    """The room for recursion `kproxy-nft` reads manifests with.

    Hypothesis raises the limit while a test runs; with it raised, an object nested just below
    libyaml's limit of 1,000 levels no longer reaches the interpreter's. Set relative to the
    depth of the `with` statement's frame, not to 1,000: JSON nested ~1,000 deep is refused or
    not by that room, and a test's own depth differs between Hypothesis's first run of an
    example and its replay (an old flake of `test_generated_files_read_alike[odd syntax]`).
    """
    frame, depth = sys._getframe(2), 0  # this generator <- contextmanager's __enter__ <- the caller
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    raised = sys.getrecursionlimit()
    sys.setrecursionlimit(depth - CLI_CALLER_DEPTH + 1000)
    try:
        yield
    finally:
        sys.setrecursionlimit(raised)


def outcome(file: ManifestFile, directory: Path, node: NodeContext) -> DumpOutput | None:
    """Read a file as `dump` does: a clean refusal (None), or sound output for both compilers."""
    with default_recursion_limit():
        return _outcome(file, directory, node)


def _outcome(file: ManifestFile, directory: Path, node: NodeContext) -> DumpOutput | None:
    path = file.write(directory)
    try:
        manifests = read_manifests([str(path)])
    except ManifestError as e:
        assert_clean_message(str(e), path)
        note("refused")
        return None
    note("accepted")
    for notice in manifests.notices:
        assert_clean_message(notice, path)
    warnings: list[str] = []  # two service ports claiming one destination: one keeps it
    state = manifests.cluster_state(warnings.append)
    for warning in warnings:
        assert_clean_message(warning)
    assert_state_is_admissible(state)
    out = dump_outputs(state, with_service_cidrs(node, manifests))
    assert_dump_is_sound(out)
    return out


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------


@fuzz(100)
@given(valid_files(), nodes)
def test_valid_manifests_are_accepted_and_compile(workdir: Path, file: ManifestFile, node: NodeContext) -> None:
    """The starting point of every mutation is valid: refused here means validation is too strict."""
    assert outcome(file, workdir, node) is not None


@fuzz(150)
@given(mutated_files(), nodes)
def test_mutated_manifests_are_refused_cleanly_or_compile(workdir: Path, file: ManifestFile,
                                                          node: NodeContext) -> None:
    outcome(file, workdir, node)


@fuzz(400)
@given(attacked_files(), nodes)
def test_each_field_with_each_kind_of_hostile_value(workdir: Path, file: ManifestFile, node: NodeContext) -> None:
    outcome(file, workdir, node)


@fuzz(250)
@given(affixed_files(), nodes)
def test_a_line_break_or_zone_after_any_string(workdir: Path, file: ManifestFile, node: NodeContext) -> None:
    outcome(file, workdir, node)


@fuzz(120)
@given(raw_injected_files(), nodes)
def test_odd_syntax_is_refused_cleanly_or_compiles(workdir: Path, file: ManifestFile, node: NodeContext) -> None:
    outcome(file, workdir, node)


@fuzz(100)
@given(corrupted(mutated_files(max_mutations=1)), nodes)
def test_corrupted_bytes_are_refused_cleanly_or_compile(workdir: Path, file: ManifestFile,
                                                        node: NodeContext) -> None:
    outcome(file, workdir, node)


# ---------------------------------------------------------------------------------------------
# explicit examples: the checks above are not vacuous
# ---------------------------------------------------------------------------------------------

SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
           "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}}


def test_a_plain_service_compiles(workdir: Path) -> None:
    out = outcome(render([SERVICE], "yaml"), workdir, NODE_CONTEXTS[1])
    assert out is not None and "-d 10.96.0.10" in out.iptables[IPFamily.V4] and "10.96.0.10 . tcp . 80" in out.nft


@pytest.mark.parametrize("bad", [
    "-A KUBE-SERVICES -d 10.0.0.1%lo -j ACCEPT",
    "-A KUBE-SERVICES -j DNAT --to-destination 10.0.0.1\n-A KUBE-SERVICES -j ACCEPT",
    "-A KUBE-SERVICES -m comment --comment x -j ACCEPT -d 10.0.0.1:80",
])
def test_the_iptables_check_catches_injected_text(bad: str) -> None:
    text = f"*nat\n:KUBE-SERVICES - [0:0]\n{bad}\nCOMMIT\n"
    with pytest.raises((AssertionError, ValueError)):
        assert_iptables_text(text, IPFamily.V4)


@pytest.mark.parametrize("bad", [
    "\t\tip daddr fe80::1%lo accept",
    "\t\tip daddr 10.0.0.1 accept ; flush ruleset",
    "\t\tip daddr 10.0.0.1 accept # x",
    "\t\tjump {",
])
def test_the_nft_check_catches_injected_text(bad: str) -> None:
    script = (f"table ip kproxy-nft {{\n\tchain services {{\n{bad}\n\t}}\n}}\n"
              "table ip6 kproxy-nft {\n\tchain services {\n\t}\n}\n")
    with pytest.raises((AssertionError, ValueError)):
        assert_nft_script(script)


@pytest.mark.parametrize("message", ["f.yaml: a\nb", "f.yaml: a\x1b[2Jb", "f.yaml: " + "x" * 1000, "g.yaml: x",
                                     "f.yaml: a\u2028b"])
def test_the_message_check_catches_unclean_messages(message: str) -> None:
    with pytest.raises(AssertionError):
        assert_clean_message(message, Path("f.yaml"))


# ---------------------------------------------------------------------------------------------
# bugs the properties found (all fixed), as explicit regression examples
# ---------------------------------------------------------------------------------------------

REGRESSIONS = [
    pytest.param(ManifestFile(".yaml", b"apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  labels:\n"
                              b"    \"app\\n-A KUBE-SERVICES -j ACCEPT\": 1\nspec:\n  clusterIP: 10.96.0.10\n"
                              b"  ports:\n  - port: 80\n"), id="line-break-in-a-label-key"),
    pytest.param(ManifestFile(".yaml", b"apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  \"\\e\": x\n"),
                 id="escape-in-a-metadata-key"),
    pytest.param(ManifestFile(".yaml", b"apiVersion: v1\nkind: " + b"[" * 998 + b"]" * 998 + b"\n"),
                 id="kind-nested-998-deep"),
    pytest.param(ManifestFile(".yaml", b"apiVersion: " + b"[" * 998 + b"]" * 998 + b"\nkind: Service\n"),
                 id="apiVersion-nested-998-deep"),
    pytest.param(ManifestFile(".yaml", b"apiVersion: v1\nkind: Service\nmetadata:\n  name: " + b"[" * 997
                              + b"]" * 997 + b"\n"), id="name-nested-997-deep"),
    pytest.param(render([{**SERVICE, "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "targetPort": "²"}]}}],
                        "yaml"), id="targetPort-superscript-two"),
]


@pytest.mark.parametrize("file", REGRESSIONS)
def test_found_by_the_properties(workdir: Path, file: ManifestFile) -> None:
    outcome(file, workdir, NODE_CONTEXTS[0])  # a clean one-line error, or output that compiles: no crash


# A 9 kB YAML file whose aliases expand to 1,000 slices x 1,000 endpoints x 100 addresses:
# the API server's YAML decoder refuses such "excessive aliasing"; we spend minutes on it.
ALIAS_BOMB = "\n".join([
    "apiVersion: v1", "kind: List", "x-anchors:",
    "- &e {addresses: [" + ", ".join(f"10.1.{i // 250}.{i % 250 + 1}" for i in range(100)) + "]}",
    "- &eps [" + ", ".join(["*e"] * 1000) + "]",
    "- &s {apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {name: web-x, labels: "
    "{kubernetes.io/service-name: web}}, addressType: IPv4, ports: [{name: '', port: 80}], endpoints: *eps}",
    "items: [" + ", ".join(["*s"] * 1000) + "]",
]) + "\n"


def test_an_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)
    code = f"from kproxy_nft.sources.manifests import read_manifests; read_manifests([{str(path)!r}])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=4)
    assert "ManifestError" in result.stderr and len(result.stderr.splitlines()[-1]) < MAX_MESSAGE
