"""Taking a node over from another proxy mode: once our rules are in, remove everyone else's.

kube-proxy removes the rules of the modes it does not run when it starts (`platformCleanup`,
cmd/kube-proxy/app/server_linux.go: each other mode's `CleanupLeftovers`), *before* its own
first sync: between the two, a service has no rules and new connections fail. We remove them
*after* the first successful sync of the mode we run (`RemoveOtherModes`, an after-sync hook).
For that moment both sets of rules are in the kernel, which is harmless: NAT is decided once per
connection, by the first nat chain that maps it, and both send a service's traffic to the same
endpoints; the removal of each ruleset is one atomic commit (one `iptables-restore` per table,
one nft transaction), so at no moment does a service have no rules.

What goes, and nothing else:

* the iptables mode's chains (ours or kube-proxy's: they are the same `KUBE-*` chains, removed by
  `kernel.iptables.cleanup`) and kube-proxy's canary chains (`KUBE-PROXY-CANARY`), both
  families, in every iptables backend (nft, legacy) but the one the running iptables mode uses;
* our nftables mode's tables (`ip`/`ip6 kproxy-nft`, `NftablesBackend.cleanup`) unless it runs;
* kube-proxy's nftables mode's tables (`ip`/`ip6 kube-proxy`), always.

A backend is looked at without `-t` first (`iptables-legacy-save -t nat` would create the legacy
nat table on a node that never had one), and only the tables holding kube-proxy's chains are
cleaned. Never touched: kubelet's chains (`KUBE-FIREWALL`, `KUBE-KUBELET-CANARY`,
`KUBE-IPTABLES-HINT`), which kube-proxy's own cleanup leaves too, and every other chain, rule
and table. Chains of kube-proxy versions older than our layout (`KUBE-XLB-*`, `KUBE-MARK-DROP`)
are not ours to plan and stay (a chain of ours one of them still jumps to is emptied, not deleted).
"""

from __future__ import annotations

import logging

from kproxy_nft.config import ProxySettings
from kproxy_nft.kernel.nftables_transport import check, make_transport
from kproxy_nft.model import ClusterState
from kproxy_nft.proxier import MODES, Proxier, make_proxier
from kproxy_nft.proxier.nftables import tables_present

log = logging.getLogger("kproxy_nft.agent")

# kube-proxy's nftables mode: one table per family (pkg/proxy/nftables/proxier.go, `kubeProxyTable`).
KUBE_PROXY_NFT_TABLE = "kube-proxy"


def remove_other_modes(proxier: Proxier) -> tuple[str, ...]:
    """Remove every other mode's rules from `proxier`'s node (see the module docstring); one line
    per thing removed. Call it only once `proxier` has synced: our rules must be in first.

    Each mode removes its own leftovers (`Proxier.remove_leftovers`): the running one what it
    does not use itself (the iptables mode: the other backend), every other mode all of them.
    """
    removed: list[str] = []
    for mode in MODES:
        if mode == proxier.mode:
            removed += proxier.remove_leftovers(proxier)
            continue
        other = make_proxier(ProxySettings(mode, proxier.node), netns=proxier.netns)
        try:
            removed += other.remove_leftovers(proxier)
        finally:
            other.close()
    removed += _remove_nft_tables(proxier.netns, KUBE_PROXY_NFT_TABLE)
    return tuple(removed)


class RemoveOtherModes:
    """An after-sync hook (`Agent.after_sync`): `remove_other_modes` after the first successful
    sync, and again after each following one until it has succeeded once (a failure is raised,
    and the agent logs it; the rules of the running mode are in either way)."""

    def __init__(self, proxier: Proxier) -> None:
        self._proxier = proxier
        self.done = False

    def __call__(self, state: ClusterState) -> None:
        del state  # what other modes left is read from the kernel, not from the cluster
        if self.done:
            return
        for line in remove_other_modes(self._proxier):
            log.info("taking over from another proxy mode: %s", line)
        self.done = True


def _remove_nft_tables(netns: str | None, name: str) -> list[str]:
    """The tables called `name` in the ip and ip6 families, if present, in one transaction."""
    present = tables_present(netns, name)
    if not present:
        return []
    transport = make_transport(netns)
    try:
        check(transport.run("".join(f"delete table {table}\n" for table in present)), f"delete {name} tables")
    finally:
        transport.close()
    return [f"nftables: removed {', '.join(present)}"]
