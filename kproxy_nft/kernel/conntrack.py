"""Delete stale conntrack flows through netlink (pyroute2), optionally in a named network namespace.

`kproxy_nft.conntrack` decides which flows are stale (pure); this module does the I/O, in one of
two ways. `reconcile_table` (kube-proxy's reconciler: an agent's first cleanup, full syncs, and
after a failure) lists each family's UDP/SCTP flows and deletes those stale in the current
state alone; it also reads the namespace's addresses, where NodePorts are answered.
`delete_stale_flows` (after a partial sync) only looks for the flows the diff's filters
name. Either way, per IP family, it dumps the table's flows of the protocols wanted (ctnetlink's
`IPCTNL_MSG_CT_GET` with a protocol filter, so a node full of TCP connections sends only its
UDP/SCTP flows), keeps the stale ones, and deletes each by its original tuple
(`IPCTNL_MSG_CT_DELETE`; the kernel deletes by exact tuple only, which is why kube-proxy's
netlink library and the `conntrack` tool also list first). A flow that is gone before we
delete it (expired, or matched twice) is not an error.

Namespaces: pyroute2 0.9.7's sockets take `netns=`, but open it by forking a helper process,
which a multi-threaded agent should not do. The socket belongs to the namespace it is created
in, so instead the calling thread enters `/run/netns/<name>` with setns(2) for the duration of
the cleanup, as `netns.entered` does for nft contexts; no other thread moves.

Failures never raise: they come back in `CleanupResult.errors`, for the caller to log and
count, because a conntrack problem (no nf_conntrack_netlink, no CAP_NET_ADMIN) must not fail a
sync whose rules were applied.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kproxy_nft.conntrack import (
    CLEANED_PROTOCOLS,
    PROTOCOL_NUMBERS,
    Flow,
    FlowFilter,
    canonical_ip,
    flows_to_delete,
    reconcile_flows,
    stale_flow_filters,
)
from kproxy_nft.kernel.addresses import local_addresses
from kproxy_nft.kernel.netns import entered
from kproxy_nft.model import ClusterState, IPFamily, NodeContext, Protocol, ServicePortName

log = logging.getLogger("kproxy_nft.conntrack")

_AF = {IPFamily.V4: socket.AF_INET, IPFamily.V6: socket.AF_INET6}
_IP_ATTRS = {IPFamily.V4: ("CTA_IP_V4_SRC", "CTA_IP_V4_DST"), IPFamily.V6: ("CTA_IP_V6_SRC", "CTA_IP_V6_DST")}
_PROTOCOLS = {number: proto for proto, number in PROTOCOL_NUMBERS.items()}


@dataclass(frozen=True)
class Reconciliation:
    """One family's reconcile of its whole UDP/SCTP table (`reconcile_table`).

    What kube-proxy exports per `ip_family` from its reconciler: `seconds` (listing, deciding and
    deleting) as `conntrack_reconciler_sync_duration_seconds`, `deleted` as
    `conntrack_reconciler_deleted_entries_total`. `listed`: the flows looked at.
    """

    family: IPFamily
    listed: int
    deleted: int
    seconds: float


@dataclass(frozen=True)
class CleanupResult:
    """What one cleanup did: flows deleted, and one line per failure (empty when all went well).

    `filters`: what was looked for, for logs (the diff's filters; after a reconcile also one per
    kind of flow it deleted). `reconciled`: one entry per family whose whole table was
    reconciled (empty when the cleanup only looked for what a change made stale).
    """

    deleted: int = 0
    errors: tuple[str, ...] = ()
    filters: tuple[FlowFilter, ...] = field(default=(), repr=False)
    reconciled: tuple[Reconciliation, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors


def _flow(family: IPFamily, msg: Any) -> Flow | None:
    """A dumped ctnetlink message as a Flow (None for protocols we never clean)."""
    orig, reply = msg.get_attr("CTA_TUPLE_ORIG"), msg.get_attr("CTA_TUPLE_REPLY")
    if orig is None or reply is None:
        return None
    o_proto, r_proto = orig.get_attr("CTA_TUPLE_PROTO"), reply.get_attr("CTA_TUPLE_PROTO")
    protocol = _PROTOCOLS.get(o_proto.get_attr("CTA_PROTO_NUM"))
    if protocol is None:
        return None
    src, dst = _IP_ATTRS[family]
    o_ip, r_ip = orig.get_attr("CTA_TUPLE_IP"), reply.get_attr("CTA_TUPLE_IP")
    # Ports are read as attributes, not through pyroute2's NFCTAttrTuple.from_netlink, which
    # parses them for TCP and UDP only; SCTP carries them in the same CTA_PROTO_* attributes.
    return Flow(
        family=family,
        protocol=protocol,
        orig_src=canonical_ip(o_ip.get_attr(src)),
        orig_dst=canonical_ip(o_ip.get_attr(dst)),
        orig_sport=o_proto.get_attr("CTA_PROTO_SRC_PORT"),
        orig_dport=o_proto.get_attr("CTA_PROTO_DST_PORT"),
        reply_src=canonical_ip(r_ip.get_attr(src)),
        reply_sport=r_proto.get_attr("CTA_PROTO_SRC_PORT"),
        zone=msg.get_attr("CTA_ZONE"),
    )


def _dump(sock: Any, family: IPFamily, protocols: Iterable[Protocol]) -> Iterator[Flow]:
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    for proto in sorted(protocols):
        # The kernel filters by protocol since 5.8; older kernels ignore the filter and send
        # everything, which `_flow` and the filters' own protocol check then sort out.
        wanted = NFCTAttrTuple(family=_AF[family], proto=PROTOCOL_NUMBERS[proto])
        for msg in sock.dump(tuple_orig=wanted):
            flow = _flow(family, msg)
            if flow is not None and flow.protocol is proto:
                yield flow


def _open(family: IPFamily) -> Any:
    from pyroute2 import NFCTSocket

    return NFCTSocket(nfgen_family=_AF[family])


def list_flows(family: IPFamily, protocols: Iterable[Protocol], netns: str | None = None) -> tuple[Flow, ...]:
    """The table's flows of these protocols (for inspection and tests; raises on failure)."""
    with entered(netns):
        sock = _open(family)
        try:
            return tuple(sorted(_dump(sock, family, protocols), key=Flow.sort_key))
        finally:
            sock.close()


def _delete(sock: Any, flow: Flow) -> bool:
    """Delete one flow by its original tuple; False when it was already gone."""
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    tuple_orig = NFCTAttrTuple(
        family=_AF[flow.family],
        saddr=flow.orig_src,
        daddr=flow.orig_dst,
        proto=PROTOCOL_NUMBERS[flow.protocol],
        sport=flow.orig_sport,
        dport=flow.orig_dport,
    )
    zone = {} if flow.zone is None else {"zone": flow.zone}
    try:
        sock.entry("del", tuple_orig=tuple_orig, **zone)
    except NetlinkError as e:
        if e.code == errno.ENOENT:
            return False
        raise
    return True


def _delete_each(sock: Any, flows: Iterable[Flow], errors: list[str]) -> int:
    """Delete these flows; how many were still there. A failure is one line in `errors`."""
    deleted = 0
    for flow in flows:
        try:
            deleted += _delete(sock, flow)
        except Exception as e:  # noqa: BLE001 - reported, never fatal
            errors.append(f"deleting {flow.protocol.lowercase} {flow.orig_src}:{flow.orig_sport}"
                          f" -> {flow.orig_dst}:{flow.orig_dport}: {e}")
    return deleted


def _in_namespace(netns: str | None, errors: list[str], body: Callable[[], None]) -> None:
    """Run `body` inside `netns`; failing to enter it is one line in `errors`."""
    try:
        with entered(netns):
            body()
    except (OSError, ValueError) as e:  # the namespace itself: gone, misnamed, or not ours to enter
        errors.append(f"network namespace {netns}: {e}")


def _per_family(families: Iterable[IPFamily], errors: list[str], work: Callable[[Any, IPFamily], None]) -> None:
    """`work(socket, family)` with one ctnetlink socket per family; each failure is a line in `errors`."""
    for family in families:
        try:
            sock = _open(family)
        except Exception as e:  # noqa: BLE001 - reported, never fatal
            errors.append(f"IPv{int(family)}: opening ctnetlink: {e}")
            continue
        try:
            work(sock, family)
        except Exception as e:  # noqa: BLE001 - listing, or (a bug) deciding
            errors.append(f"IPv{int(family)}: cleaning flows: {e!r}")
        finally:
            sock.close()


def delete_stale_flows(filters: Iterable[FlowFilter], netns: str | None = None) -> CleanupResult:
    """Delete every flow a filter matches, in `netns` (None: this thread's namespace). Never raises."""
    filters = tuple(filters)
    deleted = 0
    errors: list[str] = []

    def clean(sock: Any, family: IPFamily) -> None:
        nonlocal deleted
        mine = [f for f in filters if f.frontend.family is family]
        flows = flows_to_delete(mine, _dump(sock, family, {f.frontend.protocol for f in mine}))
        deleted += _delete_each(sock, flows, errors)

    families = sorted({f.frontend.family for f in filters})
    _in_namespace(netns, errors, lambda: _per_family(families, errors, clean))
    return CleanupResult(deleted, tuple(errors), filters)


def _interface_addresses(errors: list[str]) -> tuple[str, ...] | None:
    """This namespace's addresses, where un-NATed flows to a NodePort are ours (None: unreadable)."""
    try:
        return local_addresses()
    except Exception as e:  # noqa: BLE001 - the reconciler then falls back to the node IPs
        errors.append(f"reading the node's addresses: {e}")
        return None


def reconcile_table(
    state: ClusterState,
    node: NodeContext,
    families: Iterable[IPFamily],
    netns: str | None = None,
    filters: Iterable[FlowFilter] = (),
    clock: Callable[[], float] = time.monotonic,
) -> CleanupResult:
    """kube-proxy's conntrack reconciler, per family: list every UDP/SCTP flow and delete those
    `reconcile_flows` finds stale in `state` alone, and those a filter matches (the caller's diff
    since its last cleanup, for frontends that no longer exist). Never raises.

    The result's `reconciled` holds one `Reconciliation` per family whose table could be listed;
    its `filters`, the given ones and one per kind of flow the reconciler deleted (for logs).
    """
    filters = tuple(filters)
    errors: list[str] = []
    reconciled: list[Reconciliation] = []
    reasons: set[FlowFilter] = set(filters)
    protocols = {name.protocol for name in state.services} & CLEANED_PROTOCOLS
    protocols |= {f.frontend.protocol for f in filters}

    def reconcile(sock: Any, family: IPFamily, addresses: tuple[str, ...] | None) -> None:
        started = clock()
        flows = tuple(_dump(sock, family, protocols))
        stale = reconcile_flows(state, node, flows, addresses)
        mine = [f for f in filters if f.frontend.family is family]
        doomed = stale.keys() | set(flows_to_delete(mine, flows))
        reasons.update(stale.values())
        deleted = _delete_each(sock, sorted(doomed, key=Flow.sort_key), errors)
        reconciled.append(Reconciliation(family, len(flows), deleted, clock() - started))
        log.debug("conntrack: reconciled IPv%d: %d flows listed, %d deleted in %.3fs",
                  family, len(flows), deleted, reconciled[-1].seconds)

    def in_namespace() -> None:
        addresses = _interface_addresses(errors)
        _per_family(sorted(families), errors, lambda sock, family: reconcile(sock, family, addresses))

    _in_namespace(netns, errors, in_namespace)
    return CleanupResult(sum(r.deleted for r in reconciled), tuple(errors),
                         tuple(sorted(reasons, key=FlowFilter.sort_key)), tuple(reconciled))


class ConntrackCleaner:
    """The agent's side: cleans after each sync, reconciling when it does not know the table.

    Its first cleanup, a full sync's (`changed` None) and the one after a failure reconcile the
    whole UDP/SCTP table with the current state (`reconcile_table`): a restart then keeps every
    flow that is still valid (kubernetes#122740), and whatever a failure or an outage left
    behind is found. Other cleanups only look for what the change from the last cleaned state
    made stale (`stale_flow_filters`), which costs no listing when no UDP service changed.
    When the last cleaned state is known, a reconcile adds that diff, for the flows of
    frontends that were removed. After a failure the last cleaned state is kept, so its diff
    is tried again (it is idempotent) together with whatever changed since. Only `families`
    are cleaned: those the backend programs (a family without rules has no NATed flows, and on
    a kernel without IPv6 asking for its table would fail on every sync).
    """

    def __init__(self, node: NodeContext, netns: str | None = None,
                 families: Iterable[IPFamily] = (IPFamily.V4, IPFamily.V6),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.node = node
        self.netns = netns
        self.families = frozenset(families)
        self.clock = clock
        # The state of the last successful cleanup; None until one succeeded (nothing to diff from).
        self.previous: ClusterState | None = None
        # Service ports changed since `previous` (the union of the agent's hints), None: unknown.
        self._pending: set[ServicePortName] | None = None
        self._reconcile_due = True

    def after_sync(self, state: ClusterState, changed: Collection[ServicePortName] | None = None) -> CleanupResult:
        """Delete what is stale after a sync to `state`. Never raises.

        `changed`: the service ports that differ from the last synced state (None: unknown, or a
        full sync), so that only those are compared.
        """
        if changed is None:
            self._pending = None
        elif self._pending is not None:
            self._pending.update(changed)
        reconcile = self._reconcile_due or changed is None
        try:
            stale = () if self.previous is None else stale_flow_filters(self.previous, state, self.node, self._pending)
        except Exception as e:  # noqa: BLE001 - a bug here must not fail a sync whose rules are in
            log.exception("conntrack: computing stale flows")
            self._reconcile_due = True
            return CleanupResult(errors=(f"computing stale flows: {e!r}",))
        filters = tuple(f for f in stale if f.frontend.family in self.families)
        if reconcile:
            result = reconcile_table(state, self.node, self.families, self.netns, filters, self.clock)
        else:
            result = delete_stale_flows(filters, self.netns) if filters else CleanupResult()
        for f in result.filters:
            log.debug("conntrack: deleting flows of %s", f)
        self._reconcile_due = not result.ok
        if result.ok:
            self.previous = state
            self._pending = set()
        return result
