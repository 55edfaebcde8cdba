"""Our nftables table as the kernel lists it, as data: parsers of `nft list` output.

* `parse_listing` reads `nft -y list table` text (one table) into declarations (`SetDecl`, the
  compiler's type, so the two compare directly), chains (`KernelChain`: base-chain header and
  rules, each exactly as printed) and set/map elements (key → value, in nft's own syntax, which
  is the syntax the compiler writes them in); with `-t` (terse) there are no elements.
* `table_from_listing` makes that a `KernelTable`, leaving out the elements of dynamic maps
  (the datapath fills those; they are kernel state, not ours).
* `parse_json_elements` reads one `nft -j list map|set` document: the way the affinity entries
  of a dynamic map are read, with their timeouts stripped.
* `parse_counted_listing` reads the elements of `nft list map` text with their counters (the
  backend maps' per-endpoint connection counts, `kproxy-nft top`); `parse_listing` leaves the
  counts out of the keys it compares.

Pure: no I/O. Running the listings is the backend's job (`kernel/nftables.py`), deciding what to
change `nftables_plan`'s.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kproxy_nft.compile.nftables import SetDecl


@dataclass(frozen=True)
class KernelChain:
    name: str
    header: str | None  # `type … hook … priority …; policy …;` of a base chain
    rules: tuple[str, ...]


@dataclass(frozen=True)
class KernelTable:
    """Our table as the kernel has it: declarations and chains as listed, static elements."""

    family: str
    sets: Mapping[str, SetDecl]
    chains: Mapping[str, KernelChain]
    elements: Mapping[str, Mapping[str, str | None]]


Elements = dict[str, dict[str, str | None]]  # set name → key → value (None in a set)


def parse_terse_listing(text: str) -> tuple[dict[str, SetDecl], dict[str, KernelChain]]:
    """Sets/maps and chains of `nft -t -y list table` output (one table)."""
    sets, chains, _ = parse_listing(text)
    return sets, chains


def parse_listing(text: str) -> tuple[dict[str, SetDecl], dict[str, KernelChain], Elements]:
    """Sets/maps, chains and set elements of `nft -y list table` output (one table).

    Elements are printed as `elements = { k : v, k : v,` continued over lines up to `}`; keys
    and values are nft's own text, the syntax the compiler writes them in. Without elements
    (`-t`, terse) only declarations and chains are found.
    """
    sets: dict[str, SetDecl] = {}
    chains: dict[str, KernelChain] = {}
    elements: Elements = {}
    current: tuple[str, str] | None = None
    body: list[str] = []
    items: list[str] | None = None  # inside `elements = { … }`
    for raw in text.splitlines():
        line = raw.strip()
        if current is None:
            parts = line.split()
            if len(parts) == 3 and parts[0] in ("map", "set", "chain") and parts[2] == "{":
                current, body = (parts[0], parts[1]), []
            continue
        if items is not None or (current[0] != "chain" and line.startswith("elements = {")):
            if items is None:
                items, line = [], line.removeprefix("elements = {")
            done = line.endswith("}")
            items += [item.strip() for item in line.removesuffix("}").split(",") if item.strip()]
            if done:
                elements[current[1]] = _element_items(items, is_map=current[0] == "map")
                items = None
            continue
        if line != "}":
            if line:
                body.append(line)
            continue
        kind, name = current
        if kind == "chain":
            header = body[0] if body and body[0].startswith("type ") and " hook " in body[0] else None
            chains[name] = KernelChain(name, header, tuple(body[1:] if header else body))
        else:
            sets[name] = SetDecl(name, kind == "map", tuple(body))
            elements.setdefault(name, {})
        current = None
    return sets, chains, elements


# What nft prints after the key of an element of a set declared with `counter` (the backend
# maps: per-endpoint connection counters). The counts are kernel state, not ours: keys are
# compared without them, so traffic never looks like drift and a full sync never re-adds (and
# so resets) a counted element.
_ELEMENT_COUNTER = re.compile(r" counter packets \d+ bytes \d+$")


def _element_items(items: list[str], is_map: bool) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for item in items:
        key, _, value = item.partition(" : ")
        out[_ELEMENT_COUNTER.sub("", key)] = value if is_map else None
    return out


def is_dynamic(decl: SetDecl) -> bool:
    """Sets the datapath fills (affinity): their elements are kernel state, not ours."""
    return any(line.startswith("flags ") and "dynamic" in line for line in decl.body)


def table_from_listing(family: str, text: str) -> KernelTable:
    """The `KernelTable` of one `nft -y list table` output (static elements only)."""
    sets, chains, listed = parse_listing(text)
    elements = {name: listed.get(name, {}) for name, decl in sets.items() if not is_dynamic(decl)}
    return KernelTable(family, sets, chains, elements)


def _atom(value: Any) -> str:
    """One element key or value of nft's JSON output in nft's text syntax."""
    if isinstance(value, dict):
        if "concat" in value:
            return " . ".join(_atom(v) for v in value["concat"])
        if "elem" in value:  # an element with attributes (timeout, comment…)
            return _atom(value["elem"]["val"])
        for verdict in ("goto", "jump"):
            if verdict in value:
                return f"{verdict} {value[verdict]['target']}"
        if len(value) == 1:  # {"drop": null}, {"accept": null}, …
            (verdict, arg), = value.items()
            if arg is None:
                return str(verdict)
        return json.dumps(value, sort_keys=True)
    return str(value)


def parse_json_elements(text: str) -> dict[str, str | None]:
    """key → value (None for a set) of one `nft -j list set|map` document."""
    out: dict[str, str | None] = {}
    for obj in json.loads(text).get("nftables", ()):
        decl = obj.get("map") or obj.get("set")
        if not decl:
            continue
        for elem in decl.get("elem", ()):
            if isinstance(elem, list) and "map" in obj:
                out[_atom(elem[0])] = _atom(elem[1])
            else:
                out[_atom(elem)] = None
    return out


@dataclass(frozen=True)
class CountedElement:
    """One element of a set or map declared with `counter`: key, value and packets counted."""

    key: str
    value: str | None
    packets: int


@dataclass(frozen=True)
class CountedMap:
    """A set or map of an `nft list` listing: its family (`ip`, `ip6`), name and counted elements."""

    family: str
    name: str
    elements: tuple[CountedElement, ...]


_TABLE_HEADER = re.compile(r"^table (\S+) ", re.MULTILINE)
_BLOCK_HEADER = re.compile(r"^\s*(map|set|chain) (\S+) \{", re.MULTILINE)
_COUNTED = re.compile(r"([^,{}\n]+?) counter packets (\d+) bytes \d+(?: : ([^,{}\n]+))?")


def parse_counted_listing(text: str) -> list[CountedMap]:
    """The sets and maps of `nft list map|set|table` text (one table), each with the elements
    that carry a counter (`KEY counter packets P bytes B [: VALUE]`: a set declared `counter`).

    Text, not `nft -j`: at 300,000 elements (30,000 services of 10 endpoints) nft takes as long
    to print either, but a regex reads the text in a fraction of a second where the JSON took
    seconds. In a NAT chain only a connection's first packet is looked up, so for the backend
    maps a packet count is a count of new connections.
    """
    table = _TABLE_HEADER.search(text)
    family = table.group(1) if table else ""
    headers = list(_BLOCK_HEADER.finditer(text))  # a block ends where the next one starts
    out = []
    for n, header in enumerate(headers):
        if header.group(1) == "chain":  # rule counters are not element counters
            continue
        block = text[header.end():headers[n + 1].start() if n + 1 < len(headers) else len(text)]
        elements = tuple(CountedElement(key.strip(), value.strip() if value else None, int(packets))
                         for key, packets, value in _COUNTED.findall(block))
        out.append(CountedMap(family, header.group(2), elements))
    return out


__all__ = [
    "CountedElement",
    "CountedMap",
    "Elements",
    "KernelChain",
    "KernelTable",
    "is_dynamic",
    "parse_counted_listing",
    "parse_json_elements",
    "parse_listing",
    "parse_terse_listing",
    "table_from_listing",
]
