"""SIGTERM/SIGINT stop the agent without the handler taking a lock (`runtime.StopSignals`).

A Python signal handler runs on the main thread between two bytecodes, whatever locks that
thread holds at that moment. The main thread waits for the stop, so the lock it holds now and
then is the stop event's own: a handler that set the event itself could deadlock on it.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

from kproxy_nft.agent.main import Agent
from kproxy_nft.agent.metrics import new_metrics
from kproxy_nft.agent.runtime import StopSignals, run_until_stopped
from tests.fake_proxier import FakeProxier


def agent_with_signals() -> tuple[Agent, StopSignals]:
    agent = Agent(FakeProxier(), new_metrics(), min_sync_period=1.0, sync_period=30.0)
    return agent, StopSignals()


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


def seconds_to_stop(agent: Agent, signals: StopSignals | None, stop: Callable[[], None]) -> float:
    """`run_until_stopped` on a thread, its loop waiting for work; then `stop()`: how long
    until it returned (5 s: it did not). Its grace for the loop is 0.5 s."""
    main = threading.Thread(target=run_until_stopped, args=(agent, signals, 0.5), daemon=True)
    main.start()
    time.sleep(0.2)
    started = time.monotonic()
    stop()
    main.join(5)
    return 5.0 if main.is_alive() else time.monotonic() - started


def test_a_signal_stops_the_agent_at_once() -> None:
    agent, signals = agent_with_signals()
    assert seconds_to_stop(agent, signals, lambda: signals.handle(signal.SIGTERM, None)) < 0.5  # not after a 1 s wait
    assert agent.stop.is_set()


def test_a_stop_set_elsewhere_ends_the_wait_at_once() -> None:
    agent, signals = agent_with_signals()
    assert seconds_to_stop(agent, signals, agent.stop.set) < 0.5


def test_without_signals_it_runs_until_the_agent_is_stopped() -> None:
    """As benches and embedding code run it (on a thread: no signal handlers there)."""
    agent = Agent(FakeProxier(), new_metrics(), min_sync_period=1.0, sync_period=30.0)
    assert seconds_to_stop(agent, None, agent.stop.set) < 0.5
    assert len(agent.stop_wakers) == 1  # its waker gone again: only the loop's
