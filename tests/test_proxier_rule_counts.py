"""kube-proxy's sync_proxy_rules_iptables_total / _last and nftables_cleanup_failures: what the
proxiers count, and how the agent exports it."""

from __future__ import annotations

from prometheus_client import generate_latest

from kproxy_nft.agent.main import Agent
from kproxy_nft.agent.metrics import new_metrics
from kproxy_nft.compile.iptables import compile_ruleset, render_restore
from kproxy_nft.kernel.iptables_plan import plan
from kproxy_nft.kernel.iptables_text import KernelState
from kproxy_nft.lab.synthetic import synthetic_cluster
from kproxy_nft.model import IPFamily
from kproxy_nft.proxier.iptables import _rule_counts
from tests.fake_proxier import FakeProxier
from tests.helpers import NODE


def test_a_first_sync_writes_every_rule_it_owns_and_a_second_writes_none() -> None:
    desired = compile_ruleset(synthetic_cluster(20, 3), NODE)
    first = plan(desired, KernelState(IPFamily.V4))
    service_rules = sum(len(chain.rules) for chain in desired.table("nat").chains if chain.owner is not None)
    counts = _rule_counts(desired, first, service_rules)
    text = render_restore(desired)
    for table in ("nat", "filter"):
        block = text.split(f"*{table}\n")[1].split("COMMIT")[0]
        rules = sum(line.startswith(("-A ", "-I ")) for line in block.splitlines())
        assert counts[(IPFamily.V4, table)] == (rules, rules)
    again = _rule_counts(desired, plan(desired, first.after), service_rules)
    assert {key: written for key, (_, written) in again.items()} == {key: 0 for key in counts}


class _CountingProxier(FakeProxier):
    """A proxier whose syncs report rule counts and failed cleanup transactions."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0

    def rule_counts(self) -> dict[tuple[IPFamily, str], tuple[int, int]]:
        return {(IPFamily.V4, "nat"): (120, 7)}

    def cleanup_failures(self) -> int:
        return self.failures


def test_the_agent_exports_the_proxiers_counts_as_kube_proxy_names_them() -> None:
    proxier = _CountingProxier()
    metrics = new_metrics((IPFamily.V4,))
    agent = Agent(proxier, metrics, min_sync_period=0.0, sync_period=30.0)
    proxier.failures = 2
    agent._sync(full=True)  # noqa: SLF001 - one sync, without the loop
    agent._sync(full=False)  # noqa: SLF001 - the same cumulative count is not exported twice
    text = generate_latest(metrics.registry).decode()
    assert 'kubeproxy_sync_proxy_rules_iptables_total{ip_family="IPv4",table="nat"} 120.0' in text
    assert 'kubeproxy_sync_proxy_rules_iptables_last{ip_family="IPv4",table="nat"} 7.0' in text
    assert 'kubeproxy_sync_proxy_rules_nftables_cleanup_failures_total{ip_family="IPv4"} 2.0' in text
