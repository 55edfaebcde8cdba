"""The sync runner's timing decisions, driven by a hand-held clock."""

from __future__ import annotations

import pytest

from kproxy_nft.agent.scheduler import SyncScheduler


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


def test_periodic_full_sync_without_events(runner: tuple[SyncScheduler, Recorder]) -> None:
    r, rec = runner
    r.run_due()
    clock.now = 1029.9
    assert r.run_due() is None
    clock.now = 1030.0
    outcome = r.run_due()
    assert outcome is not None and outcome.full


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
