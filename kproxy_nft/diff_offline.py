"""An empty node kept in memory, for `kproxy-nft diff`'s offline rule-level change.

`offline_rules` is `apply --dry-run` without a kernel: the very proxiers `apply` uses
(`proxier.iptables`, `proxier.nftables`), their kernel side answered by the fakes
(`kernel/iptables_fake.py`, `kernel/nftables_fake.py`, which refuse what the kernel refuses).
OLD is applied to the empty node by one proxier, and a fresh one reads the rules back and
plans NEW, printing what `apply --dry-run` would on a node that holds OLD's rules. No kernel,
no root, no network namespace: it runs as nobody in a CI container.

Imported only when `diff` runs offline, so other commands never load the fakes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kproxy_nft.config import ProxySettings
from kproxy_nft.diff import RuleChange
from kproxy_nft.kernel.iptables import Host, IptablesBackend
from kproxy_nft.kernel.iptables_fake import FakeIptables
from kproxy_nft.kernel.nftables import NftablesBackend
from kproxy_nft.kernel.nftables_fake import FakeNftables, FakeTransport
from kproxy_nft.kernel.runner import Completed, Input
from kproxy_nft.model import ClusterState, IPFamily, NodeContext, node_families
from kproxy_nft.proxier import KernelSides, Proxier, make_proxier


def offline_families(node: NodeContext) -> tuple[IPFamily, ...]:
    """The families `node` programs. With no kernel to ask, a node without --node-ip is taken
    as dual-stack, as kube-proxy runs on any host with IPv6 (`model.node_families`)."""
    return node_families(node, lambda: True)


# The proxiers reach the kernel only through their lazily opened `host` (iptables) and `backend`
# (nftables), so those are the one seam handed in here (`make_proxier(sides=…)`); were a proxier
# to reach the kernel another way, the run as nobody in tests/test_diff.py would fail.


@dataclass
class _SysctlAccepted:
    """The iptables fake, plus the one other command the iptables mode runs: the route_localnet
    sysctl for localhost node ports, which only matters to packets, so it is accepted."""

    iptables: FakeIptables

    def run(self, argv: Sequence[str], input: Input = None) -> Completed:
        if tuple(argv[:1]) == ("sysctl",):
            return Completed(0, "", "")
        return self.iptables.run(argv, input)


@dataclass
class _InMemoryNode:
    """One node's kernel rules in memory, for both modes; each `proxier` is a fresh one, as each
    `apply` run is (so NEW is planned by reading the rules back, not from a proxier's record)."""

    iptables_backend: IptablesBackend
    iptables: FakeIptables = field(default_factory=FakeIptables)
    nftables: FakeNftables = field(default_factory=FakeNftables)

    def proxier(self, settings: ProxySettings) -> Proxier:
        sides = KernelSides(iptables=Host(self.iptables_backend, None, _SysctlAccepted(self.iptables)),
                            nftables=NftablesBackend(transport=FakeTransport(self.nftables)))
        return make_proxier(settings, families=offline_families(settings.node), sides=sides)


def offline_rules(old: ClusterState, old_settings: ProxySettings, new: ClusterState, new_settings: ProxySettings,
                  iptables_backend: str = "nft") -> RuleChange:
    """`apply --dry-run` of NEW on a node that holds exactly OLD's rules (applied by `apply`'s code)."""
    node = _InMemoryNode(IptablesBackend(iptables_backend))
    before = node.proxier(old_settings)
    before.apply(before.plan(old))
    plan = node.proxier(new_settings).plan(new)
    return RuleChange(new_settings.mode, "offline", plan.is_empty, plan.lines, plan.payload)
