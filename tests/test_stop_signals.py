"""SIGTERM/SIGINT stop the agent without the handler taking a lock (`runtime.StopSignals`).

A Python signal handler runs on the main thread between two bytecodes, whatever locks that
thread holds at that moment. The main thread waits for the stop, so the lock it holds now and
then is the stop event's own: a handler that set the event itself could deadlock on it.
"""

from __future__ import annotations

import signal
import threading
import time

from kproxy_nft.agent.main import Agent
from kproxy_nft.agent.metrics import new_metrics
from kproxy_nft.agent.runtime import StopSignals, run_until_stopped
from tests.fake_proxier import FakeProxier


def agent_with_signals() -> tuple[Agent, StopSignals]:
    agent = Agent(FakeProxier(), new_metrics(), min_sync_period=1.0, sync_period=30.0)
    signals = StopSignals()
    agent.stop_wakers.append(signals.wake)
    return agent, signals


def test_the_handler_returns_while_the_stop_events_lock_is_held() -> None:
    agent, signals = agent_with_signals()
    returned = threading.Event()

    def signalled_while_holding_it() -> None:
        with agent.stop._cond:  # type: ignore[attr-defined]  # what `Event.wait` holds for a moment
            signals.handle(signal.SIGTERM, None)
        returned.set()

    threading.Thread(target=signalled_while_holding_it, daemon=True).start()
    assert returned.wait(5), "the signal handler blocked on a lock its own thread held"
    assert signals.received == signal.SIGTERM


def test_a_signal_stops_the_agent_at_once() -> None:
    agent, signals = agent_with_signals()
    main = threading.Thread(target=run_until_stopped, args=(agent, signals, 0.5), daemon=True)
    main.start()
    time.sleep(0.2)  # the loop is waiting for work
    started = time.monotonic()
    signals.handle(signal.SIGTERM, None)
    main.join(5)
    assert not main.is_alive() and agent.stop.is_set()
    assert time.monotonic() - started < 0.5  # not at the end of a 1 s wait


def test_a_stop_set_elsewhere_ends_the_wait_at_once() -> None:
    agent, signals = agent_with_signals()
    main = threading.Thread(target=run_until_stopped, args=(agent, signals, 0.5), daemon=True)
    main.start()
    time.sleep(0.2)
    started = time.monotonic()
    agent.stop.set()
    main.join(5)
    assert not main.is_alive() and time.monotonic() - started < 0.5


def test_without_signals_it_runs_until_the_agent_is_stopped() -> None:
    """As benches and embedding code run it (on a thread: no signal handlers there)."""
    agent = Agent(FakeProxier(), new_metrics(), min_sync_period=1.0, sync_period=30.0)
    main = threading.Thread(target=run_until_stopped, args=(agent,), daemon=True)
    main.start()
    time.sleep(0.2)
    started = time.monotonic()
    agent.stop.set()
    main.join(5)
    assert not main.is_alive() and time.monotonic() - started < 0.5
    assert len(agent.stop_wakers) == 1  # its own waker gone again: only the loop's
