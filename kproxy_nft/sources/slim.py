"""The fast path from manifest text to slim typed objects, checked as strictly as the client's models.

`read_manifests` used to validate every object with the official client's pydantic models
(`V1Service.model_validate`): at 10,000 Services × 10 endpoints that, with PyYAML's Python
constructor, was most of `dump`'s 12-16 s (issue 14). Here the same schema is checked in C:

* `STRUCTS`: a msgspec `Struct` per client model class, generated from the pydantic models'
  own fields (attribute names, JSON names, types), so the attribute names match the client's
  (`spec.cluster_ip`, `ep.node_name`) and `convert.py` reads both alike. Like the client's
  models they refuse unknown fields and accept only exact types (`StrictStr`, `StrictInt`);
  times are parsed by msgspec (RFC 3339). They are slotted: no `__dict__`, no pydantic
  machinery per object.
* `to_struct`: a decoded document → its Struct, or `Unsure` when msgspec refuses it;
  `json_list_items` + `struct_from_json`: a JSON `List`'s items from their text to Structs with
  no dict in between; `api_list` and `watch_event`: the same for the API's list responses and
  watch events (the agent's reflectors).

msgspec is stricter than pydantic in a few corners (a field spelled in snake_case, which the
client also accepts; a timestamp in a format only pydantic parses; an integer too large for
64 bits). It never accepts what pydantic refuses, and never changes a value. So an `Unsure`
document is not an error: the caller hands the same decoded document to the client's model,
which gives the old result or the old message. Errors are rare; clusters are large.

`lean_yaml_load`: the same objects as `CSafeLoader` builds, by the fastest path that cannot
differ: `yaml_fast` (libyaml's parser translated to Rust, building objects in Rust, for a text
whose every plain scalar resolves alike under YAML 1.1 and 1.2), else libyaml's events built
straight into dicts and lists (resolution of repeated scalars cached), else, for anything
unusual (tags other than the standard ones, merge keys, anchors) and errors, `CSafeLoader`.
"""

from __future__ import annotations

import datetime
import types
import typing
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

import msgspec
import pydantic
import yaml
from kubernetes.client import V1Endpoints, V1EndpointSlice, V1Node, V1Service, V1ServiceCIDR

from kproxy_nft.sources import yaml_fast

try:  # libyaml's C parser; without it there is nothing to speed up
    from yaml import CSafeLoader as YamlLoader
except ImportError:  # pragma: no cover - depends on how PyYAML was built
    from yaml import SafeLoader as YamlLoader  # type: ignore[assignment]

__all__ = ["KINDS", "STRUCTS", "Unsure", "api_item", "api_list", "api_list_page", "json_kind", "json_list_items",
           "lean_yaml_load", "struct_from_json", "to_struct", "watch_event"]


class Unsure(Exception):
    """msgspec refused a document: only the client's models can say whether and why (see module doc)."""


def _field_type(annotation: Any, metadata: list[Any], make: Callable[[type[pydantic.BaseModel]], Any]) -> Any:
    """The msgspec type of one pydantic field annotation (strict scalars only; see module doc)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _field_type(args[0], [*metadata, *args[1:]], make)
    if origin in (typing.Union, types.UnionType):
        members = [_field_type(a, metadata, make) for a in args]
        out = members[0]
        for member in members[1:]:
            out = out | member
        return out
    if origin is list:
        return list[_field_type(args[0], [], make)]  # type: ignore[misc]
    if origin is dict:
        return dict[str, _field_type(args[1], [], make)]  # type: ignore[misc]
    if annotation is type(None) or annotation is Any:
        return annotation
    if annotation is datetime.datetime:
        # msgspec parses RFC 3339 (and takes YAML's datetimes); every time it accepts, pydantic does.
        return datetime.datetime
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return make(annotation)
    if annotation in (str, int, bool):
        # Only strict scalars map to msgspec's exact types; a lax one would need pydantic's coercions.
        if not any(getattr(m, "strict", False) for m in metadata):
            raise TypeError(f"non-strict {annotation.__name__} in the client's schema")
        return annotation
    raise TypeError(f"unexpected type in the client's schema: {annotation!r}")


def _structs(roots: tuple[type[pydantic.BaseModel], ...]) -> dict[type[pydantic.BaseModel], Any]:
    """A msgspec Struct for each client model reachable from `roots` (generated once, at import)."""
    made: dict[type[pydantic.BaseModel], Any] = {}

    def make(model: type[pydantic.BaseModel]) -> Any:
        if model in made:
            return made[model]
        decorators = model.__pydantic_decorators__
        if decorators.field_validators or decorators.model_validators:
            raise TypeError(f"{model.__name__} has validators of its own; its Struct would not check them")
        made[model] = None  # the client's schema has no recursive models; this would show one
        fields, names = [], {}
        for attr, info in model.model_fields.items():
            kind = _field_type(info.annotation, list(info.metadata), make)
            alias = info.validation_alias
            json_name = alias.choices[0] if isinstance(alias, pydantic.AliasChoices) else (info.alias or attr)
            if not isinstance(json_name, str):
                raise TypeError(f"{model.__name__}.{attr}: an alias path, not a name")
            names[attr] = json_name
            fields.append((attr, kind) if info.is_required() else (attr, kind, info.default))
        # gc=False: decoded documents are trees, never cycles, so the cyclic collector need not
        # track (and scan again and again while compiling) the 100,000s of Structs of a cluster.
        made[model] = msgspec.defstruct(
            f"Slim{model.__name__}", fields, kw_only=True, forbid_unknown_fields=True, rename=names,
            omit_defaults=True, bases=(_SlimBase,), gc=False,
        )
        return made[model]

    for root in roots:
        make(root)
    return made


class _SlimBase(msgspec.Struct):
    """What the client's models offer that callers use: `to_dict()` (camelCase keys)."""

    def to_dict(self) -> Any:
        return msgspec.to_builtins(self)


# (apiVersion, kind) → the client's model class, and its generated Struct.
KINDS: dict[tuple[str, str], type[pydantic.BaseModel]] = {
    ("v1", "Service"): V1Service,
    ("discovery.k8s.io/v1", "EndpointSlice"): V1EndpointSlice,
    ("v1", "Endpoints"): V1Endpoints,
    ("networking.k8s.io/v1", "ServiceCIDR"): V1ServiceCIDR,
    ("v1", "Node"): V1Node,
}
STRUCTS = _structs(tuple(KINDS.values()))
_STRUCT_OF_KIND = {key: STRUCTS[model] for key, model in KINDS.items()}


class _Listing(msgspec.Struct):
    """A JSON `kind: List` with its items left as JSON text (`msgspec.Raw`: views into the text)."""

    kind: Any = None
    items: list[msgspec.Raw] | None = None


class _Head(msgspec.Struct):
    """What a JSON object is; the rest of it is skipped, not decoded."""

    api_version: Any = msgspec.field(default=None, name="apiVersion")
    kind: Any = None


def json_list_items(text: str | bytes) -> list[msgspec.Raw] | None:
    """The items of a JSON text that is one `kind: List`, each still as its JSON text, so that
    each becomes its Struct directly, without a dict per object (at 10,000 Services the dicts
    were 170 MiB). None for any other text, or one msgspec refuses: then the text is decoded
    whole. msgspec checks the skipped JSON too, never more leniently than `json.loads`."""
    try:
        listing = msgspec.json.decode(text, type=_Listing)
    except (msgspec.DecodeError, RecursionError):
        return None
    return listing.items if listing.kind == "List" else None


def json_kind(item: msgspec.Raw) -> tuple[str, str] | None:
    """(apiVersion, kind) of a JSON object of a kind in `KINDS`, else None."""
    try:
        head = msgspec.json.decode(item, type=_Head)
    except (msgspec.DecodeError, RecursionError):
        return None
    key = (head.api_version, head.kind)
    return key if isinstance(head.api_version, str) and isinstance(head.kind, str) and key in KINDS else None


def struct_from_json(key: tuple[str, str], item: msgspec.Raw) -> Any:
    """The Struct of a JSON object of kind `key`; `Unsure` where msgspec cannot judge its fields.

    Raises msgspec.DecodeError (or RecursionError) where msgspec cannot decode it at all (a
    number out of its range): the caller decodes the whole file the ordinary way then.
    """
    try:
        return msgspec.json.decode(item, type=_STRUCT_OF_KIND[key])
    except msgspec.ValidationError as e:
        raise Unsure(str(e)) from None


class _ListMeta(msgspec.Struct):
    resource_version: str = msgspec.field(default="", name="resourceVersion")
    continue_: str = msgspec.field(default="", name="continue")  # set while a paginated list has more pages


class _ApiList(msgspec.Struct):
    """A list response of the API (`ServiceList`, ...): its metadata and its items as JSON text."""

    metadata: _ListMeta = msgspec.field(default_factory=_ListMeta)
    items: list[msgspec.Raw] | None = None


def api_list_page(body: bytes) -> tuple[list[msgspec.Raw], str, str]:
    """The items of an API list response (or one page of a list), each still as its JSON text
    (`api_item` decodes one), the list's resourceVersion and its `continue` token ("" on a
    list's last or only page). A body that is not JSON (a truncated response) raises
    msgspec.DecodeError; the reflector then lists again, after a backoff."""
    listing = msgspec.json.decode(body, type=_ApiList)
    return listing.items or [], listing.metadata.resource_version, listing.metadata.continue_


def api_item(key: tuple[str, str], item: msgspec.Raw) -> Any:
    """An item of a list of kind `key` (items carry no kind of their own) as its slim Struct: no
    dict, no pydantic model. One msgspec cannot judge becomes the client's model, which raises
    as the client's own deserialization would."""
    try:
        return struct_from_json(key, item)
    except Unsure:
        return KINDS[key].model_validate(msgspec.json.decode(item))


def api_list(key: tuple[str, str], body: bytes) -> tuple[list[Any], str, str]:
    """`api_list_page` with every item decoded (`api_item`)."""
    items, version, token = api_list_page(body)
    return [api_item(key, item) for item in items], version, token


class _WatchEvent(msgspec.Struct):
    type: str
    object: msgspec.Raw


def watch_event(key: tuple[str, str], line: str | bytes) -> tuple[str, Any] | None:
    """(type, object) of a watch event line of kind `key` that adds, changes or deletes an object;
    None for any other line (BOOKMARK, ERROR, garbage), which the client's watch reads itself."""
    try:
        event = msgspec.json.decode(line, type=_WatchEvent)
    except (msgspec.DecodeError, RecursionError):
        return None
    if event.type not in ("ADDED", "MODIFIED", "DELETED"):
        return None
    return event.type, api_item(key, event.object)


def to_struct(key: tuple[str, str], obj: dict[str, Any]) -> Any:
    """The slim object of a decoded document of kind `key` (a key of `KINDS`); `Unsure` if msgspec refuses it."""
    try:
        return msgspec.convert(obj, _STRUCT_OF_KIND[key])
    # UnicodeEncodeError: msgspec parses a timestamp from its UTF-8, which a lone surrogate (a
    # JSON `\ud800` escape) does not have.
    except (msgspec.ValidationError, RecursionError, UnicodeEncodeError) as e:
        raise Unsure(str(e)) from None


# ---------------------------------------------------------------------------------------------
# YAML
# ---------------------------------------------------------------------------------------------

_MAP, _SEQ, _STR = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:str"


class _Unusual(Exception):
    """Input the lean construction leaves to PyYAML's own loader (tags, merge keys, aliases)."""


# Plain scalars resolve by their text alone (no path resolvers are registered), and a cluster
# repeats the same few thousand (`TCP`, `true`, `http`, node names): resolve each once.
_resolve = lru_cache(maxsize=16384)(yaml.resolver.Resolver().resolve)
_CONSTRUCTOR = yaml.constructor.SafeConstructor()
_SCALARS: dict[str, Callable[[Any], Any]] = {
    f"tag:yaml.org,2002:{name}": getattr(_CONSTRUCTOR, f"construct_yaml_{name}")
    for name in ("null", "bool", "int", "float", "timestamp")
}


def _scalar(event: Any) -> Any:
    """A scalar event's value, resolved and constructed as SafeConstructor does."""
    tag = event.tag
    if tag is None or tag == "!":
        tag = _resolve(yaml.ScalarNode, event.value, event.implicit)
    if tag == _STR:
        return event.value
    construct = _SCALARS.get(tag)
    if construct is None:
        raise _Unusual
    return construct(yaml.ScalarNode(tag, event.value))


def _lean_documents(text: str) -> Iterator[Any]:
    """Documents built straight from libyaml's events.

    PyYAML's C loader spends ~90% of its time composing a node tree (a node and two marks per
    scalar) that its Python constructor then walks; the events alone cost a tenth. A stack of
    open containers turns them into the same dicts, lists and scalars.
    """
    stack: list[Any] = []  # open containers; a mapping's pending key follows it as a _Key
    events: Iterator[Any] = yaml.parse(text, Loader=YamlLoader)
    for event in events:
        kind = type(event)
        if kind is yaml.ScalarEvent:
            value = _scalar(event)
        elif kind is yaml.MappingStartEvent or kind is yaml.SequenceStartEvent:
            if event.tag not in (None, "!", _MAP if kind is yaml.MappingStartEvent else _SEQ):
                raise _Unusual
            stack.append({} if kind is yaml.MappingStartEvent else [])
            continue
        elif kind is yaml.MappingEndEvent or kind is yaml.SequenceEndEvent:
            value = stack.pop()
        elif kind is yaml.AliasEvent:
            raise _Unusual
        else:
            continue  # stream and document start/end
        top = stack[-1] if stack else None
        if top is None:
            yield value
        elif type(top) is list:
            top.append(value)
        elif type(top) is _Key:
            stack.pop()
            stack[-1][top.key] = value  # an unhashable key (a list): TypeError, PyYAML reports it
        else:  # a key (a plain `<<`, a merge key, resolved to a tag `_scalar` leaves to PyYAML)
            stack.append(_Key(value))


class _Key:
    """A mapping's key waiting for its value on the stack (a key may itself be a container)."""

    __slots__ = ("key",)

    def __init__(self, key: Any) -> None:
        self.key = key


def lean_yaml_load(text: str) -> list[Any]:
    """Every document of a YAML text, as `yaml.load_all(text, CSafeLoader)` gives them.

    First oryaml (libyaml's parser in Rust, ~3x faster again), for a text with no token that
    may resolve differently under its YAML 1.2 schema (yaml_fast.py says how that is decided);
    then the lean construction from libyaml's events. Texts with anchors, and documents with
    tags or merge keys, are built by PyYAML's own constructor, as are texts the lean
    construction fails on (so errors are PyYAML's).
    """
    documents = yaml_fast.load(text)
    if documents is not None:
        return documents
    if "&" not in text:  # anchors: aliases share (or contain) objects; PyYAML's constructor keeps that
        try:
            return list(_lean_documents(text))
        except Exception:  # noqa: S110 - unusual input or a syntax error: PyYAML's loader below decides
            pass
    return list(yaml.load_all(text, Loader=YamlLoader))  # noqa: S506 - the safe loader
