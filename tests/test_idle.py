"""An agent at rest does nothing: its loop, driven with an injected clock, makes no sync, check or read.

And the hourly safety-net check runs beside the loop: a change arriving meanwhile is synced at once.
"""

from __future__ import annotations

import gc
import threading

import pytest

from kproxy_nft.agent import main as agent_main
from kproxy_nft.agent.main import Agent
from kproxy_nft.agent.metrics import new_metrics
from kproxy_nft.agent.scheduler import FULL_SYNC_PERIOD, Work
from kproxy_nft.model import ClusterState, ServicePortName
from kproxy_nft.proxier import DriftCheck
from kproxy_nft.sources.events import Replace
from tests.fake_proxier import FakeProxier
from tests.helpers import wait_for


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


class CountingProxier(FakeProxier):
    """Counts every call that costs something: syncs (compile, plan), checks (read back), probes."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[bool] = []
        self.checks = 0
        self.probes = 0
        self.check_may_finish = threading.Event()
        self.check_may_finish.set()
        self.check_result = DriftCheck()

    def sync(self, state: ClusterState, full: bool, changed: frozenset[ServicePortName] | None = None) -> str:
        self.syncs.append(full)
        return "ok"

    def check_drift(self, chains: frozenset[str] | None = None) -> DriftCheck:
        self.checks += 1
        self.check_may_finish.wait(10)
        return self.check_result

    def probe(self) -> tuple[str, ...]:
        self.probes += 1
        return ()


def started(proxier: CountingProxier, clock: Clock) -> Agent:
    agent = Agent(proxier, new_metrics(), min_sync_period=1.0, sync_period=30.0, clock=clock)
    agent.events.put(Replace("services", ()))
    agent.events.put(Replace("endpointslices", ()))
    outcome = agent.step(max_wait=0)
    assert outcome is not None and outcome.work is Work.FULL and proxier.syncs == [True]
    return agent


def test_an_idle_agent_does_no_sync_work_for_an_hour() -> None:
    clock, proxier = Clock(), CountingProxier()
    agent = started(proxier, clock)
    assert agent.scheduler.next_due() == 5000.0 + FULL_SYNC_PERIOD  # the loop sleeps until then
    for _ in range(int(FULL_SYNC_PERIOD // 30) - 1):  # every sync period of the hour
        clock.now += 30
        assert agent.step(max_wait=0) is None
    assert proxier.syncs == [True] and proxier.checks == 0 and proxier.probes == 0


def test_without_notifications_the_only_periodic_work_is_one_probe_per_sync_period() -> None:
    clock, proxier = Clock(), CountingProxier()
    agent = started(proxier, clock)
    agent.scheduler.probe = agent._probe  # noqa: SLF001 - as watch_drift does for iptables-legacy
    for _ in range(10):
        clock.now += 30
        outcome = agent.step(max_wait=0)
        assert outcome is not None and outcome.work is Work.PROBE
    assert proxier.probes == 10 and proxier.syncs == [True] and proxier.checks == 0


def test_the_hourly_check_runs_beside_the_loop_and_a_change_is_synced_meanwhile() -> None:
    clock, proxier = Clock(), CountingProxier()
    agent = started(proxier, clock)
    proxier.check_may_finish.clear()  # the read-back takes its time
    clock.now += FULL_SYNC_PERIOD
    outcome = agent.step(max_wait=0)
    assert outcome is not None and outcome.work is Work.CHECK
    wait_for(lambda: proxier.checks == 1)
    agent.scheduler.request()  # an EndpointSlice change while the check reads the kernel
    clock.now += 1
    outcome = agent.step(max_wait=0)
    assert outcome is not None and outcome.work is Work.PARTIAL and proxier.syncs == [True, False]
    proxier.check_may_finish.set()
    while agent.scheduler.checking:
        agent.step(max_wait=0.1)
    assert proxier.syncs == [True, False]  # a clean check changes nothing


def test_a_check_that_finds_drift_repairs_it_and_counts_one_repair() -> None:
    clock, proxier = Clock(), CountingProxier()
    agent = started(proxier, clock)
    proxier.check_result = DriftCheck(("ip kproxy-nft",), repair="plan")
    agent.scheduler.request_check("netlink")
    clock.now += 1
    agent.step(max_wait=0)
    while agent.scheduler.checking:
        agent.step(max_wait=0.1)
    value = agent.metrics.registry.get_sample_value(
        "kproxy_nft_drift_repairs_total", {"what": "ip kproxy-nft", "noticed_by": "netlink"})
    assert value == 1.0 and proxier.syncs == [True]


def test_memory_is_handed_back_after_a_check_that_compared_everything_not_after_a_targeted_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A whole check reads the kernel back and compiles everything (iptables: hundreds of MiB at
    10,000 services, on its own thread); without a release the agent stayed ~60 MiB larger after
    each hourly check. A check of a few named chains costs little and releases nothing."""
    releases: list[int] = []
    monkeypatch.setattr(agent_main, "release_free_memory", lambda: releases.append(1))
    clock, proxier = Clock(), CountingProxier()
    agent = started(proxier, clock)
    releases.clear()  # the first (full) sync's
    for noticed_by, expected in (("netlink", 0), ("full-sync-period", 1)):
        if noticed_by == "netlink":
            agent._noticed_chains = frozenset({"KUBE-SEP-X"})  # noqa: SLF001 - what a notification names
        agent.scheduler.request_check(noticed_by)
        clock.now += 1
        agent.step(max_wait=0)
        while agent.scheduler.checking:
            agent.step(max_wait=0.1)
        agent.step(max_wait=0)
        assert len(releases) == expected, noticed_by


def test_the_collector_stays_paused_from_the_snapshot_to_the_release_and_is_on_again_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sync builds many objects and no cycles. Re-enabling the collector right after the
    proxier's sync made its first collection scan every object the sync kept (0.14 s of a
    first sync at 10k) before the sync was logged; a full sync's release collects anyway."""
    seen: list[tuple[str, bool]] = []
    clock, proxier = Clock(), CountingProxier()
    agent = Agent(proxier, new_metrics(), min_sync_period=1.0, sync_period=30.0, clock=clock)
    counting_sync, counting_snapshot = proxier.sync, agent.tracker.snapshot
    monkeypatch.setattr(proxier, "sync", lambda *a: seen.append(("sync", gc.isenabled())) or counting_sync(*a))
    monkeypatch.setattr(agent.tracker, "snapshot",
                        lambda: seen.append(("snapshot", gc.isenabled())) or counting_snapshot())
    monkeypatch.setattr(agent_main, "release_free_memory", lambda: seen.append(("release", gc.isenabled())))
    agent.after_sync.append(lambda state: seen.append(("hook", gc.isenabled())))
    agent.events.put(Replace("services", ()))
    agent.events.put(Replace("endpointslices", ()))
    assert gc.isenabled()
    agent.step(max_wait=0)  # the first, full sync
    assert gc.isenabled()
    agent.scheduler.request()
    clock.now += 1
    agent.step(max_wait=0)  # a partial one
    assert gc.isenabled() and proxier.syncs == [True, False]
    assert seen == [("snapshot", False), ("sync", False), ("hook", False), ("release", False),
                    ("snapshot", False), ("sync", False), ("hook", False)]
