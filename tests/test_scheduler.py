"""The sync runner's timing decisions, driven by a hand-held clock."""

from __future__ import annotations

import math

import pytest

from kproxy_nft.agent.scheduler import FULL_SYNC_PERIOD, MAX_STALE_CHECKS, CheckResult, SyncScheduler, Work


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[float, bool]] = []
        self.fail_next = 0

    def __call__(self, full: bool) -> None:
        self.calls.append((clock.now, full))
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("iptables-restore: exit status 1")


clock = FakeClock()


@pytest.fixture
def runner() -> tuple[SyncScheduler, Recorder]:
    clock.now = 1000.0
    rec = Recorder()
    return SyncScheduler(rec, clock, min_sync_period=1.0, sync_period=30.0), rec


def test_first_sync_is_full_and_immediate(runner: tuple[SyncScheduler, Recorder]) -> None:
    r, rec = runner
    assert r.run_due() is not None and rec.calls == [(1000.0, True)]


def test_a_burst_of_events_gives_one_partial_sync_after_min_period(runner: tuple[SyncScheduler, Recorder]) -> None:
    r, rec = runner
    r.run_due()
    for dt in (0.1, 0.2, 0.3):
        clock.now = 1000 + dt
        r.request()
        assert r.run_due() is None
    assert r.next_due() == 1001.0
    clock.now = 1001.0
    outcome = r.run_due()
    assert outcome is not None and not outcome.full
    assert rec.calls == [(1000.0, True), (1001.0, False)]


def test_without_a_check_the_safety_net_is_an_hourly_blocking_full_sync(
        runner: tuple[SyncScheduler, Recorder]) -> None:
    r, rec = runner
    r.run_due()
    assert r.next_due() == 1000.0 + FULL_SYNC_PERIOD  # the sync period's ticks do nothing at all
    clock.now = 1000.0 + FULL_SYNC_PERIOD - 0.1
    assert r.run_due() is None
    clock.now = 1000.0 + FULL_SYNC_PERIOD
    outcome = r.run_due()
    assert outcome is not None and outcome.full and rec.calls[-1] == (clock.now, True)


class Checks:
    """A `check` callback: records how each check was noticed; the test says when it is done."""

    def __init__(self) -> None:
        self.started: list[tuple[float, str]] = []

    def __call__(self, noticed_by: str) -> None:
        self.started.append((clock.now, noticed_by))


@pytest.fixture
def checking() -> tuple[SyncScheduler, Recorder, Checks]:
    clock.now = 1000.0
    rec, checks = Recorder(), Checks()
    return SyncScheduler(rec, clock, min_sync_period=1.0, sync_period=30.0, check=checks), rec, checks


def test_hourly_safety_net_is_a_check_that_does_not_hold_up_partial_syncs(
        checking: tuple[SyncScheduler, Recorder, Checks]) -> None:
    r, rec, checks = checking
    r.run_due()
    clock.now = 1000.0 + FULL_SYNC_PERIOD
    outcome = r.run_due()
    assert outcome is not None and outcome.work is Work.CHECK and checks.started == [(clock.now, "full-sync")]
    assert r.next_due() == math.inf  # the check runs elsewhere; nothing else is due
    clock.now += 0.5
    r.request()  # a change while the check runs: synced at once, not after it
    outcome = r.run_due()
    assert outcome is not None and outcome.work is Work.PARTIAL and rec.calls[-1] == (clock.now, False)
    r.check_done(CheckResult.CLEAN)
    assert r.next_due() == 1000.0 + 2 * FULL_SYNC_PERIOD


def test_suspected_drift_is_checked_soon_and_a_flood_coalesces(
        checking: tuple[SyncScheduler, Recorder, Checks]) -> None:
    r, rec, checks = checking
    r.run_due()
    clock.now = 1010.0
    for _ in range(100):
        r.request_check("netlink")
    assert r.run_due() is not None and checks.started == [(1010.0, "netlink")]
    for _ in range(100):
        r.request_check("netlink")  # while it runs: remembered once
    r.check_done(CheckResult.REPAIRED)
    assert r.next_due() == 1011.0  # at most one check per min_sync_period
    clock.now = 1011.0
    r.run_due()
    assert len(checks.started) == 2 and len(rec.calls) == 1  # and never a blocking full sync


def test_stale_checks_are_retried_then_replaced_by_a_full_sync(
        checking: tuple[SyncScheduler, Recorder, Checks]) -> None:
    r, rec, checks = checking
    r.run_due()
    for _ in range(MAX_STALE_CHECKS):
        clock.now += 5
        r.request_check("netlink")
        r.run_due()
        r.check_done(CheckResult.STALE)
    clock.now += 5
    outcome = r.run_due()
    assert outcome is not None and outcome.work is Work.FULL and len(checks.started) == MAX_STALE_CHECKS


def test_a_stale_check_is_retried_under_the_name_it_was_noticed_by(
        checking: tuple[SyncScheduler, Recorder, Checks]) -> None:
    r, rec, checks = checking
    r.run_due()
    clock.now += 5
    r.request_check("netlink")
    r.run_due()
    r.check_done(CheckResult.STALE)
    clock.now += 5
    r.run_due()
    assert [how for _, how in checks.started] == ["netlink", "netlink"]


def test_probe_runs_once_per_sync_period_and_nothing_else(checking: tuple[SyncScheduler, Recorder, Checks]) -> None:
    r, rec, checks = checking
    probes: list[float] = []
    r.probe = lambda: probes.append(clock.now)
    r.run_due()
    clock.now = 1030.0
    outcome = r.run_due()
    assert outcome is not None and outcome.work is Work.PROBE and probes == [1030.0]
    assert r.run_due() is None and r.next_due() == 1060.0 and len(rec.calls) == 1 and not checks.started


def test_failure_retries_with_doubling_backoff_and_a_full_sync(runner: tuple[SyncScheduler, Recorder]) -> None:
    r, rec = runner
    r.run_due()
    rec.fail_next = 2
    clock.now = 1005.0
    r.request()
    first = r.run_due()
    assert first is not None and not first.ok and "exit status 1" in (first.error or "")
    assert r.next_due() == 1006.0
    clock.now = 1006.0
    assert r.run_due() is not None  # fails again
    assert r.next_due() == 1008.0  # backoff doubled
    clock.now = 1008.0
    outcome = r.run_due()
    assert outcome is not None and outcome.ok and outcome.full


def test_health_turns_bad_when_a_change_waits_two_sync_periods(runner: tuple[SyncScheduler, Recorder]) -> None:
    r, rec = runner
    assert r.healthy(1060.0) and not r.healthy(1060.1)  # before any sync, the start is pending
    r.run_due()
    assert r.healthy(5000.0)  # nothing pending: healthy however long it stays quiet
    rec.fail_next = 100
    clock.now = 2000.0
    r.request()
    while clock.now < 2061.0:
        clock.now = max(clock.now, r.next_due())
        r.run_due()
    assert not r.healthy(clock.now)
