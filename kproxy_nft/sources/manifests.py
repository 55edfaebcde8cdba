"""Read Kubernetes manifests (YAML/JSON files, directories, stdin) into validated objects.

Accepts what people actually have: multi-document YAML, JSON, `kind: List` as
`kubectl get -o yaml` prints it, directories searched recursively for `*.yaml|*.yml|*.json`,
and `-` for stdin. Services, EndpointSlices (discovery.k8s.io/v1), legacy Endpoints (v1,
converted to slices), ServiceCIDRs (networking.k8s.io/v1, their CIDRs) and Nodes (v1: the
proxy uses its own node's addresses, zone, podCIDRs and deletion state) are kept; other kinds
are skipped with a notice.

Every problem becomes a `ManifestError` whose one-line message names the file, the document
index (1-based, as a reader counts) and the field, e.g.
`examples/bad.yaml: document 2 (Service default/web): spec.ports[0].port: must be between 1
and 65535, inclusive, got 70000`. Names and values from the input are quoted and cut
(`validation.shown`), so the message stays one bounded line whatever the file holds.

By default the first problem is raised and nothing half-read is ever returned (`dump`,
`apply`: all or nothing). With `on_error` (the agent's `--manifests`), each bad document or
unreadable file is reported there and skipped, and the rest is returned. An object bigger than
the API server can store (`MAX_OBJECT_BYTES`) is refused as such.

The reading is fast at cluster scale (issue 14): msgspec decodes JSON, libyaml's events are
built straight into objects (`slim.lean_yaml_load`), and each object becomes a slotted msgspec
Struct checked against the client's schema in C (`slim.to_struct`), converted to the model once
(`Manifests.converted_*`). Where msgspec cannot judge an object, the client's pydantic model
does, so acceptance and messages are the old path's; `fast=False` is that old path, kept for
tests/test_ingest_equivalence.py, which proves both read alike.
"""

from __future__ import annotations

import gc
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgspec
import pydantic
import yaml
from kubernetes.client import V1EndpointSlice, V1Node, V1Service

from kproxy_nft.conflicts import resolve
from kproxy_nft.convert import (
    EndpointsByPort,
    InvalidObject,
    ServiceInfo,
    build_state,
    convert_endpoint_slice,
    convert_node,
    convert_service,
    convert_service_cidr,
    endpoints_to_slice,
)
from kproxy_nft.model import ClusterState
from kproxy_nft.report import one_line
from kproxy_nft.sources import slim
from kproxy_nft.validation import shown

try:  # libyaml's C loader is ~10x faster on large clusters; fall back where it is missing.
    from yaml import CSafeLoader as YamlLoader
except ImportError:  # pragma: no cover - depends on how PyYAML was built
    from yaml import SafeLoader as YamlLoader  # type: ignore[assignment]

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
MAX_YAML_ALIASES = 100
# No object the API server stores is bigger: etcd refuses a request above its default
# --max-request-bytes of 1.5 MiB (etcd.io/docs, dev-guide/limit; the API server itself takes
# request bodies up to 3 MiB, `MaxRequestBodyBytes` in k8s.io/apiserver, to allow for JSON
# over protobuf). Measured as compact JSON, so a manifest's indentation does not count.
MAX_OBJECT_BYTES = 1536 * 1024

# (apiVersion, kind) → the client's model class; anything else is skipped with a notice.
_KINDS = slim.KINDS
_CLUSTER_SCOPED = ("Node", "ServiceCIDR")  # named without a namespace in messages


class ManifestError(ValueError):
    """A manifest that cannot be used; the message is one line naming file, document and field.

    `source` is the file (`<stdin>` for standard input), `kind` the object's kind when the
    problem is one document's ("" for a file that cannot be read or parsed).
    """

    def __init__(self, message: str, source: str = "", kind: str = "") -> None:
        # Parts of a message come from the input (a key, a parser's excerpt): one line, whatever they hold.
        super().__init__(one_line(message))
        self.source = source
        self.kind = kind


@dataclass(frozen=True)
class Document:
    """One object from a manifest, with where it came from (for error messages)."""

    source: str
    index: int  # 1-based position of the YAML document in its file
    obj: dict[str, Any]

    @property
    def kind(self) -> str:
        kind = self.obj.get("kind")
        return kind if isinstance(kind, str) else ""

    def describe(self) -> str:
        meta = self.obj.get("metadata") if isinstance(self.obj.get("metadata"), dict) else {}
        assert isinstance(meta, dict)
        name = _plain(meta.get("name", "?"))
        if self.kind not in _CLUSTER_SCOPED:
            name = f"{_plain(meta.get('namespace') or 'default')}/{name}"
        return f"{self.source}: document {self.index} ({_plain(self.kind or 'object')} {name})"

    def error(self, message: str) -> ManifestError:
        """A problem with this document, as a one-line `ManifestError`."""
        return ManifestError(f"{self.describe()}: {message}", self.source, self.kind)


def _plain(value: object) -> str:
    """A name as a message shows it: as is when it is plain text, else quoted and cut."""
    if not isinstance(value, str):
        return f"<{type(value).__name__}>"  # never repr() a structure: it may be nested 1,000 deep
    if value.isprintable() and " " not in value and len(value) <= 253:
        return value
    return shown(value)


@contextmanager
def no_cyclic_gc() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while building many objects that form no cycles.

    Every object read is tracked, and the collections that allocating them triggers scan them all
    again and again: at 10k Services × 10 endpoints, half the time of reading and of building the
    state (issue 14). What is built here holds no cycles, so collecting afterwards loses nothing;
    reference counting frees garbage meanwhile as always. Nested or concurrent uses are fine: only
    the outermost one that found the collector on turns it back on.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass(frozen=True)
class Manifests:
    """What a set of manifest paths holds: typed objects plus notices about skipped ones.

    The objects are the slim Structs of `slim` (the client's attribute names), or the client's
    models where msgspec could not judge one; `converted_*` are their models, converted once
    while reading (None: convert on demand). Read with `keep_objects=False`, `services` and
    `endpoint_slices` are empty: only their models are kept.
    """

    services: tuple[V1Service, ...]
    endpoint_slices: tuple[V1EndpointSlice, ...]
    notices: tuple[str, ...]
    service_cidrs: tuple[str, ...] = ()  # of every ServiceCIDR, in reading order, no duplicates
    nodes: tuple[V1Node, ...] = ()
    converted_services: tuple[ServiceInfo, ...] | None = field(default=None, compare=False, repr=False)
    converted_slices: tuple[EndpointsByPort, ...] | None = field(default=None, compare=False, repr=False)

    def node(self, name: str) -> V1Node | None:
        """The Node object named `name` (this node's), the last one read if several are."""
        return next((node for node in reversed(self.nodes) if node.metadata and node.metadata.name == name), None)

    def cluster_state(self, warn: Callable[[str], None] | None = None) -> ClusterState:
        """The proxy's view of these objects (see `convert.build_state`), as it is programmed:
        a destination two service ports claim goes to one of them (`conflicts.resolve`), and
        each such conflict is passed to `warn`."""
        with no_cyclic_gc():
            state, found = resolve(build_state(self.service_infos(), self.slice_endpoints()))
        for conflict in found:
            if warn is not None:
                warn(str(conflict))
        return state

    def service_infos(self) -> tuple[ServiceInfo, ...]:
        if self.converted_services is not None:
            return self.converted_services
        return tuple(convert_service(s) for s in self.services)

    def slice_endpoints(self) -> tuple[EndpointsByPort, ...]:
        if self.converted_slices is not None:
            return self.converted_slices
        return tuple(convert_endpoint_slice(s) for s in self.endpoint_slices)


def expand_paths(paths: Sequence[str]) -> list[str]:
    """Files named directly, plus manifests found recursively in named directories (sorted)."""
    files: list[str] = []
    for path in paths:
        p = Path(path)
        if path != "-" and p.is_dir():
            files.extend(str(f) for f in sorted(p.rglob("*")) if f.suffix in MANIFEST_SUFFIXES and f.is_file())
        else:
            files.append(path)
    return files


def _read_text(path: str, stdin: IO[str]) -> str | bytes:
    """A file's text; for a `.json` file of plain ASCII lines (what kubectl writes), its bytes.

    msgspec reads such bytes as they are: decoding a 90 MB cluster to a str first took 0.05 s
    of a 10k-Service `dump` (issue 14). Only bytes that are that very text are kept (no `\\r`,
    which text mode would turn into `\\n`); `read_file` decodes them if it needs a str.
    """
    if path == "-":
        return stdin.read()
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ManifestError(f"{path}: cannot read: {e.strerror or e}", path) from None
    if path.endswith(".json") and data.isascii() and b"\r" not in data:
        return data
    try:
        return _universal_newlines(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not UTF-8 text", path) from None


def _universal_newlines(text: str) -> str:
    """The text as a file opened in text mode reads it: `\\r\\n` and `\\r` become `\\n`."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _syntax_error(source: str, error: Exception) -> ManifestError:
    """A JSON or YAML error as one line: where (when the parser knows), and what."""
    fmt = "JSON" if source.endswith(".json") else "YAML"
    if isinstance(error, RecursionError):
        return ManifestError(f"{source}: malformed {fmt}: nested too deeply", source)
    mark = getattr(error, "problem_mark", None)
    if mark is not None:
        where = f": line {mark.line + 1} column {mark.column + 1}"
    elif isinstance(error, json.JSONDecodeError):
        where = f": line {error.lineno} column {error.colno}"
    elif isinstance(error, yaml.reader.ReaderError):
        where = f": position {error.position + 1}"
    else:
        where = ""
    if isinstance(error, yaml.reader.ReaderError):
        character = error.character
        problem = f"{error.reason} (character #x{character:04x})" if isinstance(character, int) else error.reason
    elif isinstance(error, json.JSONDecodeError):
        problem = error.msg
    else:
        problem = getattr(error, "problem", None) or str(error)
    return ManifestError(f"{source}{where}: malformed {fmt}: {' '.join(str(problem).split())[:200]}", source)


def _check_aliases(text: str, source: str) -> None:
    """Refuse YAML that leans on aliases: a few kB of `*alias` can expand to millions of objects
    (the API server's decoder refuses such "excessive aliasing" too). Only texts that define an
    anchor are scanned, so ordinary manifests pay nothing."""
    if "&" not in text or "*" not in text:
        return
    aliases = sum(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=YamlLoader))
    if aliases > MAX_YAML_ALIASES:
        raise ManifestError(f"{source}: malformed YAML: {aliases} aliases (at most {MAX_YAML_ALIASES}: "
                            "aliases can expand a small file into millions of objects)", source)


def _decode_json(text: str, fast: bool) -> Any:
    """msgspec's decoder gives what `json.loads` gives, 3x faster; where it refuses (NaN, a lone
    surrogate, a syntax error) `json.loads` decides, so acceptance and messages stay the stdlib's."""
    if fast:
        try:
            return msgspec.json.decode(text)
        except (msgspec.DecodeError, RecursionError, ValueError):
            pass
    return json.loads(text)


def parse_documents(text: str, source: str, fast: bool = True) -> Iterator[Document]:
    """The objects in one file's text; `kind: List` items become documents of their own.

    `fast`: msgspec for JSON and `slim.lean_yaml_load` for YAML (the same objects, faster).
    """
    try:
        if source.endswith(".json"):
            raw: Iterable[Any] = [_decode_json(text, fast)]
        else:
            _check_aliases(text, source)
            raw = slim.lean_yaml_load(text) if fast else list(yaml.load_all(text, Loader=YamlLoader))
    except ManifestError:
        raise
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        # ValueError: also an integer of more than 4,300 digits (Python's conversion limit).
        raise _syntax_error(source, e) from None
    for index, obj in enumerate(raw, start=1):
        if obj is None:
            continue  # an empty document (a stray `---`)
        if not isinstance(obj, dict):
            raise ManifestError(f"{source}: document {index}: expected a mapping, got {type(obj).__name__}", source)
        kind: str = obj["kind"] if isinstance(obj.get("kind"), str) else ""
        if kind == "List" or (kind.endswith("List") and "items" in obj):
            items = obj.get("items") or []
            if not isinstance(items, list):
                raise ManifestError(f"{source}: document {index}: items: expected a list", source)
            for item_no, item in enumerate(items):
                yield _list_item(source, index, obj, item_no, item)
                items[item_no] = None  # read: free it (a cluster's decoded items are most of the peak)
        else:
            yield Document(source, index, obj)


def _list_item(source: str, index: int, listing: dict[str, Any], item_no: int, item: Any) -> Document:
    """Item `item_no` of the list `listing` (document `index`) as a document of its own."""
    if not isinstance(item, dict):
        raise ManifestError(f"{source}: document {index}: items[{item_no}]: expected a mapping", source)
    item = dict(item)
    kind = listing["kind"]
    if "kind" not in item and kind != "List":  # kubectl's typed lists (ServiceList) omit kind/apiVersion on items
        item["kind"] = kind[: -len("List")]
        item.setdefault("apiVersion", listing.get("apiVersion"))
    return Document(source, index, item)


def _pydantic_field(loc: tuple[int | str, ...]) -> str:
    """`('spec', 'ports', 1, 'port')` → `spec.ports[1].port` (dropping union type tags)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("int", "str", "float", "bool") or "[" in part:
            break  # pydantic names the union member it tried; not a field
        else:
            part = _plain(part)
            out += f".{part}" if out else part
    return out or "(document)"


# What one kept document gives: its object, and its model (ServiceInfo, EndpointsByPort or the
# ServiceCIDR's CIDRs; for a Node, the object alone: which node is ours is decided later).
Loaded = tuple[Any, Any]


def _kind_key(doc: Document) -> tuple[str, str] | None:
    """(apiVersion, kind) of a document we keep, or None for one we skip."""
    api_version, kind = doc.obj.get("apiVersion"), doc.obj.get("kind")
    for name, value in (("apiVersion", api_version), ("kind", kind)):
        if value is not None and not isinstance(value, str):
            raise doc.error(f"{name}: must be a string, got a {type(value).__name__}")
    key = (api_version, kind)
    return key if key in _KINDS else None


def _client_model(doc: Document, key: tuple[str, str]) -> Any:
    """The old way: the client's pydantic model, whose messages `read_manifests` reports."""
    try:
        return _KINDS[key].model_validate(doc.obj)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        raise doc.error(f"{_pydantic_field(err['loc'])}: {err['msg']}") from None
    except RecursionError:
        raise doc.error("nested too deeply") from None


def _check_size(doc: Document) -> None:
    """Refuse an object the API server could not hold (`MAX_OBJECT_BYTES`), on both paths."""
    try:
        size = len(msgspec.json.encode(doc.obj))
    except (msgspec.EncodeError, TypeError, ValueError, OverflowError, RecursionError):
        return  # not JSON at all (a YAML set, a key that is a number): the schema refuses it
    if size > MAX_OBJECT_BYTES:
        raise doc.error(f"{size / 2**20:.1f} MiB as JSON, above the 1.5 MiB the API server can store "
                        "(etcd's --max-request-bytes): refused")


def _slim_or_client_model(doc: Document, key: tuple[str, str]) -> Any:
    """The slim Struct; where msgspec cannot judge (`slim.Unsure`), the client's model decides,
    from the very same decoded document (the fast decoders give what the old ones gave)."""
    try:
        return slim.to_struct(key, doc.obj)
    except slim.Unsure:
        return _client_model(doc, key)


def load_document(doc: Document, fast: bool = False) -> Loaded | None:
    """The typed object of a document and its model, or None for a kind we skip.

    `fast`: the slim Struct (`slim.to_struct`), or the client's model where only it can tell;
    else the client's model. Either is converted the same way.
    """
    key = _kind_key(doc)
    if key is None:
        return None
    _check_size(doc)
    obj = _slim_or_client_model(doc, key) if fast else _client_model(doc, key)
    try:
        return _converted(obj, key[1])
    except InvalidObject as e:
        raise doc.error(str(e)) from None


def _converted(obj: Any, kind: str) -> Loaded:
    """A typed object of a kind we keep, and its model (raises InvalidObject)."""
    if kind == "Service":
        return obj, convert_service(obj)
    if kind == "ServiceCIDR":
        return obj, convert_service_cidr(obj)
    if kind == "Node":
        convert_node(obj, strict=True)
        return obj, None
    if kind == "Endpoints":
        obj = endpoints_to_slice(obj)
    return obj, convert_endpoint_slice(obj)


# One file's outcome, in document order: a kept document (its kind and what it gave), a notice,
# or a problem. Not the Document: its decoded dict is let go once read.
Outcome = tuple[str, Loaded] | str | ManifestError


def _document_outcomes(doc: Document, fast: bool) -> list[Outcome]:
    """What one document gives: itself read (and notices about it), a notice, or a problem."""
    try:
        loaded = load_document(doc, fast)
    except ManifestError as e:
        return [e]
    if loaded is None:
        kind = f"{_plain(doc.obj.get('apiVersion'))}/{_plain(doc.obj.get('kind'))}"
        hint = " (pass it with --config)" if doc.kind == "KubeProxyConfiguration" else ""
        return [f"{doc.describe()}: skipped: kind {kind} is not used here{hint}"]
    return [(doc.kind, loaded), *(
        f"{doc.describe()}: ports[{i}]: ignored: no name (kube-proxy skips it; write name: \"\" for an unnamed "
        "Service port)" for i in _unnamed_ports(doc.kind, loaded[0]))]


def _unnamed_ports(kind: str, obj: Any) -> list[int]:
    """The slice ports kube-proxy ignores for want of a name (the reader says so)."""
    if kind not in ("EndpointSlice", "Endpoints"):
        return []
    return [i for i, port in enumerate(obj.ports or []) if port.name is None]


class _NotPlain(Exception):
    """A JSON `List` item msgspec cannot decode: the file is decoded whole instead."""


def _json_item_outcomes(item: msgspec.Raw, item_no: int, source: str) -> list[Outcome]:
    """`_document_outcomes` of one JSON `List` item, straight from its text to its Struct.

    Anything but a plain valid object of a kind we keep (a skipped kind, an object msgspec or
    the rules refuse, a slice port without a name) is decoded to a dict and read as a document,
    so every message and notice is the document path's.
    """
    key = slim.json_kind(item)
    try:
        # Compact JSON is never longer than this text, so a short one passes `_check_size`.
        if key is not None and len(item) <= MAX_OBJECT_BYTES:
            try:
                loaded = _converted(slim.struct_from_json(key, item), key[1])
                if not _unnamed_ports(key[1], loaded[0]):
                    return [(key[1], loaded)]
            except (slim.Unsure, InvalidObject):
                pass  # the document path below: the client's model decides, the message names the object
        obj = msgspec.json.decode(item)
    except (msgspec.DecodeError, RecursionError):
        raise _NotPlain from None
    return _document_outcomes(_list_item(source, 1, {"kind": "List"}, item_no, obj), fast=True)


def read_file(text: str | bytes, source: str, fast: bool = True, keep_objects: bool = True) -> list[Outcome]:
    """Every document of one file's text, read (raises ManifestError when the file cannot be parsed).

    `fast` reads a JSON `List` item by item, from text to Struct (`slim.json_list_items`).
    `text` may be the bytes of an ASCII text (`_read_text`). Without `keep_objects`, a Service's
    or EndpointSlice's outcome holds its model only (see `_without_object`).
    """
    kept = _as_is if keep_objects else _without_object
    items = slim.json_list_items(text) if fast and source.endswith(".json") else None
    if items is not None:
        try:
            return [kept(outcome) for item_no, item in enumerate(items)
                    for outcome in _json_item_outcomes(item, item_no, source)]
        except _NotPlain:
            pass
    if isinstance(text, bytes):
        text = text.decode("ascii")
    return [kept(outcome) for doc in parse_documents(text, source, fast) for outcome in _document_outcomes(doc, fast)]


def _as_is(outcome: Outcome) -> Outcome:
    return outcome


def _without_object(outcome: Outcome) -> Outcome:
    """A Service's or EndpointSlice's outcome without its typed object, once its model is made:
    kept until the whole file was read, the objects of a 10k-Service cluster were ~100 MB of a
    `dump`'s 370 MB peak, which only needs their models (issue 14)."""
    if isinstance(outcome, tuple) and outcome[0] in ("Service", "EndpointSlice", "Endpoints"):
        kind, (_, model) = outcome
        return kind, (None, model)
    return outcome


def read_manifests(
    paths: Sequence[str], stdin: IO[str] | None = None, *,
    on_error: Callable[[ManifestError], None] | None = None, fast: bool = True, keep_objects: bool = True,
) -> Manifests:
    """Read and validate every manifest under `paths`.

    Without `on_error`, the first problem raises ManifestError. With it, each problem is passed
    to `on_error` instead and skipped: a bad document alone, or a whole file that cannot be
    read or parsed (none of its documents is returned then). `fast=False` reads the old way,
    through the client's pydantic models (for the equivalence tests). `keep_objects=False`
    keeps only the models of Services and EndpointSlices (`Manifests.converted_*`), for callers
    that need nothing else of them (`dump`, `apply`).
    """
    kept: dict[str, list[Any]] = {"Service": [], "EndpointSlice": [], "Node": []}
    models: dict[str, list[Any]] = {"Service": [], "EndpointSlice": []}
    cidrs: list[str] = []
    notices: list[str] = []

    def problem(error: ManifestError) -> None:
        if on_error is None:
            raise error
        on_error(error)

    with no_cyclic_gc():
        for path in expand_paths(paths):
            source = "<stdin>" if path == "-" else path
            try:
                outcomes = read_file(_read_text(path, stdin or sys.stdin), source, fast, keep_objects)
            except ManifestError as e:
                problem(e)
                continue
            for outcome in outcomes:
                if isinstance(outcome, ManifestError):
                    problem(outcome)
                elif isinstance(outcome, str):
                    notices.append(outcome)
                else:
                    kind, (obj, model) = outcome
                    kind = "EndpointSlice" if kind == "Endpoints" else kind
                    if kind == "ServiceCIDR":
                        cidrs.extend(model)
                        continue
                    if obj is not None:
                        kept[kind].append(obj)
                    if kind in models:
                        models[kind].append(model)
    return Manifests(
        tuple(kept["Service"]), tuple(kept["EndpointSlice"]), tuple(notices), tuple(dict.fromkeys(cidrs)),
        tuple(kept["Node"]), converted_services=tuple(models["Service"]),
        converted_slices=tuple(models["EndpointSlice"]),
    )
