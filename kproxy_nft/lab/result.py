"""Typed results of the netlab prober (parsed from the JSON that ``probe.py`` prints)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

#: Error kinds produced by the prober (``Attempt.error``).
ERROR_KINDS = ("refused", "timeout", "unreachable", "reset", "protocol", "error")


@dataclass(frozen=True)
class Attempt:
    """One fresh connection (TCP) or datagram exchange (UDP).

    On success ``pod`` is the answering pod's name and ``seen_ip``/``seen_port`` is the
    source address the server observed (after any SNAT/masquerade).  On failure ``pod``
    is None and ``error`` is one of :data:`ERROR_KINDS`; ``detail`` is a human hint.
    """

    pod: str | None
    seen_ip: str | None = None
    seen_port: int | None = None
    error: str | None = None
    detail: str = ""
    elapsed: float = 0.0
    local_port: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Attempt:
        return cls(
            pod=d.get("pod"),
            seen_ip=d.get("seen_ip"),
            seen_port=d.get("seen_port"),
            error=d.get("error"),
            detail=str(d.get("detail", "")),
            elapsed=float(d.get("elapsed", 0.0)),
            local_port=d.get("local_port"),
        )


@dataclass(frozen=True)
class ProbeResult:
    """All attempts of one probe run against ``target`` (``"ip:port"``) over ``proto``."""

    target: str
    proto: str
    attempts: tuple[Attempt, ...]

    def counts(self) -> dict[str, int]:
        """Answering pod name -> number of successful attempts."""
        return dict(Counter(a.pod for a in self.attempts if a.pod is not None))

    def error_counts(self) -> dict[str, int]:
        """Error kind -> number of failed attempts."""
        return dict(Counter(a.error for a in self.attempts if a.error is not None))

    @property
    def failures(self) -> tuple[Attempt, ...]:
        return tuple(a for a in self.attempts if a.error is not None)

    @property
    def successes(self) -> tuple[Attempt, ...]:
        return tuple(a for a in self.attempts if a.error is None)

    @property
    def ok(self) -> bool:
        """True when there was at least one attempt and none failed."""
        return bool(self.attempts) and not self.failures

    def seen_ips(self) -> set[str]:
        """Distinct source addresses the servers observed."""
        return {a.seen_ip for a in self.attempts if a.seen_ip is not None}

    def __len__(self) -> int:
        return len(self.attempts)

    @classmethod
    def from_json(cls, text: str) -> ProbeResult:
        doc = json.loads(text)
        return cls(
            target=str(doc["target"]),
            proto=str(doc["proto"]),
            attempts=tuple(Attempt.from_dict(a) for a in doc["attempts"]),
        )

    def summary(self) -> str:
        """One line, e.g. ``tcp 10.96.0.10:80 x10: pod1=6 pod2=3 timeout=1``."""
        parts = [f"{k}={v}" for k, v in sorted(self.counts().items())]
        parts += [f"{k}={v}" for k, v in sorted(self.error_counts().items())]
        return f"{self.proto} {self.target} x{len(self.attempts)}: " + " ".join(parts)
