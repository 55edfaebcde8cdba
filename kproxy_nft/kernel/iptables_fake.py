"""An in-memory iptables for tests: `iptables-restore` semantics on a `KernelState`, and a fake runner.

`simulate_restore` applies restore input to a state the way the real tool does, including its
failure modes, so properties like "applying plan(a → b) to a gives b" can be checked without a
kernel:

* each `*table … COMMIT` block is one transaction: it commits at COMMIT, all or nothing, and
  tables committed before a failing one stay committed (as with the real tool);
* under `--noflush`, `:CHAIN - [0:0]` creates a user chain or flushes an existing one;
  without it, the block starts from an empty table (built-in chains kept, emptied);
* a jump to a chain that does not exist, `-X` of a chain that is not empty or still referenced,
  `-D` of a rule that is not there, `-I` past the end: errors, with the line number;
* `--test` checks everything and commits nothing.

Rules are compared in canonical form (`iptables_rule.canonical`), as the kernel compares them.

`FakeIptables` is a `Runner` that answers `iptables-save`/`iptables-restore` argv and the
listing of one chain (`iptables -t TABLE -S CHAIN`), with or without `ip netns exec NS`, from
such states. It records every call, and can be told to refuse a table at commit time, the way
the kernel refuses a rule no parser can catch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kproxy_nft.kernel.iptables_rule import TARGETS, canonical, jump_target, tokenize
from kproxy_nft.kernel.iptables_text import BUILTIN_CHAINS, KernelChain, KernelState, KernelTable, render_table
from kproxy_nft.kernel.runner import Completed, Input, input_text
from kproxy_nft.model import IPFamily

# Targets that are extensions, not chains (a jump to anything else must name an existing chain).
_EXTENSION_TARGETS = frozenset(TARGETS) | {"QUEUE", "NFQUEUE", "CONNMARK", "CT", "NOTRACK", "TPROXY", "REDIRECT"}


class SimulatedRestoreError(Exception):
    """A restore the real tool would refuse. `state` holds the tables committed before the error."""

    def __init__(self, line: int, message: str, state: KernelState) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message
        self.state = state


class _Block:
    """One table being edited: a private copy of its chains, committed at COMMIT."""

    def __init__(self, table: KernelTable, noflush: bool, family: IPFamily) -> None:
        self.name = table.name
        self.family = family
        if noflush:
            self.chains = {c.name: (c.policy, list(c.rules)) for c in table.chains.values()}
        else:
            self.chains = {c.name: (c.policy, []) for c in table.chains.values() if c.builtin}
        for builtin in BUILTIN_CHAINS.get(table.name, ()):
            self.chains.setdefault(builtin, ("ACCEPT", []))

    def freeze(self) -> KernelTable:
        return KernelTable.of(self.name, (KernelChain(n, tuple(r), p) for n, (p, r) in self.chains.items()))

    def rules(self, chain: str) -> list[str]:
        if chain not in self.chains:
            raise ValueError(f"chain {chain} does not exist")
        return self.chains[chain][1]

    def check_target(self, rule: str) -> None:
        target = jump_target(rule)
        if target is not None and target not in self.chains and target not in _EXTENSION_TARGETS:
            raise ValueError(f"Chain '{target}' does not exist")

    def find(self, chain: str, rule: str) -> int:
        canon = canonical(rule, self.family)
        for i, existing in enumerate(self.rules(chain)):
            if canonical(existing, self.family) == canon:
                return i
        raise ValueError("Bad rule (does a matching rule exist in that chain?)")

    def command(self, line: str) -> None:
        tokens = line.split(None, 2)
        op, chain, rest = tokens[0], tokens[1] if len(tokens) > 1 else "", tokens[2] if len(tokens) > 2 else ""
        if op == "-A":
            self.check_target(rest)
            self.rules(chain).append(rest)
        elif op == "-I":
            number, _, rule = rest.partition(" ")
            position, rule = (int(number), rule) if number.isdigit() else (1, rest)
            rules = self.rules(chain)
            if not 1 <= position <= len(rules) + 1:
                raise ValueError("Index of insertion too big")
            self.check_target(rule)
            rules.insert(position - 1, rule)
        elif op == "-D":
            rules = self.rules(chain)
            if rest.isdigit():
                if not 1 <= int(rest) <= len(rules):
                    raise ValueError("Index of deletion too big")
                del rules[int(rest) - 1]
            else:
                del rules[self.find(chain, rest)]
        elif op == "-F":
            self.rules(chain).clear()
        elif op == "-N":
            if chain in self.chains:
                raise ValueError("Chain already exists")
            self.chains[chain] = (None, [])
        elif op == "-X":
            self.delete_chain(chain)
        elif op in ("-S", "-L"):
            pass  # listing: output only
        else:
            raise ValueError(f"unknown command {op}")

    def delete_chain(self, chain: str) -> None:
        policy, rules = self.chains.get(chain, (None, None))
        if rules is None or policy is not None:
            raise ValueError(f"cannot delete chain {chain}: no such user chain")
        if rules:
            raise ValueError(f"cannot delete chain {chain}: Directory not empty")
        if any(jump_target(r) == chain for _, rs in self.chains.values() for r in rs):
            raise ValueError(f"cannot delete chain {chain}: Too many links")
        del self.chains[chain]

    def declare(self, line: str) -> None:
        name, policy = line[1:].split()[:2]
        if policy != "-":
            self.chains[name] = (policy, self.chains.get(name, (policy, []))[1])
        elif name in self.chains:
            self.chains[name][1].clear()  # --noflush: declaring an existing chain flushes it
        else:
            self.chains[name] = (None, [])


def simulate_restore(
    state: KernelState,
    payload: str,
    noflush: bool = True,
    test: bool = False,
    refuse: Callable[[str], bool] = lambda table: False,
) -> KernelState:
    """The state after `iptables-restore [--noflush] [--test]` of payload (see the module docstring).

    `refuse(table)` makes the commit of that table fail, as a kernel refusing a rule would.
    """
    committed = state
    block: _Block | None = None
    for number, raw in enumerate(payload.splitlines(), 1):
        line = raw.strip()
        try:
            if not line or line.startswith("#"):
                continue
            if line.startswith("*"):
                block = _Block(committed.table(line[1:]), noflush, state.family)
            elif block is None:
                raise ValueError("no table given")
            elif line == "COMMIT":
                if refuse(block.name):
                    raise ValueError(f"table {block.name}: commit refused")
                if not test:
                    committed = committed.replace_table(block.freeze())
                block = None
            elif line.startswith(":"):
                block.declare(line)
            else:
                tokenize(line)  # the real tool would stop at text it cannot tokenize, too
                block.command(line)
        except (ValueError, IndexError) as e:
            raise SimulatedRestoreError(number, str(e), committed) from e
    if block is not None:
        raise SimulatedRestoreError(len(payload.splitlines()), "COMMIT expected", committed)
    return committed


# ---------------------------------------------------------------------------------------------
# the fake runner
# ---------------------------------------------------------------------------------------------

_TOOL = re.compile(r"(ip6?tables)-(nft|legacy)(?:-(save|restore))?")


@dataclass
class FakeIptables:
    """A `Runner` backed by in-memory states, one per (backend, family). Records every call.

    `refuse` is consulted at each COMMIT of a real (not `--test`) restore: return True to make
    that table fail the way a kernel refusal does (after earlier tables committed).
    """

    states: dict[tuple[str, IPFamily], KernelState] = field(default_factory=dict)
    calls: list[tuple[tuple[str, ...], str | None]] = field(default_factory=list)
    refuse: Callable[[str], bool] = lambda table: False

    def state(self, backend: str = "nft", family: IPFamily = IPFamily.V4) -> KernelState:
        return self.states.get((backend, family)) or KernelState(family)

    def set_state(self, state: KernelState, backend: str = "nft") -> None:
        self.states[(backend, state.family)] = state

    def run(self, argv: Sequence[str], input: Input = None) -> Completed:
        input = input_text(input)
        self.calls.append((tuple(argv), input))
        args = list(argv)
        if args[:3] == ["ip", "netns", "exec"]:
            args = args[4:]  # namespaces are not modelled: one state per backend and family
        m = _TOOL.fullmatch(args[0]) if args else None
        if m is None:
            return Completed(127, "", f"{args[0] if args else ''}: command not found")
        family = IPFamily.V4 if m.group(1) == "iptables" else IPFamily.V6
        backend, action = m.group(2), m.group(3)
        state = self.state(backend, family)
        if action == "save":
            return self._save(state, args[1:])
        if action is None:
            return self._list_chain(state, args[1:])
        try:
            after = simulate_restore(
                state,
                input or "",
                noflush="--noflush" in args or "-n" in args,
                test="--test" in args or "-t" in args,
                refuse=lambda table: "--test" not in args and self.refuse(table),
            )
        except SimulatedRestoreError as e:
            self.states[(backend, family)] = e.state
            return Completed(2, "", f"{args[0]}: {e.message}\nError occurred at line: {e.line}\n")
        self.states[(backend, family)] = after
        return Completed(0, "", "")

    @staticmethod
    def _list_chain(state: KernelState, args: list[str]) -> Completed:
        """`iptables [-w] -t TABLE -S CHAIN`, the one listing the proxier runs: `-P CHAIN POLICY`
        for a built-in chain, `-N CHAIN` for another, then its rules; exit 1 when it is missing."""
        if "-S" not in args or "-t" not in args:
            return Completed(2, "", f"fake iptables: only -t TABLE -S CHAIN is answered, not {args}")
        table, chain = args[args.index("-t") + 1], args[args.index("-S") + 1]
        found = state.table(table).chains.get(chain)
        if found is None:
            return Completed(1, "", f"iptables: Bad built-in chain name or chain {chain} does not exist.\n")
        head = f"-P {chain} {found.policy}" if found.builtin else f"-N {chain}"
        return Completed(0, "".join(f"{line}\n" for line in (head, *(f"-A {chain} {r}" for r in found.rules))), "")

    @staticmethod
    def _save(state: KernelState, args: list[str]) -> Completed:
        names = [args[args.index("-t") + 1]] if "-t" in args else list(state.tables)
        lines = ["# Generated by fake iptables-save"]
        for name in names:
            table = state.table(name)
            builtins = [KernelChain(c, (), "ACCEPT") for c in BUILTIN_CHAINS.get(name, ()) if c not in table.chains]
            lines += render_table(KernelTable.of(name, [*builtins, *table.chains.values()]))
        return Completed(0, "\n".join(lines) + "\n", "")
