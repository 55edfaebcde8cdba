"""Endpoint selection: which endpoints a service port sends traffic to, on this node.

One pure function, `categorize_endpoints`, shared by every backend, mirroring kube-proxy's
`CategorizeEndpoints` (pkg/proxy/topology.go):

* cluster endpoints: the ready ones (a missing `ready` condition counts as ready), narrowed by
  topology hints when every ready endpoint carries hints and some are for this node or zone;
  when none is ready anywhere, the serving-and-terminating ones (KEP-1669), so connections
  keep flowing during a rolling update;
* local endpoints (only when a traffic policy is Local): this node's ready endpoints, or, if
  it has none, this node's serving-and-terminating ones;
* all reachable: the union, i.e. every endpoint that needs a KUBE-SEP chain / map entry.

Services that get no rules at all (headless, ExternalName, another proxy's) never reach this
module: the manifest reader leaves them out of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kproxy_nft.model import Endpoint, IPFamily, NodeContext, ServicePort, TrafficPolicy


def endpoints_of_family(endpoints: Iterable[Endpoint], family: IPFamily) -> tuple[Endpoint, ...]:
    """The endpoints a `family` proxier sees (kube-proxy's per-family endpoints), in order.

    Both compilers take a service port's endpoints of both families and call this first.
    """
    v6 = family is IPFamily.V6  # `ep.family`, inlined: it runs once per endpoint on the hot path
    return tuple(ep for ep in endpoints if (":" in ep.ip) is v6)


@dataclass(frozen=True)
class EndpointSelection:
    """The endpoint sets of one service port; each tuple is in `ip:port` order."""

    cluster: tuple[Endpoint, ...]
    local: tuple[Endpoint, ...]
    all_reachable: tuple[Endpoint, ...]
    has_any: bool

    @property
    def local_uses_terminating(self) -> bool:
        """True when the local set fell back to serving-terminating endpoints."""
        return bool(self.local) and not any(ep.ready for ep in self.local)


def _externally_accessible(svc: ServicePort, family: IPFamily | None) -> bool:
    return svc.externally_accessible if family is None else svc.externally_accessible_in(family)


def uses_cluster_endpoints(svc: ServicePort, family: IPFamily | None = None) -> bool:
    """Cluster endpoints are needed unless internal traffic is Local and nothing comes from outside.

    Even with externalTrafficPolicy Local the cluster set is used, to short-circuit pod traffic.
    With a `family`, "from outside" counts only that family's external and LB IPs.
    """
    return svc.internal_traffic_policy is TrafficPolicy.CLUSTER or _externally_accessible(svc, family)


def uses_local_endpoints(svc: ServicePort, family: IPFamily | None = None) -> bool:
    return svc.internal_traffic_policy is TrafficPolicy.LOCAL or (
        svc.external_traffic_policy is TrafficPolicy.LOCAL and _externally_accessible(svc, family)
    )


def _usable_terminating(ep: Endpoint) -> bool:
    return ep.serving and ep.terminating


def _topology_filter(endpoints: Iterable[Endpoint], node: NodeContext) -> Callable[[Endpoint], bool]:
    """The hint filter kube-proxy applies to ready endpoints (node hints win over zone hints).

    Hints are honoured only when every ready endpoint has them and at least one is for this
    node (or zone); otherwise every ready endpoint is used, so a half-hinted slice never
    black-holes traffic.
    """
    ready = [ep for ep in endpoints if ep.ready]
    if not any(ep.node_hints or ep.zone_hints for ep in ready):
        return lambda ep: True  # the common case: no hints at all
    if ready and all(ep.node_hints for ep in ready) and any(node.hostname in ep.node_hints for ep in ready):
        return lambda ep: node.hostname in ep.node_hints
    if (
        node.zone
        and ready
        and all(ep.zone_hints for ep in ready)
        and any(node.zone in ep.zone_hints for ep in ready)
    ):
        zone = node.zone
        return lambda ep: zone in ep.zone_hints
    return lambda ep: True


def categorize_endpoints(
    svc: ServicePort, endpoints: tuple[Endpoint, ...], node: NodeContext, family: IPFamily | None = None
) -> EndpointSelection:
    """Split a service port's endpoints into the cluster, local and reachable sets.

    `family`: the rules of one family are being made (the endpoints are of that family), so the
    service is seen as that family's proxier sees it.
    """

    def is_local(ep: Endpoint) -> bool:
        return ep.node_name == node.hostname

    cluster: tuple[Endpoint, ...] = ()
    has_any = False
    if uses_cluster_endpoints(svc, family):
        in_topology = _topology_filter(endpoints, node)
        cluster = tuple(ep for ep in endpoints if ep.ready and in_topology(ep))
        if not cluster:
            cluster = tuple(ep for ep in endpoints if _usable_terminating(ep))
        has_any = bool(cluster)

    if not uses_local_endpoints(svc, family):
        return EndpointSelection(cluster, (), cluster, has_any)

    has_any = has_any or any(ep.ready or _usable_terminating(ep) for ep in endpoints)
    local = tuple(ep for ep in endpoints if is_local(ep) and ep.ready)
    if not local:
        local = tuple(ep for ep in endpoints if is_local(ep) and _usable_terminating(ep))

    if not uses_cluster_endpoints(svc, family):
        return EndpointSelection((), local, local, has_any)

    reachable = {ep.address: ep for ep in (*cluster, *local)}
    all_reachable = tuple(reachable[key] for key in sorted(reachable))
    return EndpointSelection(cluster, local, all_reachable, has_any)
