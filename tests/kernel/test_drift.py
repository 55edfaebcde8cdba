"""Drift repaired end to end: a running agent, someone else breaking its rules in a namespace.

nftables and iptables-nft learn of the change from the kernel's nf_tables notifications (the
sync period is long here, so nothing else could repair it in time); iptables-legacy from its
canary chains, probed once per sync period. Each test checks the repair (the rules as the
agent left them), the count and its label, and that someone else's objects survived.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from kubernetes.client import V1EndpointSlice, V1Service

from kproxy_nft.agent.main import Agent
from kproxy_nft.agent.metrics import new_metrics
from kproxy_nft.kernel import libnftables
from kproxy_nft.kernel.nft_monitor import list_tables
from kproxy_nft.kernel.nftables_transport import Transport, make_transport
from kproxy_nft.kernel.runner import Completed
from kproxy_nft.model import IPFamily, NodeContext
from kproxy_nft.proxier import DriftCheck, Proxier
from kproxy_nft.proxier.iptables import IptablesProxier
from kproxy_nft.proxier.nftables import NftablesProxier
from kproxy_nft.sources.events import Change, Replace
from tests.helpers import wait_for
from tests.kernel.conftest import run_in
from tests.test_kube_source import endpoint_slice, service

pytestmark = pytest.mark.kernel
NODE = NodeContext(hostname="node1", cluster_cidrs=("10.1.0.0/16",))
QUIET = 600.0  # sync period of the notified modes: no probe or periodic work during a test


@contextlib.contextmanager
def running(proxier: Proxier, sync_period: float) -> Iterator[Agent]:
    """An agent programming one Service with two endpoints, its loop on a thread; stopped after."""
    agent = Agent(proxier, new_metrics(), min_sync_period=0.05, sync_period=sync_period)
    agent.events.put(Replace("services", (V1Service.model_validate(service("web", "10.96.0.10")),)))
    agent.events.put(Replace("endpointslices", (
        V1EndpointSlice.model_validate(endpoint_slice("web-1", "web", ["10.1.0.1", "10.1.0.2"])),)))
    loop = threading.Thread(target=agent.run, daemon=True)
    loop.start()
    try:
        wait_for(lambda: agent.syncs >= 1)
        yield agent
    finally:
        agent.stop.set()
        loop.join(timeout=5)


def repairs(agent: Agent, noticed_by: str) -> float:
    return sum(sample.value for metric in agent.metrics.registry.collect() for sample in metric.samples
               if sample.name == "kproxy_nft_drift_repairs_total" and sample.labels["noticed_by"] == noticed_by)


def run(netns: str, *argv: str) -> None:
    result = run_in(netns, list(argv))
    assert result.returncode == 0, result.stderr


def assert_repaired(agent: Agent, read: Callable[[], str], before: str, noticed_by: str, timeout: float) -> None:
    wait_for(lambda: read() == before, timeout=timeout)
    wait_for(lambda: repairs(agent, noticed_by) >= 1, timeout=timeout)


# -- nftables ------------------------------------------------------------------------------------

NFT_BREAKAGES = {
    "element deleted": ["nft", "delete", "element", "ip", "kproxy-nft", "service-ips", "{ 10.96.0.10 . tcp . 80 }"],
    "chain flushed": ["nft", "flush", "chain", "ip", "kproxy-nft", "services"],
    "table deleted": ["nft", "delete", "table", "ip", "kproxy-nft"],
}


@pytest.mark.parametrize("breakage", list(NFT_BREAKAGES))
def test_nftables_repairs_what_someone_else_changed(netns: str, breakage: str) -> None:
    run(netns, "nft", "add table ip foreign; add chain ip foreign c; add rule ip foreign c counter accept")

    def ours() -> str:
        return run_in(netns, ["nft", "list", "table", "ip", "kproxy-nft"]).stdout

    with running(NftablesProxier(NODE, netns=netns, families=(IPFamily.V4,)), QUIET) as agent:
        before = ours()
        assert "10.96.0.10 . tcp . 80" in before
        run(netns, *NFT_BREAKAGES[breakage])
        assert_repaired(agent, ours, before, "netlink", timeout=3)
        assert "counter" in run_in(netns, ["nft", "list", "table", "ip", "foreign"]).stdout


class RecordingTransport:
    """A kernel connection that remembers the commands run through it."""

    def __init__(self, inner: Transport, commands: list[str]) -> None:
        self._inner, self.commands = inner, commands

    def run(self, commands: str, output: libnftables.Output = libnftables.PLAIN) -> Completed:
        self.commands.append(commands)
        return self._inner.run(commands, output)

    def close(self) -> None:
        self._inner.close()


# What a drift check reads for each breakage: only the map named, or nothing (a chain is
# rewritten from the record, the notification having said it changed).
TARGETED = {
    "element deleted": (NFT_BREAKAGES["element deleted"], ["list map ip kproxy-nft service-ips"]),
    "chain flushed": (NFT_BREAKAGES["chain flushed"], []),
}


@pytest.mark.parametrize("breakage", list(TARGETED))
def test_nftables_reads_and_repairs_only_what_the_notification_named(
        netns: str, breakage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[str] = []
    # The proxier's drift checks open their own connection (the sync's is not shared): that one records.
    monkeypatch.setattr("kproxy_nft.proxier.nftables.make_transport",
                        lambda *args, **kwargs: RecordingTransport(make_transport(*args, **kwargs), read))

    def ours() -> str:
        return run_in(netns, ["nft", "list", "table", "ip", "kproxy-nft"]).stdout

    with running(NftablesProxier(NODE, netns=netns, families=(IPFamily.V4,)), QUIET) as agent:
        before = ours()
        breakage_argv, expected = TARGETED[breakage]
        run(netns, *breakage_argv)
        assert_repaired(agent, ours, before, "netlink", timeout=3)
        assert read == expected


def test_nftables_ignores_other_tables(netns: str) -> None:
    with running(NftablesProxier(NODE, netns=netns, families=(IPFamily.V4,)), QUIET) as agent:
        for i in range(20):  # someone else committing in a loop: costs us only the messages
            run(netns, "nft", f"add table ip other{i}; delete table ip other{i}")
        syncs = agent.syncs
        run(netns, "nft", "flush", "chain", "ip", "kproxy-nft", "services")  # and ours still repaired
        wait_for(lambda: repairs(agent, "netlink") == 1, timeout=3)
        assert agent.syncs == syncs  # a repair, not a full sync


@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_our_own_commits_cost_only_the_message(netns: str, mode: str) -> None:
    """Our syncs (in-process libnftables; iptables-nft-restore processes we started) start no check."""
    proxier: NftablesProxier | IptablesProxier
    if mode == "nftables":
        proxier = NftablesProxier(NODE, netns=netns, families=(IPFamily.V4,))
    else:
        proxier = IptablesProxier(NODE, iptables_backend="nft", netns=netns, families=(IPFamily.V4,))
    checks: list[frozenset[str] | None] = []
    check_drift = proxier.check_drift

    def counted(chains: frozenset[str] | None = None) -> DriftCheck:
        checks.append(chains)
        return check_drift(chains)

    proxier.check_drift = counted  # type: ignore[method-assign]
    with running(proxier, QUIET) as agent:
        for n in range(3):
            slice_ = endpoint_slice("web-1", "web", ["10.1.0.1", f"10.1.0.{10 + n}"])
            agent.events.put(Change("endpointslices", "MODIFIED", V1EndpointSlice.model_validate(slice_)))
            wait_for(lambda: agent.syncs >= 2 + n)  # noqa: B023 - called at once, in this iteration
        time.sleep(0.5)  # time for any notification to come through
        assert checks == [] and not agent.scheduler.checking


# -- iptables ------------------------------------------------------------------------------------


def saved(netns: str, backend: str) -> Callable[[], str]:
    def read() -> str:
        out = run_in(netns, [f"iptables-{backend}-save", "-t", "nat"]).stdout
        return "".join(line + "\n" for line in out.splitlines() if not line.startswith("#"))
    return read


@pytest.mark.parametrize("flush", [["-F", "KUBE-SERVICES"], ["-D", "PREROUTING", "1"], ["-F"]],
                         ids=["KUBE-SERVICES flushed", "our jump deleted", "nat flushed"])
def test_iptables_nft_repairs_a_flush_noticed_by_the_kernel(netns: str, flush: list[str]) -> None:
    run(netns, "iptables-nft", "-t", "filter", "-N", "FOREIGN")
    run(netns, "iptables-nft", "-t", "filter", "-A", "FOREIGN", "-j", "ACCEPT")
    ours = saved(netns, "nft")
    with running(IptablesProxier(NODE, iptables_backend="nft", netns=netns, families=(IPFamily.V4,)), QUIET) as agent:
        before = ours()
        assert "-A KUBE-SERVICES" in before and "-A PREROUTING" in before
        run(netns, "iptables-nft", "-t", "nat", *flush)
        assert_repaired(agent, ours, before, "netlink", timeout=5)
        assert "-A FOREIGN -j ACCEPT" in run_in(netns, ["iptables-nft-save", "-t", "filter"]).stdout


# Each one command, so that a probe cannot come in the middle of the breakage.
LEGACY_BREAKAGES = {
    "canary deleted": (["iptables-legacy-restore", "--noflush"], "*mangle\n-F KUBE-PROXY-CANARY\n-X KUBE-PROXY-CANARY\n"
                                                                  "COMMIT\n"),
    "nat flushed": (["iptables-legacy", "-t", "nat", "-F"], None),
}


@pytest.mark.parametrize("breakage", list(LEGACY_BREAKAGES))
def test_iptables_legacy_repairs_within_a_sync_period_noticed_by_canaries(netns: str, breakage: str) -> None:
    run(netns, "iptables-legacy", "-t", "filter", "-N", "FOREIGN")
    run(netns, "iptables-legacy", "-t", "filter", "-A", "FOREIGN", "-j", "ACCEPT")
    ours = saved(netns, "legacy")
    proxier = IptablesProxier(NODE, iptables_backend="legacy", netns=netns, families=(IPFamily.V4,))
    with running(proxier, sync_period=1.0) as agent:
        before = ours()
        canaries = run_in(netns, ["iptables-legacy", "-t", "mangle", "-S", "KUBE-PROXY-CANARY"]).stdout
        assert "-A KUBE-PROXY-CANARY" in canaries
        argv, stdin = LEGACY_BREAKAGES[breakage]
        broken = run_in(netns, argv, stdin)
        assert broken.returncode == 0, broken.stderr
        assert_repaired(agent, ours, before, "canary", timeout=10)
        wait_for(lambda: run_in(netns, ["iptables-legacy", "-t", "mangle", "-S", "KUBE-PROXY-CANARY"]).stdout
                 == canaries, timeout=10)
        assert "-A FOREIGN -j ACCEPT" in run_in(netns, ["iptables-legacy-save", "-t", "filter"]).stdout


def test_monitor_unavailable_falls_back_to_canaries_with_one_warning_and_a_metric(
        netns: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from kproxy_nft.kernel import nft_monitor

    def refuse(netns: str | None) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(nft_monitor, "open_socket", refuse)
    ours = saved(netns, "nft")
    proxier = IptablesProxier(NODE, iptables_backend="nft", netns=netns, families=(IPFamily.V4,))
    with running(proxier, sync_period=1.0) as agent:
        assert agent.metrics.registry.get_sample_value("kproxy_nft_drift_monitor_unavailable") == 1.0
        assert sum("no nf_tables notifications" in r.message for r in caplog.records) == 1
        before = ours()
        run(netns, "iptables-nft", "-t", "nat", "-F")
        assert_repaired(agent, ours, before, "canary", timeout=10)


def test_notifications_that_stop_for_good_hand_over_to_canaries(
        netns: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The monitor's socket failing mid-run (not at start): the agent says so once, sets the
    metric, checks at once, and from then on probes the canaries like an agent that never had
    notifications."""
    from kproxy_nft.kernel import nft_monitor

    failed = threading.Event()

    def broken(self: nft_monitor.NftMonitor, reader: nft_monitor.CommitReader) -> None:
        failed.set()
        raise OSError(9, "Bad file descriptor")

    monkeypatch.setattr(nft_monitor.NftMonitor, "_receive", broken)
    ours = saved(netns, "nft")
    proxier = IptablesProxier(NODE, iptables_backend="nft", netns=netns, families=(IPFamily.V4,))
    with running(proxier, sync_period=1.0) as agent:
        assert agent.metrics.registry.get_sample_value("kproxy_nft_drift_monitor_unavailable") == 0.0
        run(netns, "iptables-nft", "-t", "filter", "-N", "FOREIGN")  # any commit wakes the monitor
        wait_for(failed.is_set, timeout=10)
        wait_for(lambda: agent.metrics.registry.get_sample_value("kproxy_nft_drift_monitor_unavailable") == 1.0,
                 timeout=10)
        assert sum("no nf_tables notifications" in r.message for r in caplog.records) == 1
        before = ours()
        run(netns, "iptables-nft", "-t", "nat", "-F")
        assert_repaired(agent, ours, before, "canary", timeout=10)


def test_stop_leaves_the_rules_and_the_monitor(netns: str) -> None:
    with running(NftablesProxier(NODE, netns=netns, families=(IPFamily.V4,)), QUIET):
        pass
    assert "10.96.0.10 . tcp . 80" in run_in(netns, ["nft", "list", "table", "ip", "kproxy-nft"]).stdout
    assert not any(thread.name == "nft-monitor" for thread in threading.enumerate())


def test_the_table_names_come_from_a_netlink_dump_as_nft_lists_them(netns: str) -> None:
    """`list_tables` (the probe, the handover) reads names only; `nft list tables` is the judge."""
    named = [("ip", "kproxy-nft"), ("ip6", "kproxy-nft"), ("inet", "kube-proxy")]
    named += [("ip", f"other{i}") for i in range(300)]  # more than one datagram of answer
    tables = "".join(f"table {family} {name} {{ }}\n" for family, name in named)
    assert run_in(netns, ["nft", "-f", "-"], stdin=tables).returncode == 0
    listed = run_in(netns, ["nft", "list", "tables"]).stdout.splitlines()
    assert list_tables(netns) == {line.removeprefix("table ") for line in listed}
    assert len(list_tables(netns)) == 303
