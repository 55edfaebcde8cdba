"""When to sync: bursts of events become one sync, drift checks off the loop, backoff after failures.

The decisions of kube-proxy's `BoundedFrequencyRunner` plus its failure handling, as a small
state machine over an injected clock, so tests drive time by hand. Four kinds of work:

* a **partial sync** (`sync(False)`): an event asks for one; it runs at once unless the
  previous sync started less than `min_sync_period` ago (then at that moment), so a burst of
  events gives one sync;
* a **blocking full sync** (`sync(True)`): reads the kernel back, compiles and plans everything.
  Only when nothing better is known: the first sync, the retry after a failure (the kernel may
  hold a half-known state), and when drift checks keep going stale (see below);
* a **drift check** (`check(noticed_by)`): the kernel read back and compared with what was last
  applied, *started* here and run off the loop's thread by the agent, so it never holds up a
  partial sync; the agent reports back with `check_done`. It runs when drift is suspected
  (`request_check`: a kernel notification, a missing canary) and as the safety net at most once
  per `full_sync_period` (kube-proxy: `proxyutil.FullSyncPeriod`, one hour);
* a **probe** (`probe()`), once per `sync_period`, only where the kernel does not tell us about
  changes (iptables-legacy, or no netlink socket): one cheap call, e.g. kube-proxy's canary
  chains; it calls `request_check` itself when something is missing.

At rest nothing is due before the next probe (if any) or the hourly check: the loop sleeps.

The loop that sleeps until `next_due()` and calls `run_due()` is the agent's shell.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

# kube-proxy does its full resync at most hourly: pkg/proxy/iptables/proxier.go
# `doFullSync := proxier.needFullSync || (time.Since(proxier.lastFullSync) > proxyutil.FullSyncPeriod)`,
# and the nftables proxier's BoundedFrequencyRunner gets `time.Hour` as its maxInterval.
FULL_SYNC_PERIOD = 3600.0
# A check whose comparison our own syncs overtook is retried; after this many in a row the
# next one is a blocking full sync, so a busy cluster cannot postpone the safety net forever.
MAX_STALE_CHECKS = 3


class Clock(Protocol):
    def __call__(self) -> float: ...


class Work(enum.StrEnum):
    FULL = "full"
    PARTIAL = "partial"
    CHECK = "check"
    PROBE = "probe"


class CheckResult(enum.StrEnum):
    CLEAN = "clean"  # the kernel holds what we applied
    REPAIRED = "repaired"  # it did not; the repair is in
    STALE = "stale"  # one of our syncs committed while the kernel was read: the comparison is moot
    UNKNOWN = "unknown"  # nothing applied to compare with (the last sync failed): a full sync is due


@dataclass(frozen=True)
class SyncOutcome:
    full: bool
    ok: bool
    started: float
    duration: float
    error: str | None = None
    work: Work = Work.PARTIAL


class SyncScheduler:
    """Decides when `sync(full)`, `check(noticed_by)` and `probe()` run; `sync` raises on failure.

    Without a `check` callback the safety net is a blocking full sync (as kube-proxy's).
    """

    def __init__(
        self,
        sync: Callable[[bool], None],
        clock: Clock,
        min_sync_period: float = 1.0,
        sync_period: float = 30.0,
        initial_backoff: float = 1.0,
        max_backoff: float = 30.0,
        *,
        full_sync_period: float = FULL_SYNC_PERIOD,
        check: Callable[[str], None] | None = None,
        probe: Callable[[], None] | None = None,
    ) -> None:
        self._sync = sync
        self._check = check
        self.probe: Callable[[], None] | None = probe  # set later when the kernel cannot notify us
        self._clock = clock
        self.min_sync_period = min_sync_period
        self.sync_period = sync_period
        self.full_sync_period = full_sync_period
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self._last_start = -math.inf
        self._last_full = -math.inf  # the last full sync or completed check: the safety net's clock
        self._last_probe = clock()
        self._requested = False
        self._check_requested: str | None = None  # how the suspected drift was noticed
        self._check_started: float | None = None  # a check is running (off the loop) since then
        self._running_noticed_by = ""
        self._last_check = -math.inf
        self._stale_checks = 0
        self._retry_at: float | None = None
        self._backoff = initial_backoff
        self._force_full = True  # the first sync after start is a full one
        self.last_success: float | None = None
        # When the oldest change not yet in the kernel arrived (kube-proxy's "oldest pending
        # queued" time); the start counts as one, since the kernel holds nothing known yet.
        self.oldest_pending: float | None = clock()

    # -- asking for work --------------------------------------------------------------------

    def request(self) -> None:
        """Something changed: sync soon (at most once per min_sync_period)."""
        self._requested = True
        if self.oldest_pending is None:
            self.oldest_pending = self._clock()

    def request_check(self, noticed_by: str) -> None:
        """Drift is suspected: compare the kernel with what we applied soon. Requests made while
        one is pending or running are coalesced (a flood of notifications gives one check per
        min_sync_period)."""
        if self._check is None:
            self._force_full = True
        elif self._check_requested is None:
            self._check_requested = noticed_by

    def check_done(self, result: CheckResult | None) -> None:
        """The running check finished (None: it failed, like a failed sync)."""
        started, self._check_started = self._check_started, None
        if result is None:
            self._failed(self._clock())
            return
        if result is CheckResult.UNKNOWN:
            self._force_full = True
            return
        if result is CheckResult.STALE:
            self._stale_checks += 1
            if self._stale_checks >= MAX_STALE_CHECKS:
                self._force_full = True
            else:
                self._check_requested = self._check_requested or self._running_noticed_by
            return
        self._stale_checks = 0
        self._last_full = max(self._last_full, started if started is not None else self._clock())

    def failed(self) -> None:
        """A kernel write made outside `run_due` (a repair) failed: retry with a full sync."""
        self._failed(self._clock())

    # -- when ---------------------------------------------------------------------------------

    @property
    def checking(self) -> bool:
        return self._check_started is not None

    @property
    def check_pending(self) -> bool:
        """A check is asked for and has not started yet."""
        return self._check_requested is not None

    def next_due(self) -> float:
        """The clock time at which `run_due` will next do something."""
        if self._retry_at is not None:
            return self._retry_at  # a retry is a full sync: it stands in for everything else
        if self._force_full:
            return self._last_start + self.min_sync_period if self._last_start > -math.inf else -math.inf
        due = math.inf
        if not self.checking:
            due = self._last_full + self.full_sync_period
            if self._check_requested is not None:
                due = min(due, self._last_check + self.min_sync_period)
        if self._requested:
            due = min(due, self._last_start + self.min_sync_period)
        if self.probe is not None:
            due = min(due, self._last_probe + self.sync_period)
        return due

    def run_due(self) -> SyncOutcome | None:
        """Do the one piece of work due now, if any; return what happened (None: nothing was due)."""
        now = self._clock()
        if now < self.next_due():
            return None
        if self._retry_at is not None or self._force_full:
            return self._run_sync(now, full=True)
        if self._requested and now >= self._last_start + self.min_sync_period:
            return self._run_sync(now, full=False)
        if not self.checking and (self._check_requested is not None or now >= self._last_full + self.full_sync_period):
            if self._check is None:
                return self._run_sync(now, full=True)
            return self._start_check(now)
        if self.probe is not None and now >= self._last_probe + self.sync_period:
            self._last_probe = now
            self.probe()
            return SyncOutcome(False, True, now, self._clock() - now, work=Work.PROBE)
        return None

    def _start_check(self, now: float) -> SyncOutcome:
        assert self._check is not None
        noticed_by = self._check_requested or "full-sync"
        self._check_requested = None
        self._check_started = self._last_check = now
        self._running_noticed_by = noticed_by
        try:
            self._check(noticed_by)
        except Exception as e:  # noqa: BLE001 - could not even start: like a failed sync
            self._check_started = None
            self._failed(now)
            return SyncOutcome(True, False, now, self._clock() - now, f"{type(e).__name__}: {e}", Work.CHECK)
        return SyncOutcome(True, True, now, self._clock() - now, work=Work.CHECK)

    def _run_sync(self, now: float, full: bool) -> SyncOutcome:
        kind = Work.FULL if full else Work.PARTIAL
        self._requested = False
        self._last_start = now
        try:
            self._sync(full)
        except Exception as e:  # noqa: BLE001 - any failure of a sync is retried, never fatal
            self._failed(now)
            return SyncOutcome(full, False, now, self._clock() - now, f"{type(e).__name__}: {e}", kind)
        self._retry_at = None
        self._backoff = self.initial_backoff
        if full:
            self._force_full = False
            self._stale_checks = 0
            self._last_full = now
            self._check_requested = None  # this sync read everything back: the suspicion is answered
        self.last_success = self._clock()
        if not self._requested:  # nothing arrived while syncing: all changes are in the kernel
            self.oldest_pending = None
        return SyncOutcome(full, True, now, self.last_success - now, work=kind)

    def _failed(self, now: float) -> None:
        self._retry_at = now + self._backoff
        self._backoff = min(self._backoff * 2, self.max_backoff)
        self._force_full = True

    def healthy(self, now: float) -> bool:
        """kube-proxy's /healthz rule (healthcheck/proxier_health.go): unhealthy when a change
        has waited longer than twice the sync period without reaching the kernel."""
        return self.oldest_pending is None or now - self.oldest_pending <= 2 * self.sync_period
