"""What a source hands the agent: a complete list, one watch event, or an object it refused.

Both sources (the API's reflectors in `kube.py`, `--manifests` in `manifest_watch.py`) put these
on the agent's queue; the agent's loop is the only reader, so all state lives in one thread.
The objects are as decoded, or, from a reflector given a `prepare`, what that made of them (the
agent's reflectors hand on Services and EndpointSlices already converted, `agent.changes.PREPARE`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Replace:
    """The complete current list of one resource (after a list or relist): every item, so that
    whatever is not in it is known to be gone."""

    resource: str
    items: tuple[Any, ...]


@dataclass(frozen=True)
class Change:
    """One watch event: `ADDED`, `MODIFIED` or `DELETED` of an object."""

    resource: str
    type: str
    obj: Any


@dataclass(frozen=True)
class Rejection:
    """An invalid object that was not applied; `kind` is "Service", "EndpointSlice", … or "" if unknown.

    `message` is one line naming the object and the field (and, from manifests, the file);
    `outcome` says what the node does instead, e.g. "kept its previous version".
    """

    kind: str
    message: str
    outcome: str = "skipped"


Event = Replace | Change | Rejection  # what the sources put on the agent's queue
