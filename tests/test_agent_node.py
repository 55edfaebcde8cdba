"""The agent's own Node object: its IPs and zone fill in what the flags left unset."""

from __future__ import annotations

from kubernetes.client import V1Node, V1ServiceCIDR

from kproxy_nft.agent.main import Agent
from kproxy_nft.agent.metrics import new_metrics
from kproxy_nft.model import ClusterState, NodeContext
from kproxy_nft.sources.kube import Change, Replace
from tests.fake_proxier import FakeProxier


class RecordingBackend(FakeProxier):
    def __init__(self, node: NodeContext) -> None:
        super().__init__(node)
        self.synced_with: list[tuple[NodeContext, bool]] = []  # the node each sync compiled for

    def sync(self, state: ClusterState, full: bool, changed: object = None) -> str:
        self.synced_with.append((self.node, full))
        return "ok"


def node_object(ip: str, zone: str) -> V1Node:
    return V1Node.from_dict({
        "metadata": {"name": "node1", "labels": {"topology.kubernetes.io/zone": zone}},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    })


def agent_with(node: NodeContext, fixed: frozenset[str] = frozenset()) -> tuple[Agent, RecordingBackend]:
    backend = RecordingBackend(node)
    agent = Agent(backend, new_metrics(), min_sync_period=0.0, sync_period=30.0)
    agent.fixed_node_fields = fixed
    for resource in ("services", "endpointslices"):
        agent.events.put(Replace(resource, ()))
    return agent, backend


def test_node_ips_and_zone_come_from_the_node_object_and_resync_every_service() -> None:
    agent, backend = agent_with(NodeContext(hostname="node1"))
    agent.events.put(Replace("nodes", (node_object("10.0.0.5", "zone-a"),)))
    agent._drain(0)  # noqa: SLF001 - one loop step, without the thread
    assert backend.node == NodeContext(hostname="node1", node_ips=("10.0.0.5",), zone="zone-a")
    agent.scheduler.run_due()
    agent.events.put(Change("nodes", "MODIFIED", node_object("10.0.0.5", "zone-b")))
    agent._drain(0)  # noqa: SLF001
    agent.scheduler.run_due()
    assert [n.zone for n, _ in backend.synced_with] == ["zone-a", "zone-b"]


def test_flags_win_and_a_deleted_node_object_changes_nothing() -> None:
    given = NodeContext(hostname="node1", node_ips=("192.168.1.1",), zone="zone-z")
    agent, backend = agent_with(given, frozenset({"node_ips", "zone"}))
    agent.events.put(Replace("nodes", (node_object("10.0.0.5", "zone-a"),)))
    agent.events.put(Change("nodes", "DELETED", node_object("10.0.0.5", "zone-a")))
    agent._drain(0)  # noqa: SLF001
    assert backend.node == given
    assert "nodes" not in agent.listed or agent.ready()  # services and slices still decide readiness


def servicecidr(name: str, *cidrs: str) -> V1ServiceCIDR:
    return V1ServiceCIDR.from_dict({"metadata": {"name": name}, "spec": {"cidrs": list(cidrs)}})


def test_service_cidrs_follow_the_servicecidr_objects_unless_given_by_flag() -> None:
    agent, backend = agent_with(NodeContext(hostname="node1"))
    agent.events.put(Replace("servicecidrs", (servicecidr("kubernetes", "10.96.0.0/16", "fd00:96::/112"),)))
    agent.events.put(Change("servicecidrs", "ADDED", servicecidr("extra", "10.97.0.0/16")))
    agent.events.put(Change("servicecidrs", "ADDED", servicecidr("bad", "not-a-cidr")))  # logged, ignored
    agent._drain(0)  # noqa: SLF001
    assert backend.node.service_cidrs == ("10.97.0.0/16", "10.96.0.0/16", "fd00:96::/112")
    agent.events.put(Change("servicecidrs", "DELETED", servicecidr("extra", "10.97.0.0/16")))
    agent._drain(0)  # noqa: SLF001
    assert backend.node.service_cidrs == ("10.96.0.0/16", "fd00:96::/112")

    flagged, backend = agent_with(NodeContext(hostname="node1", service_cidrs=("10.0.0.0/24",)),
                                  frozenset({"service_cidrs"}))
    flagged.events.put(Replace("servicecidrs", (servicecidr("kubernetes", "10.96.0.0/16"),)))
    flagged._drain(0)  # noqa: SLF001
    assert backend.node.service_cidrs == ("10.0.0.0/24",)
