"""Delete stale conntrack flows through netlink (pyroute2), optionally in a named network namespace.

`kproxy_nft.conntrack` decides which flows are stale (pure); this module does the I/O: per IP
family that has filters, it dumps the table's flows of the filtered protocols (ctnetlink's
`IPCTNL_MSG_CT_GET` with a protocol filter, so a node full of TCP connections sends only its
UDP/SCTP flows), keeps those a filter matches, and deletes each by its original tuple
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
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kproxy_nft.conntrack import (
    PROTOCOL_NUMBERS,
    Flow,
    FlowFilter,
    canonical_ip,
    flows_to_delete,
    stale_flow_filters,
)
from kproxy_nft.kernel.netns import entered
from kproxy_nft.model import ClusterState, IPFamily, NodeContext, Protocol, ServicePortName

log = logging.getLogger("kproxy_nft.conntrack")

_AF = {IPFamily.V4: socket.AF_INET, IPFamily.V6: socket.AF_INET6}
_IP_ATTRS = {IPFamily.V4: ("CTA_IP_V4_SRC", "CTA_IP_V4_DST"), IPFamily.V6: ("CTA_IP_V6_SRC", "CTA_IP_V6_DST")}
_PROTOCOLS = {number: proto for proto, number in PROTOCOL_NUMBERS.items()}


@dataclass(frozen=True)
class CleanupResult:
    """What one cleanup did: flows deleted, and one line per failure (empty when all went well)."""

    deleted: int = 0
    errors: tuple[str, ...] = ()
    filters: tuple[FlowFilter, ...] = field(default=(), repr=False)

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


def delete_stale_flows(filters: Iterable[FlowFilter], netns: str | None = None) -> CleanupResult:
    """Delete every flow a filter matches, in `netns` (None: this thread's namespace). Never raises."""
    filters = tuple(filters)
    deleted = 0
    errors: list[str] = []
    families = sorted({f.frontend.family for f in filters})
    try:
        with entered(netns):
            for family in families:
                mine = [f for f in filters if f.frontend.family is family]
                try:
                    sock = _open(family)
                except Exception as e:  # noqa: BLE001 - reported, never fatal
                    errors.append(f"IPv{int(family)}: opening ctnetlink: {e}")
                    continue
                try:
                    flows = flows_to_delete(mine, _dump(sock, family, {f.frontend.protocol for f in mine}))
                    for flow in flows:
                        try:
                            deleted += _delete(sock, flow)
                        except Exception as e:  # noqa: BLE001
                            errors.append(f"deleting {flow.protocol.lowercase} {flow.orig_src}:{flow.orig_sport}"
                                          f" -> {flow.orig_dst}:{flow.orig_dport}: {e}")
                except Exception as e:  # noqa: BLE001
                    errors.append(f"IPv{int(family)}: listing flows: {e}")
                finally:
                    sock.close()
    except (OSError, ValueError) as e:  # the namespace itself: gone, misnamed, or not ours to enter
        errors.append(f"network namespace {netns}: {e}")
    return CleanupResult(deleted, tuple(errors), filters)


class ConntrackCleaner:
    """The agent's side: remembers the last state it cleaned for and cleans after each sync.

    It starts from an empty state, like kube-proxy's first sync (see `stale_flow_filters`).
    After a failed cleanup it keeps the old state, so the next sync retries the same filters
    (they are idempotent) together with whatever changed since. Only `families` are cleaned:
    those the backend programs (a family without rules has no NATed flows, and on a kernel
    without IPv6 asking for its table would fail on every sync).
    """

    def __init__(self, node: NodeContext, netns: str | None = None,
                 families: Iterable[IPFamily] = (IPFamily.V4, IPFamily.V6)) -> None:
        self.node = node
        self.netns = netns
        self.families = frozenset(families)
        self.previous = ClusterState()
        # Service ports changed since `previous` (the union of the agent's hints), None: unknown.
        self._pending: set[ServicePortName] | None = None

    def after_sync(self, state: ClusterState, changed: Collection[ServicePortName] | None = None) -> CleanupResult:
        """Delete what the change from the previous state made stale. Never raises.

        `changed`: the service ports that differ from the last synced state (None: unknown),
        so that only those are compared.
        """
        if changed is None:
            self._pending = None
        elif self._pending is not None:
            self._pending.update(changed)
        try:
            stale = stale_flow_filters(self.previous, state, self.node, self._pending)
        except Exception as e:  # noqa: BLE001 - a bug here must not fail a sync whose rules are in
            log.exception("conntrack: computing stale flows")
            return CleanupResult(errors=(f"computing stale flows: {e!r}",))
        filters = tuple(f for f in stale if f.frontend.family in self.families)
        for f in filters:
            log.debug("conntrack: deleting flows of %s", f)
        result = delete_stale_flows(filters, self.netns) if filters else CleanupResult()
        if result.ok:
            self.previous = state
            self._pending = set()
        return result
