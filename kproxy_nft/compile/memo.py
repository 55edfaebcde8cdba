"""Fragments kept from one compile to the next, by whoever compiles again (the proxier).

Both compilers build a ruleset from independent per-service-port fragments. An agent compiles
the same cluster again and again, and between two syncs almost every service port is the very
same object (the change tracker reuses unchanged ones), so recompiling it, or even hashing its
endpoints to look it up in a cache, is wasted work: at 10,000 services the lookup alone was a
third of a full compile. A `FragmentMemo` remembers, per service port and family, the inputs
of its last fragment and the fragment; the next compile reuses the fragment when the inputs are
the same objects (or equal ones: an update that changed nothing), so an unchanged service gets
the *same* fragment object back, which the kernel planners skip by identity.

The memo is explicit and owned by the caller: a compile without one (`dump`, tests) keeps no
state at all. It holds only the service ports of the last compile (`retain`), so it is as big
as the cluster, never bigger.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Generic, TypeVar

from kproxy_nft.model import ClusterState, Endpoint, IPFamily, NodeContext, ServicePort, ServicePortName

Fragment = TypeVar("Fragment")
CompileServicePort = Callable[[ServicePort, tuple[Endpoint, ...], NodeContext, IPFamily], Fragment]

_Entry = tuple[ServicePort, tuple[Endpoint, ...], NodeContext, Fragment]


def _same(a: object, b: object) -> bool:
    return a is b or a == b


class FragmentMemo(Generic[Fragment]):
    """The last fragment of each (service port, family), with the inputs it was compiled from."""

    def __init__(self) -> None:
        # Per family, then per service port (not keyed by a (name, family) tuple: 1 MiB at 10k).
        self.entries: dict[IPFamily, dict[ServicePortName, _Entry[Fragment]]] = {family: {} for family in IPFamily}

    def __len__(self) -> int:
        return sum(len(entries) for entries in self.entries.values())

    def retain(self, names: Collection[ServicePortName], family: IPFamily) -> None:
        """Forget the service ports of `family` that are not in `names` (deleted services)."""
        entries = self.entries[family]
        for name in [name for name in entries if name not in names]:
            del entries[name]

    def forget(self, name: ServicePortName, family: IPFamily) -> None:
        self.entries[family].pop(name, None)


def compile_with(
    memo: FragmentMemo[Fragment] | None,
    compile_service_port: CompileServicePort[Fragment],
    svc: ServicePort,
    endpoints: tuple[Endpoint, ...],
    node: NodeContext,
    family: IPFamily,
) -> Fragment:
    """`compile_service_port(svc, endpoints, node, family)`, or, through `memo`, the same fragment
    as last time when the inputs are the same (or equal)."""
    if memo is None:
        return compile_service_port(svc, endpoints, node, family)
    entries = memo.entries[family]
    hit = entries.get(svc.name)
    if hit is not None and _same(hit[0], svc) and _same(hit[1], endpoints) and _same(hit[2], node):
        return hit[3]
    fragment = compile_service_port(svc, endpoints, node, family)
    entries[svc.name] = (svc, endpoints, node, fragment)
    return fragment


def recompile_changed(
    fragments: dict[ServicePortName, Fragment],
    state: ClusterState,
    node: NodeContext,
    family: IPFamily,
    changed: Collection[ServicePortName],
    compile_service_port: CompileServicePort[Fragment],
    memo: FragmentMemo[Fragment] | None,
) -> list[ServicePortName]:
    """Bring `fragments` (in place) up to `state` for the `changed` service ports: removed ones
    go, the others are recompiled. Returns the names that were not there before."""
    added = []
    for name in changed:
        svc = state.services.get(name)
        if svc is None:
            fragments.pop(name, None)
            if memo is not None:
                memo.forget(name, family)
            continue
        if name not in fragments:
            added.append(name)
        fragments[name] = compile_with(memo, compile_service_port, svc, state.endpoints_of(name), node, family)
    return added
