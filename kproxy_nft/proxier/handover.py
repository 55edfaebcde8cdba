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

from kproxy_nft.compile.nftables import TABLE as OUR_NFT_TABLE
from kproxy_nft.kernel import iptables as kernel_iptables
from kproxy_nft.kernel.iptables_plan import MANAGED_TABLES, is_owned
from kproxy_nft.kernel.iptables_text import SaveFormatError, parse_save
from kproxy_nft.kernel.nftables import NftablesBackend
from kproxy_nft.kernel.nftables_transport import check, make_transport
from kproxy_nft.model import ClusterState, IPFamily
from kproxy_nft.proxier import Proxier
from kproxy_nft.proxier.iptables import IptablesProxier

log = logging.getLogger("kproxy_nft.agent")

# kube-proxy's nftables mode: one table per family (pkg/proxy/nftables/proxier.go, `kubeProxyTable`).
KUBE_PROXY_NFT_TABLE = "kube-proxy"
NFT_FAMILIES = ("ip", "ip6")


def remove_other_modes(proxier: Proxier) -> tuple[str, ...]:
    """Remove every other mode's rules from `proxier`'s node (see the module docstring); one line
    per thing removed. Call it only once `proxier` has synced: our rules must be in first."""
    removed: list[str] = []
    running_backend = _iptables_backend_of(proxier)
    for backend in kernel_iptables.IptablesBackend:
        if backend is not running_backend:
            removed += _remove_iptables_mode(kernel_iptables.Host(backend, proxier.netns))
    if proxier.mode != "nftables":
        removed += _remove_our_nftables_tables(proxier.netns)
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


def _iptables_backend_of(proxier: Proxier) -> kernel_iptables.IptablesBackend | None:
    """The iptables backend the running mode writes to (None: it writes to none)."""
    return proxier.host.backend if isinstance(proxier, IptablesProxier) else None


def _remove_iptables_mode(host: kernel_iptables.Host) -> list[str]:
    """kube-proxy's iptables-mode chains and canaries in one backend, both families."""
    removed = []
    for family in IPFamily:
        # Without -t: only the tables that exist are listed, none is created.
        saved = host.run(family, "save")
        if saved.returncode != 0:
            continue  # this backend's tool is missing or has no such family: nothing there
        try:
            state = parse_save(saved.stdout, family)
        except SaveFormatError as e:
            raise kernel_iptables.IptablesError(f"{host.backend.value} IPv{int(family)}: {e}") from e
        where = f"iptables-{host.backend.value} IPv{int(family)}"
        if any(is_owned(name, chain) for name in MANAGED_TABLES if name in state.tables
               for chain in state.tables[name].chains):
            plan = kernel_iptables.cleanup(host, family)
            removed.append(f"{where}: removed {len(plan.chains)} chains, {len(plan.jumps)} jumps")
        canaries = [name for name, table in state.tables.items() if kernel_iptables.CANARY in table.chains]
        if canaries:
            _remove_canaries(host, family, canaries)
            removed.append(f"{where}: removed {kernel_iptables.CANARY} from {', '.join(canaries)}")
    return removed


def _remove_canaries(host: kernel_iptables.Host, family: IPFamily, tables: list[str]) -> None:
    """kube-proxy's canary chains: nothing jumps to them, so each goes with a flush and a delete."""
    canary = kernel_iptables.CANARY
    payload = "".join(f"*{table}\n:{canary} - [0:0]\n-X {canary}\nCOMMIT\n" for table in tables)
    result = host.run(family, "restore", "-w", "--noflush", input=payload)
    if result.returncode != 0:
        raise kernel_iptables.CommandError(host.argv(family, "restore", "-w", "--noflush"), result)


def _remove_our_nftables_tables(netns: str | None) -> list[str]:
    """Our nftables mode's tables, by its own cleanup (which deletes nothing else)."""
    present = _nft_tables_present(netns, OUR_NFT_TABLE)
    if not present:
        return []
    with NftablesBackend(netns=netns) as backend:
        backend.cleanup()
    return [f"nftables: removed {', '.join(present)}"]


def _remove_nft_tables(netns: str | None, name: str) -> list[str]:
    """The tables called `name` in the ip and ip6 families, if present, in one transaction."""
    present = _nft_tables_present(netns, name)
    if not present:
        return []
    transport = make_transport(netns)
    try:
        check(transport.run("".join(f"delete table {table}\n" for table in present)), f"delete {name} tables")
    finally:
        transport.close()
    return [f"nftables: removed {', '.join(present)}"]


def _nft_tables_present(netns: str | None, name: str) -> list[str]:
    """`ip NAME`, `ip6 NAME`: those that exist (`list tables` reads names only, not rules)."""
    transport = make_transport(netns)
    try:
        listed = set(check(transport.run("list tables"), "list tables").splitlines())
    finally:
        transport.close()
    return [f"{family} {name}" for family in NFT_FAMILIES if f"table {family} {name}" in listed]
