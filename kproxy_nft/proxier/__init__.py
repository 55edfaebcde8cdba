"""The seam between "what the rules should be" and the kernel: one `Proxier` per proxy mode.

Everything that programs a node goes through this protocol: `dump` (render only), `apply`
(plan, then apply all or nothing), `cleanup`, `demo`, the agent's `run` loop and the benches.
A proxier covers every IP family the node programs (`model.node_families`), as kube-proxy's
MetaProxier does for dual-stack:

* iptables (`proxier.iptables`): one restore per family, kept apart as kube-proxy keeps them,
  and IPv4 reverted when IPv6 then fails (`kernel.iptables.apply_families`);
* nftables (`proxier.nftables`): one `ip`/`ip6` table per family, both in one transaction,
  which is atomic across tables (two per-family proxiers would give that up).

`make_proxier` is the only place that chooses an implementation by mode (the other is the
config's default mode). Implementations are imported when chosen, so `dump` never loads the
kernel layer's ctypes and netlink code.

Deliberately not here: compiling rules (`compile.*`, pure), and reading or writing the kernel
(`kernel.*`); a proxier only puts those together.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from kproxy_nft.config import PROXY_MODES, ProxySettings
from kproxy_nft.kernel.conntrack import CleanupResult, ConntrackCleaner
from kproxy_nft.kernel.nftables_events import Interest
from kproxy_nft.model import ClusterState, IPFamily, NodeContext, ServicePortName, node_families

if TYPE_CHECKING:
    from kproxy_nft.kernel.iptables import Host
    from kproxy_nft.kernel.nftables import NftablesBackend
    from kproxy_nft.top import Sample
    from kproxy_nft.trace import Program

# mode → module:class: the only table of modes.
_IMPLEMENTATIONS = {
    "iptables": "kproxy_nft.proxier.iptables:IptablesProxier",
    "nftables": "kproxy_nft.proxier.nftables:NftablesProxier",
}
MODES = PROXY_MODES
assert set(MODES) == set(_IMPLEMENTATIONS)


@dataclass(frozen=True)
class ProxierPlan:
    """What a sync would change, before anything is sent (`apply --dry-run` prints it).

    `lines`: a human summary, one line each (which service ports' chains or elements change);
    `payload`: the exact text that would be sent (restore input, or nft script); `detail`: the
    implementation's own plan, which `Proxier.apply` takes back.
    """

    is_empty: bool
    lines: tuple[str, ...]
    payload: str
    detail: object


@dataclass(frozen=True)
class DriftCheck:
    """The kernel read back and compared with what a proxier last applied (`Proxier.check_drift`).

    `differs`: what holds something else ("ip kproxy-nft", "IPv4 nat"; empty: all as applied);
    `repair`: the implementation's plan that puts it back, which `Proxier.repair` takes back;
    `known`: False when nothing is known to compare with (no sync yet, or the last one failed);
    `stale`: a sync of ours committed while the kernel was read, so the read may show our own
    change as a difference: nothing was compared (check again).
    """

    differs: tuple[str, ...] = ()
    repair: object = None
    known: bool = True
    stale: bool = False


@dataclass(frozen=True)
class KernelSides:
    """Kernel sides a proxier takes instead of opening its own (`make_proxier(sides=…)`), each
    mode its own: `iptables` (its `Host`) or `nftables` (its backend). `diff_offline` hands in
    sides answered by the in-memory fakes."""

    iptables: Host
    nftables: NftablesBackend


class Proxier(Protocol):
    """Makes the kernel hold the rules of a `ClusterState` for one node, in one mode."""

    mode: str

    @property
    def tools(self) -> tuple[str, ...]:
        """The commands this mode runs (the demo checks they are installed)."""
        ...

    @property
    def node(self) -> NodeContext:
        """The node the rules are compiled for."""
        ...

    @property
    def families(self) -> tuple[IPFamily, ...]:
        """The IP families this proxier programs."""
        ...

    @property
    def netns(self) -> str | None:
        """The network namespace it programs (None: the caller's)."""
        ...

    def set_node(self, node: NodeContext) -> None:
        """The node changed (its IPs, zone, service CIDRs): the next sync recompiles everything."""
        ...

    def render(self, state: ClusterState, family: IPFamily = IPFamily.V4) -> str:
        """The desired rules as text, without the kernel (`dump`). iptables keeps one restore
        input per family and renders `family`'s; nftables renders one script for every family."""
        ...

    def plan(self, state: ClusterState) -> ProxierPlan:
        """Read the kernel and plan the change to `state`; nothing is sent."""
        ...

    def apply(self, plan: ProxierPlan) -> None:
        """Send a plan, all or nothing across the families (raises; the kernel is then as it was)."""
        ...

    def sync(self, state: ClusterState, full: bool, changed: frozenset[ServicePortName] | None = None) -> str:
        """Make the kernel hold `state`; return a short summary. `full` re-reads the kernel and
        repairs drift; `changed` names the service ports that differ from the previous sync
        (None: unknown), so that only those are recompiled and compared."""
        ...

    def read_back(self) -> str:
        """What the kernel holds of ours, as text (iptables-save lines of our chains, or the tables)."""
        ...

    def cleanup(self) -> tuple[str, ...]:
        """Remove everything this mode owns, and nothing else; one line per family said what went."""
        ...

    def drift(self) -> int:
        """Kernel differences repaired so far by full syncs (`sync(full=True)`)."""
        ...

    # kube-proxy counts a failed partial iptables-restore
    # (sync_proxy_rules_iptables_partial_restore_failures_total); its nftables mode has no such count.
    counts_partial_failures: bool

    def rule_counts(self) -> Mapping[tuple[IPFamily, str], tuple[int, int]]:
        """(rules in the table, rules the last sync wrote) per family and table, as kube-proxy's
        sync_proxy_rules_iptables_total / _last report them; empty where it reports none."""
        ...

    def cleanup_failures(self) -> int:
        """Deferred cleanup transactions that failed so far (kube-proxy's
        sync_proxy_rules_nftables_cleanup_failures_total); always 0 where there are none."""
        ...

    def check_drift(self, chains: frozenset[str] | None = None) -> DriftCheck:
        """Read the kernel back and compare it with what the last sync applied; change nothing.

        Runs on another thread while `sync` goes on (its own kernel connection, a consistent
        copy of the record), so an expensive read never holds up a partial sync. `chains`: the
        only per-service chains that can differ (a kernel notification named them; the shared
        ones are compared anyway), for an implementation whose comparison is costly per chain.
        """
        ...

    def repair(self, check: DriftCheck) -> bool:
        """Send `check`'s repair (on the sync thread); False when a sync since made it stale."""
        ...

    def probe(self) -> tuple[str, ...]:
        """One cheap look for wholesale loss (kube-proxy's canary chains; our tables): what is
        missing. For modes or hosts where the kernel does not notify us (`drift_interest`)."""
        ...

    def drift_interest(self) -> Interest | None:
        """Which nf_tables objects are ours, for `kernel.nft_monitor` (None: this mode's rules
        send no notifications, iptables-legacy)."""
        ...

    def clean_conntrack(self, state: ClusterState,
                        changed: frozenset[ServicePortName] | None = None) -> CleanupResult:
        """Delete the UDP/SCTP flows the last sync made stale. Never raises."""
        ...

    def trace_program(self, state: ClusterState, family: IPFamily, local: frozenset[str]) -> Program:
        """The rules this mode compiles for `state` on the node, for one family, ready to walk
        (`kproxy-nft trace` offline: no kernel). `local`: the addresses the node owns."""
        ...

    def live_trace_program(self, family: IPFamily, local: frozenset[str]) -> Program | None:
        """The rules of this mode the kernel holds now for `family`, ready to walk (`trace --live`);
        only reads, never writes. None: this mode has no rules of `family` there. Raises OSError
        or the kernel layer's errors when they cannot be read."""
        ...

    # What `connection_counts` counts, in a few words ("backend map element counters").
    counters_kept: str

    def connection_counts(self, families: Iterable[IPFamily] = (IPFamily.V4, IPFamily.V6)) -> Sample | None:
        """New connections per service port and endpoint, from the counters this mode's rules keep
        (`kproxy-nft top`, the demo), taken now; only reads. None: this mode's counters are not on
        the node. IPv6 is left out on a kernel booted without it. Raises `CounterReadError`."""
        ...

    def remove_leftovers(self, running: Proxier) -> tuple[str, ...]:
        """Take the node over from this mode (`proxier.handover`): remove what it left that
        `running` (the proxier now programming the node, maybe this one) does not use; only what
        is there is removed, nothing is created. One line per thing removed."""
        ...

    def close(self) -> None:
        ...


class ProxierBase:
    """What every proxier keeps the same way: its node, the families it programs (asked of the
    kernel only when the node's IPs do not say, `model.node_families`), and the conntrack cleaner."""

    def __init__(self, node: NodeContext, netns: str | None, families: tuple[IPFamily, ...] | None) -> None:
        self._node = node
        self._netns = netns
        self._families = families
        self._cleaner: ConntrackCleaner | None = None

    def _ipv6_supported(self) -> bool:
        raise NotImplementedError

    @property
    def families(self) -> tuple[IPFamily, ...]:
        if self._families is None:
            self._families = node_families(self._node, self._ipv6_supported)
        return self._families

    @property
    def node(self) -> NodeContext:
        return self._node

    @property
    def netns(self) -> str | None:
        return self._netns

    def set_node(self, node: NodeContext) -> None:
        self._node = node
        if self._cleaner is not None:
            self._cleaner.node = node

    def clean_conntrack(self, state: ClusterState,
                        changed: frozenset[ServicePortName] | None = None) -> CleanupResult:
        if self._cleaner is None:
            self._cleaner = ConntrackCleaner(self._node, self._netns, self.families)
        return self._cleaner.after_sync(state, changed)


def make_proxier(settings: ProxySettings, *, mode: str | None = None, netns: str | None = None,
                 iptables_backend: str | None = None, families: Sequence[IPFamily] | None = None,
                 sides: KernelSides | None = None) -> Proxier:
    """The proxier of `mode` (default: the settings' mode) for `settings.node`.

    `netns`: program that network namespace (tests, the demo's lab); `iptables_backend`: "nft"
    or "legacy" (None: detect like kube-proxy); `families`: override `node_families`; `sides`:
    the kernel sides to use instead of opening them (`diff_offline`'s in-memory node).
    Opening the kernel side is lazy: a proxier used only to `render` touches nothing.
    """
    module_name, _, class_name = _IMPLEMENTATIONS[mode or settings.mode].partition(":")
    implementation = getattr(importlib.import_module(module_name), class_name)
    proxier: Proxier = implementation(settings.node, netns=netns, iptables_backend=iptables_backend,
                                      families=tuple(families) if families is not None else None, sides=sides)
    return proxier


def with_local_addresses(settings: ProxySettings, netns: str | None) -> ProxySettings:
    """The settings with the node's interface addresses, for `--nodeport-addresses CIDR`.

    Read once (kube-proxy re-reads them on every sync; an address added later is picked up on
    the agent's next start). `dump` does not call this: it knows only `--node-ip`.
    """
    if not any(entry != "primary" for entry in settings.node.nodeport_addresses):
        return settings  # no CIDR to match them against
    from kproxy_nft.kernel.addresses import local_addresses

    node = dataclasses.replace(settings.node, local_addresses=local_addresses(netns))
    return dataclasses.replace(settings, node=node)
