"""kube-proxy's sync_proxy_rules_iptables_total / _last, as the iptables proxier counts them."""

from __future__ import annotations

from kproxy_nft.compile.iptables import compile_ruleset, render_restore
from kproxy_nft.kernel.iptables_plan import plan
from kproxy_nft.kernel.iptables_text import KernelState
from kproxy_nft.lab.synthetic import synthetic_cluster
from kproxy_nft.model import IPFamily
from kproxy_nft.proxier.iptables import _rule_counts
from tests.helpers import NODE


def test_a_first_sync_writes_every_rule_it_owns_and_a_second_writes_none() -> None:
    desired = compile_ruleset(synthetic_cluster(20, 3), NODE)
    first = plan(desired, KernelState(IPFamily.V4))
    counts = _rule_counts(desired, first)
    text = render_restore(desired)
    for table in ("nat", "filter"):
        block = text.split(f"*{table}\n")[1].split("COMMIT")[0]
        rules = sum(line.startswith(("-A ", "-I ")) for line in block.splitlines())
        assert counts[(IPFamily.V4, table)] == (rules, rules)
    again = _rule_counts(desired, plan(desired, first.after))
    assert {key: written for key, (_, written) in again.items()} == {key: 0 for key in counts}
