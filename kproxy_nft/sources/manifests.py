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
unreadable file is reported there and skipped, and the rest is returned.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pydantic
import yaml
from kubernetes.client import V1Endpoints, V1EndpointSlice, V1Node, V1Service, V1ServiceCIDR

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
from kproxy_nft.validation import shown

try:  # libyaml's C loader is ~10x faster on large clusters; fall back where it is missing.
    from yaml import CSafeLoader as YamlLoader
except ImportError:  # pragma: no cover - depends on how PyYAML was built
    from yaml import SafeLoader as YamlLoader  # type: ignore[assignment]

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
MAX_YAML_ALIASES = 100

# (apiVersion, kind) → the client's model class; anything else is skipped with a notice.
_KINDS: dict[tuple[str, str], Any] = {
    ("v1", "Service"): V1Service,
    ("discovery.k8s.io/v1", "EndpointSlice"): V1EndpointSlice,
    ("v1", "Endpoints"): V1Endpoints,
    ("networking.k8s.io/v1", "ServiceCIDR"): V1ServiceCIDR,
    ("v1", "Node"): V1Node,
}
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


@dataclass(frozen=True)
class Manifests:
    """What a set of manifest paths holds: typed objects plus notices about skipped ones."""

    services: tuple[V1Service, ...]
    endpoint_slices: tuple[V1EndpointSlice, ...]
    notices: tuple[str, ...]
    service_cidrs: tuple[str, ...] = ()  # of every ServiceCIDR, in reading order, no duplicates
    nodes: tuple[V1Node, ...] = ()

    def node(self, name: str) -> V1Node | None:
        """The Node object named `name` (this node's), the last one read if several are."""
        return next((node for node in reversed(self.nodes) if node.metadata and node.metadata.name == name), None)

    def cluster_state(self, warn: Callable[[str], None] | None = None) -> ClusterState:
        """The proxy's view of these objects (see `convert.build_state`), as it is programmed:
        a destination two service ports claim goes to one of them (`conflicts.resolve`), and
        each such conflict is passed to `warn`."""
        state, found = resolve(build_state(self.service_infos(), self.slice_endpoints()))
        for conflict in found:
            if warn is not None:
                warn(str(conflict))
        return state

    def service_infos(self) -> tuple[ServiceInfo, ...]:
        return tuple(convert_service(s) for s in self.services)

    def slice_endpoints(self) -> tuple[EndpointsByPort, ...]:
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


def _read_text(path: str, stdin: IO[str]) -> str:
    if path == "-":
        return stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ManifestError(f"{path}: cannot read: {e.strerror or e}", path) from None
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not UTF-8 text", path) from None


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


def parse_documents(text: str, source: str) -> Iterator[Document]:
    """The objects in one file's text; `kind: List` items become documents of their own."""
    try:
        if source.endswith(".json"):
            raw: Iterable[Any] = [json.loads(text)]
        else:
            _check_aliases(text, source)
            raw = list(yaml.load_all(text, Loader=YamlLoader))
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
                if not isinstance(item, dict):
                    raise ManifestError(f"{source}: document {index}: items[{item_no}]: expected a mapping", source)
                # kubectl's typed lists (ServiceList) omit kind/apiVersion on items.
                item = dict(item)
                if "kind" not in item and kind != "List":
                    item["kind"] = kind[: -len("List")]
                    item.setdefault("apiVersion", obj.get("apiVersion"))
                yield Document(source, index, item)
        else:
            yield Document(source, index, obj)


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


def load_document(doc: Document) -> Any | None:
    """The typed client model of a document, or None for a kind we skip."""
    api_version, kind = doc.obj.get("apiVersion"), doc.obj.get("kind")
    for field, value in (("apiVersion", api_version), ("kind", kind)):
        if value is not None and not isinstance(value, str):
            raise doc.error(f"{field}: must be a string, got a {type(value).__name__}")
    cls = _KINDS.get((api_version, kind))  # type: ignore[arg-type]
    if cls is None:
        return None
    try:
        obj = cls.model_validate(doc.obj)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        raise doc.error(f"{_pydantic_field(err['loc'])}: {err['msg']}") from None
    except RecursionError:
        raise doc.error("nested too deeply") from None
    try:
        if kind == "Service":
            convert_service(obj)
        elif kind == "EndpointSlice":
            convert_endpoint_slice(obj)
        elif kind == "ServiceCIDR":
            convert_service_cidr(obj)
        elif kind == "Node":
            convert_node(obj, strict=True)
        else:
            obj = endpoints_to_slice(obj)
            convert_endpoint_slice(obj)
    except InvalidObject as e:
        raise doc.error(str(e)) from None
    return obj


def read_manifests(
    paths: Sequence[str], stdin: IO[str] | None = None, *, on_error: Callable[[ManifestError], None] | None = None
) -> Manifests:
    """Read and validate every manifest under `paths`.

    Without `on_error`, the first problem raises ManifestError. With it, each problem is passed
    to `on_error` instead and skipped: a bad document alone, or a whole file that cannot be
    read or parsed (none of its documents is returned then).
    """
    services: list[V1Service] = []
    slices: list[V1EndpointSlice] = []
    cidrs: list[str] = []
    nodes: list[V1Node] = []
    notices: list[str] = []

    def problem(error: ManifestError) -> None:
        if on_error is None:
            raise error
        on_error(error)

    for path in expand_paths(paths):
        source = "<stdin>" if path == "-" else path
        try:
            documents = list(parse_documents(_read_text(path, stdin or sys.stdin), source))
        except ManifestError as e:
            problem(e)
            continue
        for doc in documents:
            try:
                obj = load_document(doc)
            except ManifestError as e:
                problem(e)
                continue
            if obj is None:
                kind = f"{_plain(doc.obj.get('apiVersion'))}/{_plain(doc.obj.get('kind'))}"
                hint = " (pass it with --config)" if doc.kind == "KubeProxyConfiguration" else ""
                notices.append(f"{doc.describe()}: skipped: kind {kind} is not used here{hint}")
                continue
            if isinstance(obj, V1EndpointSlice):
                notices.extend(f"{doc.describe()}: ports[{i}]: ignored: no name (kube-proxy skips it; "
                               'write name: "" for an unnamed Service port)'
                               for i, port in enumerate(obj.ports or []) if port.name is None)
            if isinstance(obj, V1Service):
                services.append(obj)
            elif isinstance(obj, V1ServiceCIDR):
                cidrs.extend(convert_service_cidr(obj))
            elif isinstance(obj, V1Node):
                nodes.append(obj)
            else:
                slices.append(obj)
    return Manifests(tuple(services), tuple(slices), tuple(notices), tuple(dict.fromkeys(cidrs)), tuple(nodes))
