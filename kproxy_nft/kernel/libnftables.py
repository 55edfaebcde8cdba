"""A small ctypes binding to libnftables (`libnftables.so.1`), the library behind the `nft` command.

Why in-process: a sync that changes a few map elements costs a fraction of a millisecond in
the kernel, but starting `nft` costs ~15 ms (exec, dynamic linking, reading the ruleset cache).
A `Nftables` object keeps one `nft_ctx` alive across syncs and runs each command buffer, all
of it one atomic transaction, with `nft_run_cmd_from_buffer`.

Network namespaces: libnftables 1.0.6 opens its netlink socket in `nft_ctx_new`, and a socket
belongs to the namespace it was created in: a context made in the root namespace keeps
acting there even if the thread moves later (measured). So for `netns` the thread enters
the namespace (`netns.entered`, setns(2)) to create the context, and again around each call in
case the library reopens its socket; it returns to its own namespace afterwards (the `nft`
fallback runs as `ip netns exec`). Only the calling thread moves, never other threads.

Output and errors are buffered in the context (`nft_ctx_buffer_output/_error`) and returned as
text, so nothing is printed on our stdout/stderr. Flags follow `libnftables.h` (1.0.x).
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from dataclasses import dataclass

from kproxy_nft.kernel.netns import entered
from kproxy_nft.kernel.runner import Completed

LIBRARY = "libnftables.so.1"

# Output flags of libnftables.h (enum nft_ctx_output_flags); the same bits as `nft -j/-t/-y`.
OUTPUT_HANDLE = 1 << 3
OUTPUT_JSON = 1 << 4
OUTPUT_NUMERIC_PRIO = 1 << 8
OUTPUT_TERSE = 1 << 11



class LibnftablesUnavailable(RuntimeError):
    """libnftables.so.1 could not be loaded (use the `nft` command instead)."""


def _load() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(LIBRARY, use_errno=True)
    except OSError as e:
        raise LibnftablesUnavailable(f"{LIBRARY}: {e}") from None
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.restype = None
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_output.restype = ctypes.c_int
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.restype = ctypes.c_int
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
    lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_set_flags.restype = None
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_ctx_set_dry_run.restype = None
    lib.nft_ctx_set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    return lib


_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


def library() -> ctypes.CDLL:
    """The loaded library (loaded once per process)."""
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _load()
        return _lib


def available() -> bool:
    try:
        library()
    except LibnftablesUnavailable:
        return False
    return True


@dataclass(frozen=True)
class Output:
    """Which listing format to ask for (each maps to an output flag)."""

    json: bool = False
    terse: bool = False
    numeric_priority: bool = False

    @property
    def flags(self) -> int:
        return (
            (OUTPUT_JSON if self.json else 0)
            | (OUTPUT_TERSE if self.terse else 0)
            | (OUTPUT_NUMERIC_PRIO if self.numeric_priority else 0)
        )


PLAIN = Output()


class Nftables:
    """One long-lived libnftables context, optionally bound to a named network namespace.

    `run(commands)` executes a command buffer (any `nft -f` input) as one transaction and
    returns a `Completed` like the subprocess runner does, so callers need not care which
    path ran it. Not thread-safe: one context serves one thread at a time (guarded by a lock).
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._lib = library()
        self._lock = threading.Lock()
        with entered(netns):
            ctx = self._lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT
        if not ctx:
            raise LibnftablesUnavailable("nft_ctx_new failed")
        self._ctx: int | None = ctx
        if self._lib.nft_ctx_buffer_output(ctx) or self._lib.nft_ctx_buffer_error(ctx):
            self.close()
            raise LibnftablesUnavailable("could not buffer libnftables output")

    def run(self, commands: str, output: Output = PLAIN, dry_run: bool = False) -> Completed:
        with self._lock:
            ctx = self._ctx
            if ctx is None:
                raise RuntimeError("libnftables context already closed")
            self._lib.nft_ctx_output_set_flags(ctx, output.flags)
            self._lib.nft_ctx_set_dry_run(ctx, dry_run)
            with entered(self.netns):
                rc = self._lib.nft_run_cmd_from_buffer(ctx, commands.encode())
            # Reading a buffer hands over its contents and resets it for the next command.
            out = self._lib.nft_ctx_get_output_buffer(ctx) or b""
            err = self._lib.nft_ctx_get_error_buffer(ctx) or b""
            return Completed(0 if rc == 0 else 1, out.decode(errors="replace"), err.decode(errors="replace"))

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None

    def __enter__(self) -> Nftables:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten close must not leak the context
        with contextlib.suppress(Exception):
            self.close()
