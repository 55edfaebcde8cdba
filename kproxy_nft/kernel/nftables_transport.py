"""How the nftables backend talks to the kernel: a command buffer in, `Completed` out.

A `Transport` runs one nft command buffer (any `nft -f` input, one atomic transaction) or one
listing, and answers like a finished command (`Completed`: exit status, stdout, stderr), so the
backend need not care which path ran it:

* `LibnftablesTransport`: in-process through libnftables (`kernel/libnftables.py`), one context
  kept for the backend's lifetime; starting `nft` costs ~15 ms per call, the library nothing;
* `CommandTransport`: the `nft` command (`ip netns exec NS nft …` for a namespace), fed on stdin,
  run through an injected `Runner` so tests can assert the exact argv and stdin;
* `kernel/nftables_fake.FakeTransport` answers the same calls from an in-memory model.

This module only runs text: what to send is `nftables_plan`'s business, what the listings mean
`nftables_text`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from kproxy_nft.kernel import libnftables
from kproxy_nft.kernel.netns import exec_argv
from kproxy_nft.kernel.runner import Completed, Runner, SubprocessRunner

NFT = "nft"


class NftablesError(RuntimeError):
    """nft refused a command; the message carries its error text."""


class Transport(Protocol):
    """Runs nft command buffers (one transaction each) and listings."""

    name: str

    def run(self, commands: str, output: libnftables.Output = libnftables.PLAIN) -> Completed: ...

    def close(self) -> None: ...


class LibnftablesTransport:
    """In-process: one libnftables context for the backend's lifetime."""

    name = "libnftables"

    def __init__(self, netns: str | None) -> None:
        self._nft = libnftables.Nftables(netns)

    def run(self, commands: str, output: libnftables.Output = libnftables.PLAIN) -> Completed:
        return self._nft.run(commands, output)

    def close(self) -> None:
        self._nft.close()


@dataclass
class CommandTransport:
    """The `nft` command (`ip netns exec NS nft …` for a namespace), fed on stdin."""

    netns: str | None = None
    runner: Runner = field(default_factory=SubprocessRunner)
    name: str = "nft"

    def run(self, commands: str, output: libnftables.Output = libnftables.PLAIN) -> Completed:
        chosen = (("-j", output.json), ("-t", output.terse), ("-y", output.numeric_priority))
        flags = [flag for flag, on in chosen if on]
        command = commands.strip()
        if "\n" not in command and any(on for _, on in chosen):
            # A listing goes on the command line: with -j, `nft -f` would parse its input as JSON.
            # Our listing commands are plain words (table, set and chain names), no quoting.
            return self.runner.run(exec_argv(self.netns, [NFT, *flags, *command.split()]))
        return self.runner.run(exec_argv(self.netns, [NFT, *flags, "-f", "-"]), input=commands)

    def close(self) -> None:
        pass


def make_transport(netns: str | None, use_libnftables: bool = True) -> Transport:
    """libnftables when asked for and loadable, else the `nft` command."""
    if use_libnftables and libnftables.available():
        return LibnftablesTransport(netns)
    return CommandTransport(netns)


def check(result: Completed, what: str) -> str:
    """The output of a command that succeeded; NftablesError naming `what` otherwise."""
    if result.returncode != 0:
        raise NftablesError(f"{what}: {result.stderr.strip() or 'failed'}")
    return result.stdout


# What nft says when the table, chain, set or element named does not exist (ENOENT).
MISSING = "No such file or directory"


def listing(transport: Transport, command: str, output: libnftables.Output = libnftables.PLAIN) -> str | None:
    """What `command` (an `nft list …`) prints; None when what it names does not exist; any other
    failure raises NftablesError."""
    result = transport.run(command, output)
    if result.returncode != 0 and MISSING in result.stderr:
        return None
    return check(result, command)


__all__ = [
    "MISSING", "NFT", "CommandTransport", "LibnftablesTransport", "NftablesError", "Transport", "check", "listing",
    "make_transport",
]
