"""Why a packet goes where it goes, in Service terms: the selection's choices for one destination.

The walk (`trace.walk`) knows rules; this module knows Services. For the destination of a traced
packet it finds the service port that owns it (cluster IP, external IP, load-balancer IP, node
port) and tells, from the same `categorize_endpoints` the compilers call, which endpoints were left
out and why: not ready, terminating (with or without the fallback), topology hints (used or
ignored, and why), a Local traffic policy without a local endpoint, a source outside
loadBalancerSourceRanges. A destination no service port owns is explained too: another port of
a service address ("no such port"), an `ipMode: Proxy` ingress IP, an unallocated address of a
service CIDR. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from kproxy_nft.model import ClusterState, Endpoint, NodeContext, ServicePort, TrafficPolicy
from kproxy_nft.selection import categorize_endpoints
from kproxy_nft.trace.packet import Packet, is_local


@dataclass(frozen=True)
class Frontend:
    """A service port's address the packet is sent to, and how it reached it."""

    service: ServicePort
    kind: str  # "cluster IP" | "external IP" | "load-balancer IP" | "node port"

    @property
    def external(self) -> bool:
        return self.kind != "cluster IP"


def _in_any(ip: str, cidrs: tuple[str, ...]) -> bool:
    addr = ipaddress.ip_address(ip)
    networks = (ipaddress.ip_network(c, strict=False) for c in cidrs)
    return any(addr.version == net.version and addr in net for net in networks)


def frontends(state: ClusterState, node: NodeContext, packet: Packet, local: frozenset[str]) -> list[Frontend]:
    """The service ports that own the packet's destination (and protocol)."""
    family, dst, port = packet.family, packet.dst, packet.port
    nodeport_ips = node.nodeport_ips(family)
    found = []
    for svc in state.services.values():
        if svc.protocol is not packet.protocol:
            continue
        if port == svc.port and dst == svc.cluster_ip(family):
            found.append(Frontend(svc, "cluster IP"))
        elif port == svc.port and dst in svc.external_ips_of(family):
            found.append(Frontend(svc, "external IP"))
        elif port == svc.port and dst in svc.load_balancer_ips_of(family):
            found.append(Frontend(svc, "load-balancer IP"))
        elif port == svc.node_port and (dst in nodeport_ips if nodeport_ips is not None else is_local(dst, local)):
            found.append(Frontend(svc, "node port"))
    return found


def explain(
    state: ClusterState, node: NodeContext, packet: Packet, local: frozenset[str],
    proxy_ips: Mapping[str, str] | None = None,
) -> tuple[str, ...]:
    """The reasons for the packet's fate, in Service terms (empty when no Service is involved).

    `proxy_ips`: load-balancer ingress IPs with `ipMode: Proxy` → their service (`ns/name`).
    """
    found = frontends(state, node, packet, local)
    if not found:
        return _unowned(state, node, packet, proxy_ips or {})
    reasons: list[str] = []
    for frontend in found:
        reasons += _explain_frontend(state, node, packet, local, frontend)
    return tuple(reasons)


def _unowned(state: ClusterState, node: NodeContext, packet: Packet, proxy_ips: Mapping[str, str]) -> tuple[str, ...]:
    family, dst = packet.family, packet.dst
    owners = [
        svc for svc in state.services.values()
        if dst in (svc.cluster_ip(family), *svc.external_ips_of(family), *svc.load_balancer_ips_of(family))
    ]
    if owners:
        names = sorted({f"{s.name.namespace}/{s.name.name}" for s in owners})
        ports = sorted({f"{s.port}/{s.protocol.value}" for s in owners})
        return (f"no such port: {dst} belongs to {', '.join(names)}, which has no port "
                f"{packet.port}/{packet.protocol.value} (it has {', '.join(ports)})",)
    if dst in proxy_ips:
        return (f"ipMode Proxy skipped: {dst} is a load-balancer ingress IP of {proxy_ips[dst]} with ipMode Proxy; "
                "the load balancer proxies to the node, so the address is not captured",)
    cidrs = node.service_cidrs_of(family)
    if cidrs and _in_any(dst, cidrs):
        return (f"unallocated service IP: {dst} is in the service CIDR {', '.join(cidrs)} but no Service has it",)
    return ()


def _policy_is_local(svc: ServicePort, frontend: Frontend, packet: Packet, node: NodeContext,
                     local: frozenset[str]) -> tuple[bool, str]:
    """Whether this traffic uses only this node's endpoints, and the policy's name."""
    if not frontend.external:
        return svc.internal_traffic_policy is TrafficPolicy.LOCAL, "internalTrafficPolicy"
    if svc.external_traffic_policy is not TrafficPolicy.LOCAL:
        return False, "externalTrafficPolicy"
    # Pods and the node itself short-circuit to every endpoint (kube-proxy's KUBE-EXT- chain).
    from_pod = _in_any(packet.src, node.cluster_cidrs_of(packet.family)[:1])
    return not (from_pod or is_local(packet.src, local)), "externalTrafficPolicy"


def _explain_frontend(state: ClusterState, node: NodeContext, packet: Packet, local: frozenset[str],
                      frontend: Frontend) -> list[str]:
    svc, family = frontend.service, packet.family
    name = str(svc.name)
    endpoints = tuple(ep for ep in state.endpoints_of(svc.name) if ep.family is family)
    sel = categorize_endpoints(svc, endpoints, node, family)
    local_only, policy = _policy_is_local(svc, frontend, packet, node, local)
    used = sel.local if local_only else sel.cluster
    reasons = [f"{name}: {frontend.kind} {packet.destination}, {len(used)} of {len(endpoints)} endpoints used"]
    if frontend.kind == "load-balancer IP" and svc.source_ranges_of(family):
        reasons += _source_ranges(svc, packet, node)
    if frontend.external and svc.external_traffic_policy is TrafficPolicy.LOCAL and not local_only:
        reasons.append(f"{name}: externalTrafficPolicy Local does not apply to traffic from a pod or the node: "
                       "every endpoint is used")
    if not endpoints:
        return [*reasons, f"{name} has no endpoints: new connections are rejected"]
    if not sel.has_any:
        return [*reasons, f"{name}: no endpoint is ready or serving: new connections are rejected"]
    if local_only and not used:
        verdict = "dropped" if frontend.external else "dropped (not sent to other nodes)"
        reasons.append(f"{name}: {policy} Local and no endpoint on this node ({node.hostname}): {verdict}")
    if used and not any(ep.ready for ep in used):
        reasons.append(f"{name}: terminating fallback used: no endpoint is ready, "
                       "so the serving terminating ones take new connections")
    reasons += _hints(name, endpoints, sel.cluster, node)
    for ep in endpoints:
        if ep not in used:
            why = _why_left_out(ep, sel.cluster, used, local_only, node, policy)
            reasons.append(f"{name}: {ep.address} left out: {why}")
    return reasons


def _source_ranges(svc: ServicePort, packet: Packet, node: NodeContext) -> list[str]:
    ranges = svc.source_ranges_of(packet.family)
    if _in_any(packet.src, ranges):
        return [f"{svc.name}: source {packet.src} is in loadBalancerSourceRanges ({', '.join(ranges)})"]
    if svc.source_ranges_admit(node.node_ips_of(packet.family), packet.family) and packet.src in svc.load_balancer_ips:
        return [f"{svc.name}: source {packet.src} is a load-balancer IP, admitted since a node IP is in the ranges"]
    return [f"{svc.name}: source range refused: {packet.src} is outside loadBalancerSourceRanges "
            f"({', '.join(ranges)}): dropped"]


def _hints(name: str, endpoints: tuple[Endpoint, ...], cluster: tuple[Endpoint, ...], node: NodeContext) -> list[str]:
    """Topology hints: used (some ready endpoints left out) or ignored, and why."""
    ready = [ep for ep in endpoints if ep.ready]
    if not any(ep.zone_hints or ep.node_hints for ep in ready):
        return []
    if set(cluster) < set(ready):
        where = f"node {node.hostname}" if any(ep.node_hints for ep in cluster) else f"zone {node.zone}"
        return [f"{name}: topology hints used: only the endpoints hinted for {where}"]
    unhinted = [ep.address for ep in ready if not ep.zone_hints and not ep.node_hints]
    if unhinted:
        why = f"{', '.join(unhinted)} has none (hints count only when every ready endpoint has them)"
    elif not node.zone:
        why = "this node has no zone (--zone)"
    else:
        why = f"none is for this node's zone {node.zone} or node {node.hostname}"
    return [f"{name}: topology hints ignored: {why}"]


def _why_left_out(ep: Endpoint, cluster: tuple[Endpoint, ...], used: tuple[Endpoint, ...], local_only: bool,
                  node: NodeContext, policy: str) -> str:
    if not ep.ready and not (ep.serving and ep.terminating):
        return "not ready" + (" (terminating, not serving)" if ep.terminating else "")
    if not ep.ready and any(e.ready for e in used):
        return "terminating (ready endpoints take new connections)"
    if local_only and ep.node_name != node.hostname:
        return f"on node {ep.node_name or '(none)'}, not {node.hostname} ({policy} Local)"
    if ep not in cluster:
        hints = ", ".join(sorted(ep.zone_hints | ep.node_hints)) or "none"
        return f"topology hints (hinted for {hints})"
    return "not used on this node"
