"""The after-sync hook that removes other modes' rules: once, after a successful sync, retried until
it succeeds (the removal itself is proved with packets in tests/kernel/test_handover.py)."""

from __future__ import annotations

import pytest

from kproxy_nft.model import ClusterState
from kproxy_nft.proxier import Proxier, handover
from tests.fake_proxier import FakeProxier


def test_the_hook_removes_once_and_retries_after_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    outcomes: list[object] = [RuntimeError("iptables-restore: resource busy"), ("nftables: removed ip kube-proxy",)]
    calls: list[Proxier] = []

    def remove(proxier: Proxier) -> tuple[str, ...]:
        calls.append(proxier)
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        assert isinstance(outcome, tuple)
        return outcome

    monkeypatch.setattr(handover, "remove_other_modes", remove)
    proxier = FakeProxier()
    hook = handover.RemoveOtherModes(proxier)
    with pytest.raises(RuntimeError):
        hook(ClusterState({}, {}))  # the agent logs a hook's failure; the sync stands
    assert not hook.done
    hook(ClusterState({}, {}))
    hook(ClusterState({}, {}))
    assert hook.done and calls == [proxier, proxier]
