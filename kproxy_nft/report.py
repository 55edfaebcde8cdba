"""How every command reports: one bounded line on stderr, and exit codes that mean one thing.

0 success; 1 only from `apply` (changes applied or, with --dry-run, pending) and `demo` (a
probe failed); 2 bad input, or a kernel change that failed and was undone (`fail`); 3 an
internal error, a bug (`internal_error`, the traceback too with `-v`); 130 Ctrl-C. Whatever
a message holds (a name with a newline, ANSI codes, 50 MB of text), it is shown as one line
of bounded length (`one_line`). Used by `cli` and the feature packages' commands alike.
"""

from __future__ import annotations

import sys
import traceback
from typing import NoReturn

import click

EXIT_BAD_INPUT = 2
EXIT_INTERNAL_ERROR = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
MESSAGE_LIMIT = 1000  # characters of a message shown on stderr

# Control characters (C0, DEL, C1) and the Unicode line and paragraph separators, escaped: a
# message is one line on a terminal, whatever the input held (a name with a newline, ANSI codes).
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def one_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """`text` as one line of at most about `limit` characters: control characters escaped, the rest cut."""
    shown = text[: limit + 1].translate(_ESCAPES)  # never the whole of a 50 MB input
    if len(text) <= limit and len(shown) <= limit:
        return shown
    return f"{shown[:limit]}… ({len(text):,} characters)"


def fail(message: str) -> NoReturn:
    """Report bad input the way every command does: one line on stderr, exit code 2."""
    click.echo(f"kproxy-nft: error: {one_line(message)}", err=True)
    sys.exit(EXIT_BAD_INPUT)


def internal_error(error: BaseException, verbose: bool) -> NoReturn:
    """Report a bug: one line on stderr (after the traceback, when `verbose`), exit code 3."""
    if verbose:
        traceback.print_exception(error, file=sys.stderr)
    try:
        first = next((line for line in str(error).splitlines() if line.strip()), "")
    except Exception:  # noqa: BLE001 - an exception whose __str__ fails still gets its line
        first = "(message unavailable)"
    message = f"{type(error).__name__}: {first}" if first else type(error).__name__
    click.echo(f"kproxy-nft: internal error: {one_line(message)}", err=True)
    sys.exit(EXIT_INTERNAL_ERROR)


def warn(message: str) -> None:
    """A warning about the input that does not stop the command: one line on stderr."""
    click.echo(f"kproxy-nft: warning: {one_line(message)}", err=True)
