"""The walk both rule languages share: chains, jumps and verdicts, hooks in kernel order, the `Trace`.

A backend (`trace.iptables`, `trace.nftables`) is a `Program`: it names the base chains of each
netfilter hook in the order the kernel runs them, and evaluates one rule on a `Flow`, answering
with branches (probability, flow, action). Everything else is here:

* `run_chain`: rules in order; `jump` comes back on `return` or at the end, `goto` does not;
  a random match splits the flow into branches whose probabilities multiply;
* `walk`: the hooks a packet passes. From one of the node's addresses or loopback it starts in
  OUTPUT (then POSTROUTING, then INPUT when it stays on the node); from anywhere else in
  PREROUTING, then INPUT if the (translated) destination is local, else FORWARD and POSTROUTING;
* `summarize`: the branches' fates as one `Trace`.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from kproxy_nft.trace.packet import Flow, Packet, Step, is_local

# What a rule does with a flow: go on, leave the chain, enter another, or decide.
CONTINUE = "continue"
RETURN = "return"
VERDICTS = ("dnat", "accept", "drop", "reject", "none")  # the contract's values, JSON `verdict`
ENDS = ("accept", "drop", "reject", "dnat")  # a base chain's decision (accept/dnat: next hook)
MAX_DEPTH = 64  # nested jumps; the kernel's own limit is in the same range


@dataclass(frozen=True)
class Jump:
    chain: str
    goto: bool = False


Action = str | Jump
Branch = tuple[float, Flow, Action]  # probability (of reaching this rule), flow, action
Outcome = tuple[float, Flow, str]  # probability, flow, end (an ENDS value or CONTINUE)


class Program(Protocol):
    """A rule set a packet can be walked through (one family)."""

    def base_chains(self, hook: str) -> Sequence[tuple[str, str]]:
        """(table, chain) of the base chains on `hook`, in the order the kernel runs them."""
        ...

    def rules(self, table: str, chain: str) -> Sequence[str]: ...

    def policy(self, table: str, chain: str) -> str:
        """What a base chain does with a packet that falls off its end (ACCEPT or DROP)."""
        ...

    def evaluate(self, table: str, chain: str, rule: str, flow: Flow) -> list[Branch]:
        """One rule on one flow: [(probability, flow, action)], probabilities summing to 1."""
        ...


def run_chain(program: Program, table: str, chain: str, flow: Flow, depth: int = 0) -> list[Outcome]:
    """Every way `flow` can leave `chain`: decided (an ENDS value) or CONTINUE (returned, fell off)."""
    if depth > MAX_DEPTH:
        return [(1.0, flow.noting(f"jumps nested deeper than {MAX_DEPTH} at {chain}: not followed"), CONTINUE)]
    rules = program.rules(table, chain)

    def from_rule(index: int, probability: float, flow: Flow) -> list[Outcome]:
        out: list[Outcome] = []
        while index < len(rules):
            branches = program.evaluate(table, chain, rules[index], flow)
            if len(branches) == 1 and branches[0][2] == CONTINUE:
                _, flow, _ = branches[0]
                index += 1
                continue  # the common case: the rule did not match, or only marked
            for chance, branch_flow, action in branches:
                if chance > 0:
                    out += _follow(index, probability * chance, branch_flow, action)
            return out
        return [(probability, flow, CONTINUE)]

    def _follow(index: int, probability: float, flow: Flow, action: Action) -> list[Outcome]:
        if action == CONTINUE:
            return from_rule(index + 1, probability, flow)
        if action == RETURN:
            return [(probability, flow, CONTINUE)]
        if isinstance(action, Jump):
            out: list[Outcome] = []
            for chance, after, end in run_chain(program, table, action.chain, flow, depth + 1):
                if after is flow:  # nothing in there matched: the jump is no part of the path
                    after = dataclasses.replace(flow, path=flow.path[:-1])
                if end == CONTINUE and not action.goto:
                    out += from_rule(index + 1, probability * chance, after)
                else:
                    out.append((probability * chance, after, end))
            return out
        return [(probability, flow, action)]

    return from_rule(0, 1.0, flow)


Weighted = tuple[float, Flow]  # a flow still on its way, with its probability


def _run_hook(program: Program, hook: str, flows: Iterable[Weighted]) -> tuple[list[Weighted], list[Outcome]]:
    """The base chains of one hook: flows that go on, and flows dropped or rejected there."""
    going: list[Weighted] = list(flows)
    stopped: list[Outcome] = []
    for table, chain in program.base_chains(hook):
        after: list[Weighted] = []
        for probability, flow in going:
            for chance, out, end in run_chain(program, table, chain, flow):
                if end == CONTINUE and program.policy(table, chain) == "DROP":
                    out, end = out.through(Step(table, chain, "policy DROP")), "drop"
                if end in ("drop", "reject"):
                    stopped.append((probability * chance, out, end))
                else:
                    after.append((probability * chance, out))
        going = after
    return going, stopped


# The hooks after the first one, chosen by the routing decision: (destination is the node's own,
# destination elsewhere). Locally generated packets pass POSTROUTING even to a local address.
_ROUTES = {
    "output": (("postrouting", "input"), ("postrouting",)),
    "prerouting": (("input",), ("forward", "postrouting")),
}


def walk(program: Program, packet: Packet, local: frozenset[str]) -> list[Outcome]:
    """Every fate of `packet` through the hooks it passes, with its probability."""
    first = "output" if is_local(packet.src, local) else "prerouting"
    routed, stopped = _run_hook(program, first, [(1.0, Flow.of(packet))])
    to_node, onward = _ROUTES[first]
    finished: list[Weighted] = []
    for hooks, flows in (
        (to_node, [(p, f) for p, f in routed if is_local(f.dst, local)]),
        (onward, [(p, f) for p, f in routed if not is_local(f.dst, local)]),
    ):
        for hook in hooks:
            flows, dropped = _run_hook(program, hook, flows)
            stopped += dropped
        finished += flows
    return stopped + [(p, f, _verdict(f)) for p, f in finished]


def _verdict(flow: Flow) -> str:
    if flow.endpoint is not None:
        return "dnat"
    return "accept" if flow.accepted else "none"


@dataclass(frozen=True)
class EndpointChance:
    address: str  # ip:port, [v6]:port
    probability: float


@dataclass(frozen=True)
class Route:
    """One way the packet can go: the endpoint it ends at (None: no DNAT), how likely, and its steps."""

    endpoint: str | None
    probability: float
    path: tuple[Step, ...]


@dataclass(frozen=True)
class Trace:
    """Where one packet goes and why: the JSON contract of `kproxy-nft trace -o json` (docs/TRACE.md).

    `masqueraded_endpoints` (not in the JSON): the endpoints whose branch is masqueraded, when
    that depends on the endpoint (hairpin: only a pod that reaches itself is masqueraded).
    """

    verdict: str
    endpoints: tuple[EndpointChance, ...]
    masquerade: bool
    path: tuple[Step, ...]
    reasons: tuple[str, ...]
    masqueraded_endpoints: frozenset[str] = frozenset()
    # Each branch of the walk (not in the JSON): its endpoint (None: no DNAT), chance and steps.
    routes: tuple[Route, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {
            "verdict": self.verdict,
            "endpoints": [{"address": e.address, "probability": round(e.probability, 9)} for e in self.endpoints],
            "masquerade": self.masquerade,
            "path": [step.as_dict() for step in self.path],
            "reasons": list(self.reasons),
        }


def summarize(outcomes: Sequence[Outcome], reasons: Sequence[str] = ()) -> Trace:
    """The fates of every branch as one `Trace`.

    The verdict is the most likely fate (they agree in kube-proxy's layout and ours, where every
    random choice ends in a DNAT); the path lists each step once, in the order first taken.
    """
    weight: dict[str, float] = {}
    chances: dict[str, float] = {}
    masqueraded: set[str] = set()
    path: dict[Step, None] = {}
    notes: dict[str, None] = {}
    for probability, flow, verdict in outcomes:
        weight[verdict] = weight.get(verdict, 0.0) + probability
        path.update(dict.fromkeys(flow.path))
        notes.update(dict.fromkeys(flow.notes))
        if verdict == "dnat" and flow.endpoint is not None:
            chances[flow.endpoint] = chances.get(flow.endpoint, 0.0) + probability
            if flow.masquerade:
                masqueraded.add(flow.endpoint)
    verdict = max(VERDICTS, key=lambda v: (weight.get(v, 0.0), -VERDICTS.index(v)))
    masquerade = any(flow.masquerade for p, flow, _ in outcomes if p > 0)
    extra = list(notes)
    if chances and masqueraded and masqueraded != set(chances):
        extra.append(f"masqueraded only when the endpoint chosen is {', '.join(sorted(masqueraded))} "
                     "(hairpin: the client reached itself)")
    endpoints = tuple(EndpointChance(a, chances[a]) for a in sorted(chances, key=_address_order))
    routes = tuple(Route(flow.endpoint if v == "dnat" else None, p, tuple(flow.path)) for p, flow, v in outcomes)
    return Trace(verdict, endpoints, masquerade, tuple(path), (*reasons, *extra), frozenset(masqueraded), routes)


def _address_order(address: str) -> tuple[int, str]:
    return (1 if address.startswith("[") else 0, address)
