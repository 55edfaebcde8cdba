"""`slim.lean_yaml_load` (oryaml behind yaml_fast's risky-token scan) is PyYAML's `load_all` exactly.

The property: for YAML texts shaped like Kubernetes manifests, with adversarial plain scalars
(YAML 1.1 booleans, octals, sexagesimals, timestamps, `1e3`, `<<`, `=`, ...) in every position
(keys, values, sequence items, folded over two lines), quoted variants, anchors, aliases, tags,
flow collections, duplicate keys, comments, several documents and small corruptions,
`lean_yaml_load(text)` gives what `list(yaml.load_all(text, CSafeLoader))` gives: the same types
(True is not 1), the same key order, the same values - or the same exception, type and message.
"""

from __future__ import annotations

import datetime
import math
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kproxy_nft.sources import yaml_fast
from kproxy_nft.sources.slim import lean_yaml_load

# Plain scalars that resolve differently in YAML 1.1 (PyYAML) and 1.2 (oryaml), and neighbours
# that must not (the fast path's own forms): each is a bug waiting for a careless pre-scan.
ADVERSARIAL = [
    "yes", "Yes", "YES", "no", "No", "NO", "on", "On", "ON", "off", "Off", "OFF", "y", "Y", "n", "N",
    "true", "True", "TRUE", "false", "False", "FALSE", "null", "Null", "NULL", "~", "",
    "0777", "0o17", "0x1F", "0b101", "1_000", "1:20", "-1:20", "190:20:30.15", "1e3", "1E3", "1.0e+3", "6.8523015e+5",
    "1.0", "1.", ".5", "-.5", "+1", "+.inf", ".inf", "-.inf", ".nan", ".NaN", "inf", "nan", "Infinity",
    "0", "-0", "00", "007", "80", "-5", "65535", "123456789012345678", "1234567890123456789",
    "123456789012345678901234567890", "9223372036854775808",
    "2001-12-14", "2001-12-14t21:59:43.10-05:00", "2001-12-14 21:59:43.10", "2002-1-1", "2026-01-01T00:00:00Z",
    "<<", "=", "<", "==", "<=>", "-", "--", "---", "...", "-x", "+x", ".x",
    "10.96.0.1", "10.96.0.1/12", "1.2.3", "1.2", "10.0.0.0/8", "fd00::1", "::1", "2001:db8::1",
    "00000000-0000-4000-8000-000000000000", "1e000000-0000-4000-8000-000000000000",
    "2001abcd-0000-4000-8000-000000000000", "100Mi", "30s", "1e", "5m0s", "0s", "1a", "1_a",
    "svc0", "TCP", "ClusterIP", "nginx", "none", "None", "onion", "yesterday", "http", "a b", "yes no",
    "x:y", "x: y", "x #y", "x#y", "a,b", "[a]", "{a}", "!x", "&x", "*x", "%x", "@x", "`x", "|", ">", "?x", "? x",
    "é", "日本", "ｙes",
]
KEYS = ["name", "app", "port", "protocol", "nodeName", "yes", "on", "1", "0777", "1:20", "<<", "=", "true", "~",
        "null", "1e3", "app.kubernetes.io/name", "2001-12-14", "a b", "-1", ".5", "80", "10.0.0.1"]

# What clusters are made of: these pass the pre-scan, so that the fast path is taken often enough
# for the properties to see it wrong (most texts draw one adversarial scalar or none).
ORDINARY = ["svc0", "web-1", "TCP", "UDP", "ClusterIP", "None", "Cluster", "IPv4", "SingleStack", "kubernetes",
            "80", "443", "8080", "0", "-1", "10.96.0.1", "10.244.1.17", "fd00::a", "10.96.0.0/12", "1.27.3",
            "6b7e0f4c-2f0e-4c7a-9f0e-1b2c3d4e5f60", "100Mi", "30s", "true", "false", "null", "node-a",
            "zone-a", "discovery.k8s.io/v1", "v1", "http", "a b c", "nginx:1.25", "x_y"]
plain = st.one_of(st.sampled_from(ORDINARY), st.sampled_from(ORDINARY), st.sampled_from(ORDINARY),
                  st.sampled_from(ORDINARY), st.sampled_from(ORDINARY), st.sampled_from(ORDINARY),
                  st.sampled_from(ADVERSARIAL),
                  st.text(alphabet="yYnNoO0123456789.-+:_eExab ", min_size=1, max_size=8))


def single_quoted(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def double_quoted(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


ADVERSE = st.one_of(st.sampled_from(ADVERSARIAL), st.text(alphabet="yYnNoO0123456789.-+:_eExab ", min_size=1,
                                                             max_size=8))
WORDS = {"calm": st.sampled_from(ORDINARY), "wild": plain, "adverse": ADVERSE}


@st.composite
def scalar(draw: st.DrawFn, indent: int = 0, mode: str = "wild") -> str:
    """A scalar as written in a value position: plain (sometimes folded over two lines), quoted or tagged.

    `mode`: "calm", of what clusters hold (ORDINARY), as a text that takes the fast path has;
    "adverse", of what may resolve differently; "wild", both.
    """
    words = WORDS[mode]
    text = draw(words)
    styles = ["plain"] * 12 + ["single", "double", "folded", "folded"] + ([] if mode == "calm" else ["tag", "anchor"])
    style = draw(st.sampled_from(styles))
    if style == "single":
        return single_quoted(text)
    if style == "double":
        return double_quoted(text)
    if style == "folded":  # a plain scalar going on on the next, deeper line
        return f"{text}\n{' ' * (indent + 2)}{draw(words)}"
    if style == "tag":
        return f"{draw(st.sampled_from(['!!str', '!!int', '!!bool', '!!float', '!', '!local']))} {text}"
    if style == "anchor":
        return f"&a {text}"
    return text


@st.composite
def key(draw: st.DrawFn, mode: str = "wild") -> str:
    if mode == "calm":
        text = draw(st.sampled_from(KEYS[:5] + ORDINARY))
    elif mode == "adverse":
        text = draw(st.one_of(st.sampled_from(KEYS[5:]), ADVERSE))
    else:
        text = draw(st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS[:5]), st.sampled_from(KEYS[:5]), plain))
    return draw(st.sampled_from([text, text, text, single_quoted(text)]))


# Whole entries put into a mapping of a calm text: what the pre-scan must see at any indentation.
ENTRIES = ["? - a\n: b", "? a\n: b", "<<: {x: 1}", "<<: []", "[a]: b", "{a: 1}: b", "&x k: v", "!!str k: v",
           "k: &x v", "k: *x", "k: !!int '3'", "k: [yes]", "k: {a: on}", "k: |\n  yes", "k: >-\n  0777",
           "k: 'on'", 'k: "1:20"', "k:\n- yes", "k: - 1", "? 1e3\n: x", "k:   0o17", "k:\tyes", "k: yes #c"]


Tree = Any  # ("map", [(key, Tree)]) | ("seq", [Tree]) | ("scalar", None) | ("flow", str)


def trees(mode: str) -> st.SearchStrategy[Tree]:
    flows = ["[]", "{}"] + ([] if mode == "calm" else ["[a, 1]", "{a: yes}", "[on, 0777]", "*a"])
    return st.recursive(
        st.one_of(st.just(("scalar", None)), st.just(("scalar", None)),
                  st.sampled_from(flows).map(lambda f: ("flow", f))),
        lambda children: st.one_of(
            st.lists(children, max_size=3).map(lambda items: ("seq", items)),
            st.lists(st.tuples(key(mode), children), max_size=4).map(lambda pairs: ("map", pairs)),
        ),
        max_leaves=12,
    )


TREES = {mode: trees(mode) for mode in ("calm", "wild")}


@st.composite
def block(draw: st.DrawFn, tree: Tree, indent: int, mode: str) -> list[str]:
    """`tree` in block style, as the lines of a node at `indent` (a mapping's or sequence's lines)."""
    pad = " " * indent
    kind, content = tree
    lines: list[str] = []
    if kind == "map":
        for k, value in content:
            vkind = value[0]
            if vkind == "scalar":
                lines.append(f"{pad}{k}: {draw(scalar(indent, mode))}".rstrip(" "))
            elif vkind == "flow":
                lines.append(f"{pad}{k}: {value[1]}")
            elif value[1]:
                lines.append(f"{pad}{k}:")
                # a sequence may sit at its key's indentation, as PyYAML and kubectl write it
                deeper = indent if vkind == "seq" and draw(st.booleans()) else indent + 2
                lines += draw(block(value, deeper, mode))
            else:
                lines.append(f"{pad}{k}: {'[]' if vkind == 'seq' else '{}'}")
    elif kind == "seq":
        for item in content:
            ikind = item[0]
            if ikind == "scalar":
                lines.append(f"{pad}- {draw(scalar(indent, mode))}".rstrip(" "))
            elif ikind == "flow":
                lines.append(f"{pad}- {item[1]}")
            elif item[1]:
                inner = draw(block(item, indent + 2, mode))
                lines.append(f"{pad}- {inner[0].lstrip(' ')}")  # compact: `- key: value`, `- - item`
                lines += inner[1:]
            else:
                lines.append(f"{pad}- {'[]' if ikind == 'seq' else '{}'}")
    else:
        lines.append(pad + draw(scalar(indent, mode)))
    return lines


@st.composite
def manifest(draw: st.DrawFn, mode: str) -> str:
    """A Kubernetes-shaped document (a Service or a List of them), with adversarial parts unless "calm"."""
    name, port, extra = draw(scalar(0, mode)), draw(scalar(0, mode)), draw(TREES[mode])
    lines = ["apiVersion: v1", f"kind: {draw(st.sampled_from(['Service', 'List', 'EndpointSlice']))}",
             "metadata:", f"  name: {name}", f"  creationTimestamp: {draw(scalar(0, mode))}", "  labels:",
             f"    {draw(key(mode))}: {draw(scalar(4, mode))}", "spec:", "  ports:", f"  - port: {port}",
             "    protocol: TCP"]
    if extra[0] == "map" and extra[1]:
        lines += draw(block(extra, 2 * draw(st.integers(0, 1)), mode))
    elif extra[0] == "seq" and extra[1]:
        lines += ["items:"] + draw(block(extra, 0, mode))
    if mode != "calm" and draw(st.integers(0, 4)) == 0:  # a merge key, an anchor and an alias
        lines += ["base: &b", "  x: 1", "derived:", "  <<: *b", "  y: 2"]
    if draw(st.integers(0, 3)) == 0:  # a duplicate key: PyYAML keeps the last
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(["kind: Service", "apiVersion: v2"])))
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(["# a comment", "", "  # yes"])))
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\n\n", "  \n"]))


@st.composite
def texts(draw: st.DrawFn) -> str:
    """Whole streams: one or more documents, markers, and sometimes a small corruption.

    Two texts in three are calm (they would take the fast path), and most of those then get one
    adversarial scalar, key, item or entry in one place: the pre-scan has to find it wherever it is.
    """
    calm = draw(st.integers(0, 2)) > 0
    mode = "calm" if calm else "wild"
    documents = draw(st.lists(manifest(mode), min_size=1, max_size=1 if calm else 2))
    text = draw(st.sampled_from(["", "", "", "---\n", "--- \n", "# c\n"] + ([] if calm else ["%YAML 1.1\n---\n"])))
    text += "---\n".join(d if d.endswith("\n") else d + "\n" for d in documents)
    if not calm:
        text += draw(st.sampled_from(["", "", "", "", "...\n", "---\n", "--- yes\n", "--- 80\n", "---\n...\n"]))
    lines = text.split("\n")
    if calm and draw(st.integers(0, 3)) > 0:  # one adversarial token or entry, in one place (often the first line)
        at = draw(st.one_of(st.just(0), st.integers(0, len(lines) - 1)))
        line = lines[at]
        indent = len(line) - len(line.lstrip(" "))
        where = draw(st.sampled_from(["value", "key", "entry"]))
        if where == "entry":  # before this line, at its indentation (a mapping's, if it is `- key: value`)
            entry = draw(st.sampled_from(ENTRIES))
            inner = indent + 2 if line.lstrip(" ").startswith("- ") else indent
            lines.insert(at, "\n".join(" " * inner + part for part in entry.split("\n")))
            if inner != indent:
                lines[at], lines[at + 1] = lines[at + 1], lines[at]
        elif where == "value" and ": " in line:
            lines[at] = line[: line.index(": ") + 2] + draw(scalar(indent, "adverse"))
        elif line.lstrip(" ").startswith("- "):
            lines[at] = line[: line.index("- ") + 2] + draw(scalar(indent, "adverse"))
        elif ":" in line:  # a key: plain or quoted, never folded
            rest = line.lstrip(" ")
            lines[at] = " " * indent + draw(key("adverse")) + rest[rest.find(":"):]
    # a line break other than \n somewhere (libyaml breaks lines at CR, NEL, LS and PS too)
    if draw(st.integers(0, 5)) == 0 and len(lines) > 1:
        at = draw(st.integers(0, len(lines) - 2))
        lines[at] += draw(st.sampled_from(["\r", "\x85", "\u2028", "\u2029"]))
        lines[at] += lines.pop(at + 1) if draw(st.booleans()) else ""
    text = "\n".join(lines)
    if draw(st.integers(0, 4)) == 0:  # corrupt: insert, delete or replace a character somewhere
        at = draw(st.integers(0, len(text)))
        what = draw(st.sampled_from([" ", "\t", ":", "- ", "#", "'", '"', "[", "{", "}", "\n", "&", "*", "!",
                                     "\r", "\x85", "\u2028", "\ufeff", "y", "0", "é"]))
        text = text[:at] + what + text[at + draw(st.integers(0, 1)):]
    return text


def strict(a: Any, b: Any) -> bool:
    """Equal values of equal types, mappings in the same key order (`True == 1`, `{} == {}` in any order)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(map(type, a)) == list(map(type, b)) and list(a) == list(b) and all(
            strict(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(strict(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, datetime.datetime):
        return a == b and a.tzinfo == b.tzinfo
    return bool(a == b)


def outcome(load: Any, text: str) -> tuple[str, Any]:
    try:
        return "ok", load(text)
    except Exception as e:  # noqa: BLE001 - the exception is the result compared
        return "error", (type(e), str(e))


def pyyaml(text: str) -> list[Any]:
    return list(yaml.load_all(text, Loader=yaml.CSafeLoader))  # noqa: S506 - the safe loader


def assert_same(text: str) -> None:
    got, want = outcome(lean_yaml_load, text), outcome(pyyaml, text)
    assert got[0] == want[0], (text, got, want)
    if got[0] == "ok":
        assert strict(got[1], want[1]), (text, got[1], want[1])
    else:
        assert got[1] == want[1], (text, got[1], want[1])


@pytest.fixture(autouse=True, scope="module")
def one_entry_per_chunk() -> Any:
    """A List's items parsed one per oryaml call, so that small texts split too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(yaml_fast, "_CHUNK", 1)
        yield


PROPERTY = settings(max_examples=600, deadline=None, report_multiple_bugs=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@PROPERTY
@given(texts())
@example("a: yes\n")
@example("a: 1:20\n")
@example("port: 0777\n")
@example("- 1e3\n- 1_000\n- 2001-12-14\n")
@example("a: b\na: c\n")
@example("true: a\n1: b\n")
def test_lean_yaml_load_is_pyyaml(text: str) -> None:
    assert_same(text)


@PROPERTY
@given(texts())
def test_no_risky_token_means_oryaml_is_pyyaml(text: str) -> None:
    """The pre-scan alone: whenever it lets a text through and oryaml accepts it, PyYAML agrees."""
    fast = yaml_fast.load(text)
    if fast is not None:
        want = outcome(pyyaml, text)
        assert want[0] == "ok", (text, fast, want)
        assert strict(fast, want[1]), (text, fast, want[1])


# Where a token can sit: keys (the first line's too), values, items, nested, folded, before a
# comment, after a tab, after line breaks other than \n, as a whole document, in flow collections.
PLACES = [
    "{t}: v\nb: c\n", "a: {t}\n", "a: {t}", "a:\n- {t}\n", "a:\n  b: {t}\n  c: d\n", "- - {t}\n", "a: {t}\n  more\n",
    "a: {t} # c\n", "a: b\n{t}: c\n", "a: b\n  {t}: c\n", "a: b\r\n{t}: c\r\n", "a: b\x85{t}: c\n",
    "a: b\u2028{t}: c\n", "a: b\r{t}: c\n", "--- {t}\n", "{t}\n", "\ufeff{t}: c\n", "a:\n  - x\n  - {t}:\n      y: z\n",
    "a:\t{t}\n", "a: \t{t}\n", "? {t}\n: v\n", "a: [{t}]\n", "a: {{k: {t}}}\n", "{t}:\n  {t}: {t}\n", "- {t}: {t}\n",
    "a: '{t}'\nb: \"{t}\"\n", "a: |\n  {t}\n", "# {t}\na: b\n",
]


@pytest.mark.parametrize("place", PLACES)
def test_every_adversarial_token_in_every_place(place: str) -> None:
    for token in ADVERSARIAL + ORDINARY:
        assert_same(place.format(t=token))


@pytest.mark.parametrize("text", [
    "", "# only a comment\n", "---\n", "--- \n...\n", "~\n", "null\n", "80\n", "yes\n", "a:\n", "- \n",
    "a: b\n---\nc: d\n",
    "a: &x [1]\nb: *x\n", "<<: {a: 1}\nb: 2\n", "a: =\n", "[a]: b\n", "? - a\n: b\n", "a: !!str 1\n", "a: !x 1\n",
    "a: 1\n  b: 2\n", "a:\n  b: 1\n c: 2\n", "a: 'x\n", "\ufeffa: yes\n", "a: b\x85c: yes\n", "a: b\r\nc: on\r\n",
    "a: 1\n...\n", "%YAML 1.1\n---\na: on\n", "a: b\u2028c: on\n", "a:\n- 1:20\n", "a: 2001-12-14\n  21:59:43\n",
    "a: yes # comment\n", "a: 80 #c\n", "a: 80#c\n", "- - - 0777\n", "a: \tyes\n", "a:\tyes\n", "1:20: x\n",
    "a: 12345678901234567890\n", "a: 1e3\nb: 0o17\nc: .inf\nd: 1.0\n", "x: [1, yes, 0777]\n", "x: {a: on}\n",
    # a List's items, parsed in chunks: where the split is not what it seems
    "items:\n- a: x\n- b\nkind: List\n", 'items:\n- a: "x\n- y"\n', "items:\n- a: 'x\n- y\nz'\n- b\n",
    'a: "x\nitems:\n- q\nb: y"\n', 'items: []\nz: "\nitems:\n- a\n"\n', "items:\n- a\nitems:\n- b\n",
    "items:\n- a\n---\nb: c\n", "items:\n- a\n  - b\n-x\n", "items:\n- |\n  x\n- y\n# c\n- z\n", "--- |\nitems:\n- a\n",
    "items:\n- a\n\n- b: c\n    d\nkind-placeholder: kproxy-nft-items-placeholder\n", "items:\n- a: b\n  a: c\n- a\n",
    'items: kproxy-nft-items-placeholder\nz: "\nitems:\n- a\n"\n',  # the placeholder, written by hand
])
def test_examples(text: str) -> None:
    assert_same(text)


def test_aliases_stay_shared() -> None:
    """PyYAML makes an alias the very object its anchor names; oryaml copies it (so it is not used)."""
    [doc] = lean_yaml_load("a: &x [1]\nb: *x\n")
    assert doc["a"] is doc["b"]


KUBECTL_LIST = """apiVersion: v1
items:
- apiVersion: v1
  kind: Service
  metadata:
    annotations:
      note: words, a comma and a colon:here
    creationTimestamp: "2024-05-01T10:00:00Z"
    labels:
      app.kubernetes.io/name: web
      component: apiserver
    name: kubernetes
    namespace: default
    resourceVersion: "234"
    uid: 6b7e0f4c-2f0e-4c7a-9f0e-1b2c3d4e5f60
  spec:
    clusterIP: 10.96.0.1
    clusterIPs:
    - 10.96.0.1
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    ipFamilyPolicy: SingleStack
    ports:
    - name: https
      port: 443
      protocol: TCP
      targetPort: 6443
    sessionAffinity: None
    type: ClusterIP
  status:
    loadBalancer: {}
- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
  endpoints:
  - addresses:
    - 172.18.0.2
    conditions:
      ready: true
      serving: true
      terminating: false
    nodeName: kind-control-plane
    zone: zone-a
  kind: EndpointSlice
  metadata:
    creationTimestamp: "2024-05-01T10:00:00Z"
    generation: 1
    labels:
      kubernetes.io/service-name: kubernetes
    name: kubernetes
    namespace: default
    ownerReferences: []
  ports:
  - name: https
    port: 6443
    protocol: TCP
kind: List
metadata:
  resourceVersion: ""
"""


def test_kubectl_and_pyyaml_output_take_the_fast_path() -> None:
    """What clusters are dumped as must not be flagged: else the speed is gone, silently."""
    from kproxy_nft.lab.synthetic import synthetic_objects

    dumped = yaml.dump(synthetic_objects(20, 3), Dumper=yaml.CSafeDumper)  # as bench/bench_ingest.py writes it
    for text in (KUBECTL_LIST, dumped):
        assert not yaml_fast.risky(text), text
        assert yaml_fast.load(text) is not None
        assert_same(text)


@pytest.mark.parametrize(("text", "why"), [
    ("a: yes\n", "a 1.1 boolean"), ("a: 0777\n", "a 1.1 octal"), ("a: 1:20\n", "sexagesimal"),
    ("a: 1e3\n", "a 1.2 float"), ("a: 2001-12-14\n", "a date"), ("<<: {}\n", "a merge key"),
    ("a: =\n", "the value tag"), ("a: &x 1\n", "an anchor"), ("a: !!str 1\n", "a tag"), ("a: [1]\n", "flow"),
    ("? a\n: b\n", "a complex key"), ("on: 1\n", "a boolean key"), ("yes\n", "the first token"),
    ("a: b\x85yes: 1\n", "a NEL"), ("- - 0o17\n", "nested items"), ("a: 1_000 # c\n", "before a comment"),
])
def test_risky_tokens_are_flagged(text: str, why: str) -> None:
    assert yaml_fast.risky(text), why
