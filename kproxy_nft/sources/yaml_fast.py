"""YAML text → Python objects through oryaml, for texts on which it cannot differ from PyYAML.

`slim.lean_yaml_load` must return exactly what `yaml.load_all(text, CSafeLoader)` returns
(YAML 1.1: `yes` is True, `0777` is 511, `2001-12-14` a date, `1e3` a string, `<<` merges).
At 10,000 Services × 10 endpoints its libyaml event loop still costs ~4.7 s, a Python step
per event (issue 14). oryaml (PyPI, Rust) takes ~1.4 s (1.75 s with the scan below), and it is not just
any fast parser: it is serde_yaml driving `unsafe-libyaml`, a line-by-line Rust translation of
libyaml, the C parser CSafeLoader uses. So the scanner and parser are libyaml's: the same
texts are refused, the same tokens come out, quoted and block scalars get the same content
(escapes, folding, NEL/LS/PS breaks, BOM, tabs). What differs is only what happens *after*
parsing:

* plain scalars resolve by the YAML 1.2 core schema (`yes`, `0777`, `1_000`, `1:20`,
  `2001-12-14` are strings, `1e3` and `0o17` numbers);
* anchors/aliases are copied (PyYAML shares one object), merge keys `<<` are ordinary keys,
  `=` is a string (PyYAML: an error), tags are applied its own way, a sequence as a key is a
  tuple (PyYAML: an error);
* a stream of several documents is refused, an empty stream gives None (PyYAML: []);
* a duplicate key raises (PyYAML: the last one wins) - as does a `true` key beside a `1`.

`risky` finds, with two regex searches over the text, every place where one of those could
happen, over-approximated: a hit sends the text to the exact path (slim's event loop, then
PyYAML), and so does any exception from oryaml and a None result. A false positive only costs
speed; a text with no hit is one whose every plain scalar resolves alike under both schemas
(or one both parsers refuse, and then PyYAML decides on the error, as before).

Why that is enough: in a text with no flow collection, tag, anchor, alias, directive or
complex key (all flagged where they start, but for an empty `{}` / `[]` ending a line, which
holds no scalar), a node starts either at the start of a line (after indentation and the
indicators `- `, `: `, `--- `) or after a key's `: `; every indicator needs a blank after it,
and two nodes are never adjacent in a text libyaml accepts. Of the plain scalars starting
there, only those whose first character is one the resolvers of either schema look at
(`yYnNtTfFoO~-+.0-9<=`; serde_yaml keeps only finite floats from Rust's parser, so `inf`,
`nan` stay strings) can be anything but a string. A word starting with a letter is a string
in both, or `true`/`false`/`null` in both (any of their three spellings), or a YAML 1.1
boolean (`yes`/`no`/`on`/`off`, and the spec's `y`/`n`): those are flagged when they end the
line's scalar. A scalar starting with `~-+.0-9<=` is flagged unless it is followed by the end
of its first line (or a key's `: `, or a comment) and has one of these forms:

* a decimal integer of at most 18 digits without a leading zero (an `int` in both);
* an IPv4 address/CIDR or version (`10.96.0.1`, `10.0.0.0/8`, `1.2.3`), a UUID, or a
  quantity (`100Mi`, `30s`: digits then a letter other than e/E): strings in both.

A plain scalar that goes on over more lines (folded, so it has a space or a line break in it)
is a string in both schemas unless it starts like a timestamp (`2001-12-14 21:59:43`), which is
flagged. Quoted and block scalars are never resolved. Text inside quotes and block scalars is
searched too: it can only add false positives. Line breaks other than `\n` and a BOM send the
text to the exact path (rare; they would start lines the searches do not look at).
"""

from __future__ import annotations

import re
from typing import Any

import oryaml

__all__ = ["load", "risky"]

_BREAK = r"\r\n\x85\u2028\u2029"
# The end of a plain scalar's first line: the end of the line or text, a comment, or a key's `: `
# (`:` and `#` count only with a blank next to them: `1:20` and `1#2` are one scalar each).
_END = rf"(?=[ \t]*(?:[{_BREAK}]|\Z|:(?:[ \t{_BREAK}]|\Z))|[ \t]+#)"
# Scalars that begin like a number but resolve alike in both schemas (followed by _END).
_SAME = (
    r"(?:0|-?[1-9][0-9]{0,17}"  # an int in both (PyYAML's ints are unbounded, oryaml's floats past 128 bits)
    r"|[0-9]+(?:\.[0-9]+){2,}(?:/[0-9]+)?"  # 10.96.0.1, 10.0.0.0/8, 1.2.3: two dots, a string in both
    r"|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"  # a uid: not `dddd-`, so no date
    r"|[1-9][0-9]*[a-dA-Df-zF-Z][a-zA-Z0-9]*"  # 100Mi, 30s: no e/E (1e3), no 0x/0o/0b, no `_`/`:`
    r"|---(?=[ \t\r\n]|\Z)"  # a document start (a second one: oryaml refuses, PyYAML decides)
    r")" + _END
)
# What may resolve differently, at a token start.
_AT = (
    r"(?=[&*!%?<=~.+\[{yYnNoO0-9-])"  # (most tokens fail here at once: `name`, `svc0`, `TCP`)
    r"(?:[&*!%?<=~.+]"  # anchor, alias, tag, directive, complex key, merge key, `=`, `~`, .5/.inf, +1
    r"|\[(?!\][ \t]*(?:[\r\n]|\Z))|\{(?!\}[ \t]*(?:[\r\n]|\Z))"  # flow collections, but for a line's `[]`/`{}`
    # YAML 1.1 booleans yes/Yes/YES, no, on, off and the spec's y/n (and a few odd spellings: harmless)
    r"|(?:[yY](?:es|ES)?|[nN][oO]?|[oO](?:[nN]|ff|FF))" + _END
    + r"|(?=[-0-9])(?!-[ \t\r\n]|-\Z)(?!" + _SAME + r"))"  # numbers, dates, 0777, 1_000, 1:20, 1e3, -x, ...
)
# Blanks and the block indicators (`- `, `: `, `--- `, `... `) a token may follow on its line. Not `? `:
# a complex key (a sequence as a key: a tuple in oryaml, an error in PyYAML) is flagged by _AT.
_CHAIN = r"[ \t]*+(?:(?:---|\.\.\.|[-:])[ \t]++)*+"
# Token starts: a line's first token (after indentation and indicators) and a value after `: `.
# Without flow collections, tags and anchors (flagged themselves), a token that both parsers accept
# starts nowhere else: indicators need a blank after them, and two nodes are never adjacent.
# Two searches with a literal first character: re then skips ahead with a fast string search,
# ~5x faster than one search trying every position (0.26 s for the 38 MiB text at 10k).
_LINE_START = re.compile(r"\n" + _CHAIN + _AT)
_VALUE_START = re.compile(r":[ \t]" + _CHAIN + _AT)
# Line breaks other than \n (NEL, LS, PS, a lone CR: libyaml breaks lines there) and a BOM: rare,
# and a token could follow them unseen by _LINE_START; such texts take the exact path.
_ODD = ("\r", "\x85", "\u2028", "\u2029", "\ufeff")


def risky(text: str) -> bool:
    """Whether a token of `text` may resolve differently in PyYAML (YAML 1.1) and oryaml (1.2 core)."""
    if any(odd in text for odd in _ODD):
        return True
    first_line = text[: text.find("\n") + 1] or text  # the first token has no \n before it
    return bool(_LINE_START.match("\n" + first_line) or _LINE_START.search(text) or _VALUE_START.search(text))


# A `List` (what `kubectl get -o yaml` prints): a top-level `items:` whose entries start at column 0.
_ITEMS = re.compile(r"\nitems:[ \t]*\n(?=- )")  # after a \n: a literal prefix, found at string-search speed
_ITEMS_END = re.compile(r"\n(?![ \n#]|- )")  # the first line at column 0 that is no entry's (a key, `---`)
_ENTRY = re.compile(r"\n(?=- )")
_PLACEHOLDER = "kproxy-nft-items-placeholder"
_CHUNK = 1000  # entries per oryaml call


def _list_in_chunks(text: str) -> Any:
    """A `List` document parsed a thousand `items` at a time, or None (not that shape, or refused).

    serde_yaml gathers a whole document's events before building anything: for one call on a
    38 MiB text that is ~400 MiB on top of the result (peak 706 MiB where the event loop
    peaked at 409). A column-0 entry of the top-level `items:` is parsed alike alone: its lines
    are its own (the next line at column 0 ends it) and the columns, hence the indentation
    rules, are the same. The rest is parsed with the entries replaced by a placeholder value,
    which must come back as the top-level `items` (else, e.g. inside a quoted scalar, the
    split was not where it seemed). An entry whose quoted scalar goes on past its end makes
    its chunk fail (an unterminated quote), and then the whole text takes the exact path.
    """
    found = _ITEMS.search("\n" + text[: text.find("\n") + 3]) if text.startswith("items:") else _ITEMS.search(text)
    if found is None or _PLACEHOLDER in text:
        return None
    shift = 1 if text.startswith("items:") else 0  # that search saw one more character than `text` has
    head, first = found.start() + 1 - shift, found.end() - shift  # the `items:` line; its first entry
    end = _ITEMS_END.search(text, first - 1)
    last = end.start() + 1 if end else len(text)
    document = oryaml.loads(f"{text[:head]}items: {_PLACEHOLDER}\n{text[last:]}")
    if type(document) is not dict or document.get("items") != _PLACEHOLDER:
        return None
    starts = [first] + [m.start() + 1 for m in _ENTRY.finditer(text, first, last)]
    items: list[Any] = []
    for i in range(0, len(starts), _CHUNK):
        chunk_end = starts[i + _CHUNK] if i + _CHUNK < len(starts) else last
        items += oryaml.loads(text[starts[i]:chunk_end])
    document["items"] = items
    return document


def load(text: str) -> list[Any] | None:
    """`list(yaml.load_all(text, CSafeLoader))` when oryaml can be trusted to give it; else None.

    None: the text has a token that may resolve differently (`risky`), is not one document,
    or oryaml refused it (a syntax error: the caller's PyYAML reports it as PyYAML does).
    """
    if risky(text):
        return None
    try:
        document = _list_in_chunks(text)
        if document is None:
            document = oryaml.loads(text)
    except Exception:  # a syntax error, a duplicate key, several documents, nesting over 128: PyYAML decides
        return None
    if document is None:  # an empty stream ([] for PyYAML), or an empty/`null` document ([None])
        return None
    return [document]
