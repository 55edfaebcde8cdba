"""The lab: the demo and test harness, kept out of the agent's import graph.

Throwaway network-namespace labs (node, pods, clients) with real servers (`lab`, `specs`,
`probe`, `server`, `result`), the seed's experiment (`demo`), synthetic clusters for tests and
benches (`synthetic`), and the DNS server launcher and lookups the demo and tests use
(`dns_launch`, `dns_lookup`). Used by the kernel tests, the benches and ``kproxy-nft demo`` to
push real packets through the rules compiled by kproxy-nft; `make lint` checks that the
agent, the proxiers and the kernel layer never import it.  Exports are loaded lazily (PEP 562) so that
``python -m kproxy_nft.lab.server`` / ``.probe`` start fast; pyroute2 itself is only
imported when a :class:`Lab` is started.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .lab import Attachment, Lab, LabCommandError, NetlabError, ProbeLoop
    from .result import ERROR_KINDS, Attempt, ProbeResult
    from .specs import NODE, Addressing, ClientSpec, PodSpec

_EXPORTS = {
    "Attachment": "lab",
    "LabCommandError": "lab",
    "Lab": "lab",
    "NetlabError": "lab",
    "ProbeLoop": "lab",
    "ERROR_KINDS": "result",
    "Attempt": "result",
    "ProbeResult": "result",
    "NODE": "specs",
    "Addressing": "specs",
    "ClientSpec": "specs",
    "PodSpec": "specs",
}

__all__ = [
    "ERROR_KINDS",
    "NODE",
    "Addressing",
    "Attachment",
    "Attempt",
    "ClientSpec",
    "LabCommandError",
    "Lab",
    "NetlabError",
    "PodSpec",
    "ProbeLoop",
    "ProbeResult",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
