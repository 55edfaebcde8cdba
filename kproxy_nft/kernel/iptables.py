"""The iptables kernel backend: pick nft or legacy, read the state, apply a plan atomically, clean up.

This is the imperative shell around the pure parts (`iptables_text` parses, `iptables_rule`
canonicalizes, `iptables_plan` diffs). Everything runs through an injected `Runner`, inside a
network namespace when `Host.netns` is set, as argument lists.

The CLI's entry points:

    host = open_host(backend=None, netns=None)        # None: detect nft vs legacy
    current = read_state(host, IPFamily.V4)
    p = plan(desired, current)                         # pure; p.is_empty, p.payload, p.services
    apply(p, host)                                     # raises RestoreError, kernel unchanged
    apply_families(host, [p4, p6])                     # both families, all or nothing
    cleanup(host, IPFamily.V4)                         # remove everything we own, nothing else

An agent that syncs repeatedly plans against what it applied instead of reading `iptables-save`
(seconds at 10,000 services) each time: see `kernel.iptables_record` and `proxier.iptables`.

Atomicity. `iptables-restore` commits each `*table … COMMIT` block on its own, all or nothing:
a filter block that fails after the nat block committed leaves nat changed (checked with both
backends). So:

* the first table of the payload (nat, the big one) needs no precaution: if it fails, nothing
  has been committed;
* the tables after it are first run through `iptables-restore --test` on their own, which
  catches parse errors (bad option, bad value, unknown match or target) without touching the
  kernel; it costs little, since filter is small;
* what `--test` cannot see (a rule the kernel refuses at commit; with nft, also a jump to a
  chain that does not exist) is undone: `apply` reads the state back and sends
  `revert_plan(before, now)`, which takes our chains and jumps of the tables that did commit
  back to exactly what they were (positions included), checks the result, and reports the
  error;
* across families (`apply_families`), the same revert undoes IPv4 when IPv6 then fails.

Errors name the line of `Plan.payload` iptables-restore complained about, even where what was
sent differs from it: large payloads for the nft backend get a prelude (`-S` and the built-in chains)
that avoids a quadratic cost in iptables-nft (see `_NFT_PRELUDE_FROM`).
"""

from __future__ import annotations

import ctypes
import enum
import re
import socket
import struct
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field

from kproxy_nft.compile.iptables import KUBE_FIREWALL, Ruleset
from kproxy_nft.kernel.iptables_plan import (
    MANAGED_TABLES,
    ChainChange,
    ChainRules,
    JumpChange,
    Plan,
    PlanError,
    ServiceChanges,
    TableEdit,
    cleanup_plan,
    plan,
    revert_plan,
)
from kproxy_nft.kernel.iptables_text import BUILTIN_CHAINS, KernelChain, KernelState, parse_save
from kproxy_nft.kernel.netns import entered, exec_argv
from kproxy_nft.kernel.runner import Completed, Input, Runner, SubprocessRunner
from kproxy_nft.model import IPFamily

__all__ = [
    "IptablesBackend",
    "ChainChange",
    "CommandError",
    "Host",
    "IptablesError",
    "JumpChange",
    "KernelState",
    "Plan",
    "PlanError",
    "RestoreError",
    "ServiceChanges",
    "apply",
    "apply_families",
    "choose_backend",
    "cleanup",
    "CANARY",
    "cleanup_plan",
    "detect_backend",
    "ensure_canaries",
    "remove_canaries",
    "tables_with_canary",
    "legacy_table_size",
    "read_chains",
    "enable_route_localnet",
    "missing_canaries",
    "open_host",
    "plan",
    "read_state",
    "restore_reason",
    "revert",
    "tool_name",
    "wants_route_localnet",
]


class IptablesBackend(enum.StrEnum):
    NFT = "nft"
    LEGACY = "legacy"


class IptablesError(RuntimeError):
    """Base of the errors of this backend."""


class CommandError(IptablesError):
    """A command (iptables-save, …) failed."""

    def __init__(self, argv: Sequence[str], result: Completed) -> None:
        detail = result.stderr.strip() or result.stdout.strip() or "no output"
        super().__init__(f"{' '.join(argv)} exited with status {result.returncode}: {detail}")
        self.argv = tuple(argv)
        self.result = result


_ERROR_LINE = re.compile(r"(?:Error occurred at line: |line )(\d+)")


class RestoreError(IptablesError):
    """iptables-restore refused a payload.

    `line` is the payload line it names (1-based) and `text` that line; `kernel_unchanged` says
    whether the kernel is known to be as it was before (`note` explains how, or why not).
    """

    def __init__(
        self, tool: str, message: str, payload: str, line: int | None, kernel_unchanged: bool, note: str = ""
    ) -> None:
        self.tool = tool
        self.message = message
        self.payload = payload
        self.line = line
        self.kernel_unchanged = kernel_unchanged
        self.note = note
        super().__init__(str(self))

    @property
    def text(self) -> str | None:
        lines = self.payload.splitlines()
        return lines[self.line - 1] if self.line and 0 < self.line <= len(lines) else None

    @property
    def reason(self) -> str:
        """The first line of the tool's complaint that says something (see `restore_reason`)."""
        return restore_reason(self.message)

    def __str__(self) -> str:
        """One line: tool, payload line and its text, the reason, and what became of the kernel."""
        where = f" at payload line {self.line}: {self.text}" if self.text is not None else ""
        state = "the kernel is unchanged" if self.kernel_unchanged else "the kernel may be partly changed"
        note = f" ({self.note})" if self.note else ""
        return f"{self.tool} failed{where}: {self.reason}; {state}{note}"


# iptables-restore's stderr: `iptables-nft-restore v1.8.9 (nf_tables): ` (nft puts the reason on
# the next line), `line 2: RULE_APPEND failed (Invalid argument): rule in chain FORWARD`,
# legacy's `iptables-restore: line 3 failed`, then `Error occurred at line: 3` and `Try
# `iptables-restore -h' …`. Line numbers are those of the text sent, which may differ from the
# plan's payload (the nft prelude): `RestoreError.line` has the right one.
_TOOL_PREFIX = re.compile(r"^\S*tables\S*(?: v[\d.]+ \([\w ]+\))?:\s*")
_LINE_PREFIX = re.compile(r"^line \d+(?: failed)?:\s*")
_NOISE = re.compile(r"^(?:Error occurred at line: \d+|Try `.*|line \d+ failed)$")


def restore_reason(stderr: str) -> str:
    """The first meaningful line of an iptables-restore error, without tool name and line number."""
    fallback = ""
    for raw in stderr.splitlines():
        line = _LINE_PREFIX.sub("", _TOOL_PREFIX.sub("", raw.strip()))
        if not line:
            continue
        if _NOISE.match(line):
            fallback = fallback or "refused (iptables-restore gives no reason)"
            continue
        return line
    return fallback or stderr.strip() or "no output"


# ---------------------------------------------------------------------------------------------
# where commands run
# ---------------------------------------------------------------------------------------------


def tool_name(backend: IptablesBackend, family: IPFamily, action: str) -> str:
    """`iptables-nft-save`, `ip6tables-legacy-restore`, …"""
    return f"{'iptables' if family is IPFamily.V4 else 'ip6tables'}-{backend.value}-{action}"


@dataclass(frozen=True)
class Host:
    """Which iptables to drive, in which network namespace (None: the caller's), with which runner."""

    backend: IptablesBackend
    netns: str | None = None
    runner: Runner = field(default_factory=SubprocessRunner)

    def argv(self, family: IPFamily, action: str, *args: str) -> tuple[str, ...]:
        return exec_argv(self.netns, (tool_name(self.backend, family, action), *args))

    def run(self, family: IPFamily, action: str, *args: str, input: Input = None) -> Completed:
        return self.runner.run(self.argv(family, action, *args), input)


def open_host(backend: str | None = None, netns: str | None = None, runner: Runner | None = None) -> Host:
    """A `Host` for `backend` ("nft", "legacy"), or for the one detected when None or "auto"."""
    runner = runner or SubprocessRunner()
    return Host(detect_backend(runner, netns, backend), netns, runner)


# ---------------------------------------------------------------------------------------------
# nft or legacy
# ---------------------------------------------------------------------------------------------

_KUBELET_CHAINS = re.compile(r"^:(KUBE-IPTABLES-HINT|KUBE-KUBELET-CANARY) ", re.MULTILINE)
_RULE_LINE = re.compile(r"^-A ", re.MULTILINE)
_KUBE_RULE_LINE = re.compile(r"^-A \S+ .*KUBE-|^-A KUBE-", re.MULTILINE)


def choose_backend(nft_mangle: str, legacy_all: str, nft_all: str) -> IptablesBackend:
    """Pick the backend the host's rules live in, from iptables-save outputs (v4 and v6 joined).

    The order of iptables-wrappers (kubernetes-sigs), which kube-proxy's image uses:
    1. kubelet (1.17+) creates KUBE-IPTABLES-HINT / KUBE-KUBELET-CANARY in the mangle table
       of the backend it uses: found in nft's mangle table → nft, in legacy's tables → legacy;
    2. else where the kube rules are (our own, or another kube-proxy's): more of them → that one;
    3. else where more rules of any kind are; a tie (typically: none anywhere) → nft, today's default.
    """
    if _KUBELET_CHAINS.search(nft_mangle):
        return IptablesBackend.NFT
    if _KUBELET_CHAINS.search(legacy_all):
        return IptablesBackend.LEGACY
    for pattern in (_KUBE_RULE_LINE, _RULE_LINE):
        legacy, nft = len(pattern.findall(legacy_all)), len(pattern.findall(nft_all))
        if legacy != nft:
            return IptablesBackend.LEGACY if legacy > nft else IptablesBackend.NFT
    return IptablesBackend.NFT


def detect_backend(
    runner: Runner | None = None, netns: str | None = None, override: str | None = None
) -> IptablesBackend:
    """The backend to use: `override` ("nft" or "legacy") if given, else `choose_backend`'s pick.

    Legacy is read without `-t`: `iptables-legacy-save -t mangle` would create the table. A tool
    that fails or is missing counts as having no rules.
    """
    if override not in (None, "auto"):
        try:
            return IptablesBackend(override)
        except ValueError:
            raise ValueError(f"iptables backend must be nft, legacy or auto, not {override!r}") from None
    runner = runner or SubprocessRunner()

    def save(backend: IptablesBackend, *args: str) -> str:
        out = []
        for family in IPFamily:
            result = runner.run(exec_argv(netns, (tool_name(backend, family, "save"), *args)))
            out.append(result.stdout if result.returncode == 0 else "")
        return "".join(out)

    nft_mangle = save(IptablesBackend.NFT, "-t", "mangle")
    if _KUBELET_CHAINS.search(nft_mangle):
        return IptablesBackend.NFT  # the common case today: two commands and done
    return choose_backend(nft_mangle, save(IptablesBackend.LEGACY), save(IptablesBackend.NFT))


# ---------------------------------------------------------------------------------------------
# read, apply, clean up
# ---------------------------------------------------------------------------------------------


def read_state(host: Host, family: IPFamily = IPFamily.V4, tables: Sequence[str] = MANAGED_TABLES) -> KernelState:
    """The current rules of `tables` (one `iptables-save -t TABLE` each: other tables are not ours)."""
    state = KernelState(family)
    for name in tables:
        argv = host.argv(family, "save", "-t", name)
        result = host.runner.run(argv)
        if result.returncode != 0:
            raise CommandError(argv, result)
        saved = parse_save(result.stdout, family)
        state = state.replace_table(saved.table(name))
    return state


# iptables-nft (1.8.9 here) notes, for each command of a --noflush restore, the chain it names in
# a sorted linked list (nft-cache.c: cache_chain_list_insert), which makes a large payload
# quadratic: 7 s for 1,000 services, an hour or more for 10,000. A command that names the table
# but no chain switches it to fetching all chains and skips the list from then on; `-S` (list
# the table; the listing is discarded) is such a command and changes nothing. With that cache
# iptables-nft no longer creates missing built-in chains by itself, so they are declared too,
# with the policy they have. Fetching every chain costs too (about 1.5 s of a 2 s restore at
# 10,000 services), so only payloads where the list would cost more get it: the cost grows with
# commands × distinct chains named, and a rewrite of one large chain (KUBE-SERVICES after a
# foreign flush, 10,000 rules) names one chain, restored in 0.65 s without the prelude.
_NFT_PRELUDE_FROM = 5_000_000  # commands × distinct chains named, in one table block


@dataclass(frozen=True)
class _Sent:
    """Restore input as sent: table blocks of a plan, each with a prelude (lines of ours, put
    right after `*table`; see `_NFT_PRELUDE_FROM`), the first block at plan line `first_line`."""

    blocks: tuple[tuple[TableEdit, tuple[str, ...]], ...]
    first_line: int = 1

    def chunks(self) -> Iterator[str]:
        """The input as text, some lines at a time: 44 MB for a first sync at 10,000 services,
        never made whole."""
        for edit, prelude in self.blocks:
            yield "".join(f"{line}\n" for line in (f"*{edit.table}", *prelude))
            yield from edit.chunks()
            yield "COMMIT\n"

    def plan_line(self, result: Completed) -> int | None:
        """The plan payload line that the line iptables-restore complained about is (None: a prelude line)."""
        found = _ERROR_LINE.search(result.stderr)
        number = int(found.group(1)) if found else 0
        sent, planned = 1, self.first_line  # where the current block starts, in each numbering
        for edit, prelude in self.blocks:
            if number == sent:
                return planned  # its `*table`
            if number <= sent + len(prelude):
                return None
            size = edit.line_count + 1  # its lines and COMMIT
            offset = number - sent - len(prelude)
            if offset <= size:
                return planned + offset
            sent += 1 + len(prelude) + size
            planned += 1 + size
        return None


def _chain_list_cost(edit: TableEdit) -> int:
    """Commands × distinct chains they name: what iptables-nft's chain list costs (see above)."""
    commands = edit.line_count + 2
    if commands * commands <= _NFT_PRELUDE_FROM:
        return commands  # too small to matter whatever it names: not worth counting
    named = {line.chain if isinstance(line, ChainRules) else
             line.split(" ", 2)[0][1:] if line.startswith(":") else line.split(" ", 2)[1]
             for line in edit.lines if not isinstance(line, str) or (line.startswith((":", "-")) and " " in line)}
    return commands * len(named)


def _prepare(host: Host, p: Plan, edits: Sequence[TableEdit], first_line: int = 1) -> _Sent:
    blocks = []
    for edit in edits:
        prelude: tuple[str, ...] = ()
        if host.backend is IptablesBackend.NFT and _chain_list_cost(edit) > _NFT_PRELUDE_FROM:
            table = p.before.table(edit.table)
            prelude = ("-S", *(
                f":{name} {table.chains[name].policy if name in table.chains else 'ACCEPT'} [0:0]"
                for name in BUILTIN_CHAINS.get(edit.table, ())
            ))
        blocks.append((edit, prelude))
    return _Sent(tuple(blocks), first_line)


def _restore(host: Host, family: IPFamily, sent: _Sent, test: bool = False) -> Completed:
    # -w: wait for the xtables lock instead of failing when another writer holds it.
    args = ("-w", "--noflush", *(("--test",) if test else ()))
    return host.run(family, "restore", *args, input=sent.chunks())


def _error(
    host: Host, p: Plan, sent: _Sent, result: Completed, unchanged: bool, note: str
) -> RestoreError:
    """The error for a failed restore of (part of) plan `p`, with the plan's line number."""
    return RestoreError(
        tool=tool_name(host.backend, p.family, "restore"),
        message=result.stderr or result.stdout or f"exit status {result.returncode}",
        payload=p.payload,
        line=sent.plan_line(result),
        kernel_unchanged=unchanged,
        note=note,
    )


def apply(plan: Plan, host: Host) -> KernelState:
    """Send the plan's payload in one `iptables-restore -w --noflush`; return the state after it.

    An empty plan sends nothing. On failure raises `RestoreError` after making sure the kernel
    is as it was (see the module docstring), or saying that it could not.
    """
    if plan.is_empty:
        return plan.after
    family = plan.family
    head = plan.edits[0].line_count + 2  # with `*table` and COMMIT
    if len(plan.edits) > 1:
        rest = _prepare(host, plan, plan.edits[1:], first_line=head + 1)
        result = _restore(host, family, rest, test=True)
        if result.returncode != 0:
            raise _error(host, plan, rest, result, True, "refused by iptables-restore --test")
    sent = _prepare(host, plan, plan.edits)
    result = _restore(host, family, sent)
    if result.returncode == 0:
        return plan.after
    line = sent.plan_line(result)
    if len(plan.edits) == 1 or (line is not None and line <= head):
        raise _error(host, plan, sent, result, True, "in the first table: iptables-restore is atomic per table")
    raise _rolled_back(plan, host, sent, result)


def wants_route_localnet(desired: Ruleset) -> bool:
    """IPv4 rules with localhost NodePorts (their anti-martian KUBE-FIREWALL rule is there)."""
    return desired.family is IPFamily.V4 and desired.table("filter").chain(KUBE_FIREWALL) is not None


def enable_route_localnet(host: Host) -> None:
    """Let 127.0.0.1 reach DNAT targets: what localhost NodePorts need (kube-proxy sets it too).

    The sysctl belongs to the (network namespace of the) node and outlives our process, as with
    kube-proxy; it is set on every first or full sync whose rules serve localhost NodePorts.
    """
    argv = exec_argv(host.netns, ("sysctl", "-q", "-w", "net.ipv4.conf.all.route_localnet=1"))
    result = host.runner.run(argv)
    if result.returncode != 0:
        raise CommandError(argv, result)


def _rolled_back(plan: Plan, host: Host, sent: _Sent, failure: Completed) -> RestoreError:
    """Undo the tables that committed before the failing one; the error to raise either way."""
    try:
        reverted = revert(host, plan.before, plan.touched)
    except IptablesError as e:
        return _error(host, plan, sent, failure, False, f"revert failed: {e}")
    return _error(host, plan, sent, failure, True, f"reverted: {', '.join(reverted) or 'nothing had committed'}")


def revert(
    host: Host, before: KernelState, touched: Callable[[str], Collection[str]] | None = None
) -> tuple[str, ...]:
    """Take our chains and jumps back to `before` (the state a plan was made from); the tables changed.

    Reads the kernel, sends `revert_plan(before, now, touched)` in one restore and reads again
    to check that nothing of ours differs any more. Raises `IptablesError` when it could not.
    `touched` (the plan's `Plan.touched`) limits it to what the plan changed: an agent's
    partial plan starts from a `before` that holds only part of our chains.
    """
    family = before.family
    tables = tuple(before.tables) or MANAGED_TABLES
    now = read_state(host, family, tables)
    undo = revert_plan(before, now, touched)
    if not undo.is_empty:
        sent = _prepare(host, undo, undo.edits)
        result = _restore(host, family, sent)
        if result.returncode != 0:
            raise _error(host, undo, sent, result, False, "while reverting")
        now = read_state(host, family, tables)
    if not revert_plan(before, now, touched).is_empty:
        raise IptablesError(f"reverting IPv{int(family)} left differences")
    return undo.tables


def apply_families(host: Host, plans: Sequence[Plan]) -> tuple[KernelState, ...]:
    """Apply one plan per family (IPv4, then IPv6), all or nothing; the states after, in order.

    Each plan is one atomic change of its family (`apply`). When a later one fails, the
    families already committed are reverted to the state their plan was made from (`revert`),
    and the error (a `RestoreError` when the failing family's was one) says whether the whole
    kernel is as it was.

    Why not prove both payloads with `iptables-restore --test` before committing either: it
    cannot prove it. With the nft backend `--test` never shows the rules to the kernel, so a
    jump to a missing chain, a target in the wrong table, a loop, `-X` of a busy chain or `-D`
    of a missing rule all pass it and fail at commit; legacy catches the missing chain, `-X`
    and `-D`, but not the kernel's own checks (a target in the wrong table or hook, a loop).
    A revert would be needed anyway, and `--test` costs on every apply (10,000 dual-stack
    services × 10 endpoints: +43% on a first apply and +5% on a one-endpoint change with nft,
    +119% and +44% with legacy), while a revert costs only when something failed (13–36 s at
    that size). Figures: bench/bench_apply_atomic.py.
    """
    done: list[Plan] = []
    for p in plans:
        try:
            apply(p, host)
        except Exception as e:
            if not done:
                raise
            raise _families_reverted(host, done, e) from e
        done.append(p)
    return tuple(p.after for p in plans)


def _families_reverted(host: Host, done: Sequence[Plan], failure: Exception) -> Exception:
    """Revert the committed plans `done` (last first) after `failure`; the error to raise."""
    notes, unchanged = [], True
    for p in reversed(done):
        if p.is_empty:
            continue
        try:
            revert(host, p.before, p.touched)
            notes.append(f"IPv{int(p.family)} reverted")
        except IptablesError as e:
            notes.append(f"IPv{int(p.family)} not reverted: {e}")
            unchanged = False
    if isinstance(failure, RestoreError):
        note = "; ".join(n for n in (failure.note, *notes) if n)
        unchanged = unchanged and failure.kernel_unchanged
        return RestoreError(failure.tool, failure.message, failure.payload, failure.line, unchanged, note)
    return IptablesError(f"{type(failure).__name__}: {failure} ({'; '.join(notes) or 'nothing to revert'})")


def cleanup(host: Host, family: IPFamily = IPFamily.V4) -> Plan:
    """Remove everything we own (jumps from built-in chains, our chains) in one payload, then the
    canary chains (`CANARY`, which plans never touch); the plan sent."""
    removal = cleanup_plan(read_state(host, family))
    apply(removal, host)
    canaries = tables_with_canary(host, family)
    if canaries:
        remove_canaries(host, family, canaries)
    return removal


def tables_with_canary(host: Host, family: IPFamily) -> list[str]:
    """The tables holding a `CANARY` chain. `save` without `-t` lists only the tables that exist:
    asking for one by name would create it (iptables-legacy loads the table's module)."""
    saved = host.run(family, "save")
    if saved.returncode != 0:
        return []
    return [name for name, table in parse_save(saved.stdout, family).tables.items() if CANARY in table.chains]


def remove_canaries(host: Host, family: IPFamily, tables: Sequence[str]) -> None:
    """The canary chains of `tables`: nothing jumps to them, so each goes with a flush and a delete."""
    payload = "".join(f"*{table}\n:{CANARY} - [0:0]\n-X {CANARY}\nCOMMIT\n" for table in tables)
    result = host.run(family, "restore", "-w", "--noflush", input=payload)
    if result.returncode != 0:
        raise CommandError(host.argv(family, "restore", "-w", "--noflush"), result)


# kube-proxy's canaries (pkg/proxy/iptables/proxier.go, `kubeProxyCanaryChain`, watched by
# util/iptables `Monitor`): an empty chain per table whose disappearance says that someone
# flushed or deleted the table, found with one cheap call per table. iptables-legacy sends no
# notifications, so that is how it is watched; with nf_tables they are the fallback when no
# netlink socket can be opened. Not ours to plan (`iptables_plan.is_owned`): never touched by a sync.
CANARY = "KUBE-PROXY-CANARY"
CANARY_TABLES = ("mangle", "nat", "filter")


def _command(host: Host, family: IPFamily) -> str:
    """`iptables-legacy`, `ip6tables-nft`, …: the plain command of the host's backend."""
    return f"{'iptables' if family is IPFamily.V4 else 'ip6tables'}-{host.backend.value}"


# Unlike kube-proxy's, ours holds one rule, so that a flush (`iptables -t nat -F`, which leaves
# the chains) is noticed as well as a deletion: the rule is gone either way.
_CANARY_RULE = f"-A {CANARY} -j RETURN"


def missing_canaries(host: Host, family: IPFamily, tables: Sequence[str] = CANARY_TABLES) -> tuple[str, ...]:
    """The tables whose canary is gone or flushed (one `-S CANARY` call each: one chain listed)."""
    missing = []
    for table in tables:
        argv = exec_argv(host.netns, (_command(host, family), "-w", "-t", table, "-S", CANARY))
        result = host.runner.run(argv)
        if result.returncode != 0 or _CANARY_RULE not in result.stdout:
            missing.append(table)
    return tuple(missing)


# x_tables' IPT_SO_GET_INFO / IP6T_SO_GET_INFO (linux/netfilter_ipv4/ip_tables.h): a table's
# entry count and blob size, without its rules. struct ipt_getinfo: name[32], valid_hooks,
# hook_entry[5], underflow[5], num_entries, size (u32 each).
_SO_GET_INFO = 64
_GETINFO = struct.Struct("=32sI5I5III")
_libc = ctypes.CDLL(None, use_errno=True)


def legacy_table_size(netns: str | None, family: IPFamily, table: str) -> tuple[int, int] | None:
    """(entries, bytes) of an iptables-legacy table, read without fetching its rules (None: could
    not be read). Any flush or edit changes it; a probe skips the table's canary while it is the
    same: `-S` of the nat table copies every rule out of the kernel (~1% of a core every 30 s
    at 10,000 services), this costs microseconds."""
    domain, level = (socket.AF_INET, socket.IPPROTO_IP) if family is IPFamily.V4 else (socket.AF_INET6, 41)
    try:
        with entered(netns):
            sock = socket.socket(domain, socket.SOCK_RAW, socket.IPPROTO_RAW)
    except OSError:
        return None
    with sock:
        buf = ctypes.create_string_buffer(_GETINFO.pack(table.encode(), 0, *([0] * 10), 0, 0), _GETINFO.size)
        size = ctypes.c_uint32(_GETINFO.size)
        if _libc.getsockopt(sock.fileno(), level, _SO_GET_INFO, buf, ctypes.byref(size)) != 0:
            return None
        fields = _GETINFO.unpack(buf.raw)
        return fields[-2], fields[-1]


def read_chains(host: Host, family: IPFamily, table: str, chains: Sequence[str]) -> dict[str, KernelChain | None]:
    """Some chains of a table as the kernel has them (None: no such chain), one `-S CHAIN` each.

    For a change a notification named: iptables-save reads the whole table (seconds at 10,000
    services), `-S CHAIN` only that chain. Its lines are iptables-save's but for the chain
    declarations (`-N CHAIN`, `-P CHAIN POLICY`), rewritten here so that `parse_save` reads them.
    """
    found: dict[str, KernelChain | None] = {}
    for chain in chains:
        result = host.runner.run(exec_argv(host.netns, (_command(host, family), "-w", "-t", table, "-S", chain)))
        if result.returncode != 0:
            found[chain] = None
            continue
        lines = [f"*{table}"]
        for line in result.stdout.splitlines():
            if line.startswith(("-N ", "-P ")):
                name, _, policy = line[3:].partition(" ")
                lines.append(f":{name} {policy or '-'} [0:0]")
            else:
                lines.append(line)
        lines.append("COMMIT")
        found[chain] = parse_save("\n".join(lines) + "\n", family).table(table).chains.get(chain)
    return found


def ensure_canaries(host: Host, family: IPFamily) -> None:
    """(Re)create the canary chains with their rule (`:CHAIN` under --noflush flushes only it)."""
    payload = "".join(f"*{table}\n:{CANARY} - [0:0]\n{_CANARY_RULE}\nCOMMIT\n" for table in CANARY_TABLES)
    result = host.run(family, "restore", "-w", "--noflush", input=payload)
    if result.returncode != 0:
        raise CommandError(host.argv(family, "restore", "-w", "--noflush"), result)
