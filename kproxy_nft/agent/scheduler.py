"""When to sync: bursts of events become one sync, periodic full syncs, backoff after failures.

The decisions of kube-proxy's `BoundedFrequencyRunner` plus its failure handling, as a small
state machine over an injected clock, so tests drive time by hand:

* an event asks for a sync; it runs at once unless the previous sync started less than
  `min_sync_period` ago (then at that moment): a burst of events gives one sync;
* every `sync_period` a full sync runs even without events (it reads the kernel back and
  repairs drift, e.g. a chain deleted by hand);
* a failed sync is retried after a backoff that doubles up to `max_backoff`, and the retry is a
  full sync (the kernel may hold a half-known state).

The loop that sleeps until `next_due()` and calls `run_due()` is the agent's shell.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class Clock(Protocol):
    def __call__(self) -> float: ...


@dataclass(frozen=True)
class SyncOutcome:
    full: bool
    ok: bool
    started: float
    duration: float
    error: str | None = None


class SyncScheduler:
    """Decides when `sync(full)` runs; `sync` raises on failure."""

    def __init__(
        self,
        sync: Callable[[bool], None],
        clock: Clock,
        min_sync_period: float = 1.0,
        sync_period: float = 30.0,
        initial_backoff: float = 1.0,
        max_backoff: float = 30.0,
    ) -> None:
        self._sync = sync
        self._clock = clock
        self.min_sync_period = min_sync_period
        self.sync_period = sync_period
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self._last_start = -math.inf
        self._last_full = -math.inf
        self._requested = False
        self._retry_at: float | None = None
        self._backoff = initial_backoff
        self._force_full = True  # the first sync after start is a full one
        self.last_success: float | None = None
        # When the oldest change not yet in the kernel arrived (kube-proxy's "oldest pending
        # queued" time); the start counts as one, since the kernel holds nothing known yet.
        self.oldest_pending: float | None = clock()

    def request(self) -> None:
        """Something changed: sync soon (at most once per min_sync_period)."""
        self._requested = True
        if self.oldest_pending is None:
            self.oldest_pending = self._clock()

    def next_due(self) -> float:
        """The clock time at which `run_due` will next do something."""
        if self._retry_at is not None:
            return self._retry_at  # a retry is a full sync: it stands in for the periodic one
        due = self._last_full + self.sync_period
        if self._requested:
            due = min(due, self._last_start + self.min_sync_period)
        return due

    def run_due(self) -> SyncOutcome | None:
        """Run a sync if one is due now; return what happened (None when nothing was due)."""
        now = self._clock()
        if now < self.next_due():
            return None
        full = self._force_full or now >= self._last_full + self.sync_period
        self._requested = False
        self._last_start = now
        try:
            self._sync(full)
        except Exception as e:  # noqa: BLE001 - any failure of a sync is retried, never fatal
            self._retry_at = now + self._backoff
            self._backoff = min(self._backoff * 2, self.max_backoff)
            self._force_full = True
            return SyncOutcome(full, False, now, self._clock() - now, f"{type(e).__name__}: {e}")
        self._retry_at = None
        self._backoff = self.initial_backoff
        self._force_full = False
        if full:
            self._last_full = now
        self.last_success = self._clock()
        if not self._requested:  # nothing arrived while syncing: all changes are in the kernel
            self.oldest_pending = None
        return SyncOutcome(full, True, now, self.last_success - now)

    def healthy(self, now: float) -> bool:
        """kube-proxy's /healthz rule (healthcheck/proxier_health.go): unhealthy when a change
        has waited longer than twice the sync period without reaching the kernel."""
        return self.oldest_pending is None or now - self.oldest_pending <= 2 * self.sync_period
