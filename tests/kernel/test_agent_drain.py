"""`kproxy-nft run --manifests DIR` as a kube-proxy operator sees it, real packets, both modes.

The agent runs inside the lab's node namespace (`kpn-…`, removed by the lab also on failure).
The directory holds a Service, its EndpointSlice and this node's Node object. Then the Node
gets the Cluster Autoscaler's `ToBeDeletedByClusterAutoscaler` taint: /healthz must turn 503
with `nodeEligible: false` (load balancers drain the node, KEP-3836) while /livez stays 200 and
the Service keeps answering; the taint removed, /healthz is 200 again. On the metrics port:
/proxyMode, /configz, and the health answers counted in `kubeproxy_proxy_healthz_total{code}`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from kproxy_nft.lab import ClientSpec, Lab, PodSpec
from tests.helpers import wait_for
from tests.kernel.agentproc import run_argv, running_agent, write
from tests.kernel.test_agent_invalid import HEALTHZ, METRICS, SERVICES, endpoint_slice, http_get, service

pytestmark = pytest.mark.kernel

TAINT = {"key": "ToBeDeletedByClusterAutoscaler", "value": "1714557600", "effect": "NoSchedule"}


def node_object(*taints: dict[str, str]) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node1", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
        "spec": {"podCIDRs": ["10.1.0.0/24"], "taints": list(taints)},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.1.0.1"}]},
    })


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_healthz_drains_a_node_being_deleted_while_traffic_keeps_flowing(mode: str, tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    vip, pod, pod_ip = SERVICES["web"]
    write(manifests / "web.json", service("web"))
    write(manifests / "web-slice.json", endpoint_slice("web", pod_ip))
    write(manifests / "node.json", node_object())
    with Lab([PodSpec(pod, pod_ip)], [ClientSpec("testpod", "10.1.0.50")]) as lab:
        lab.start_servers()

        def get(path: str, address: str = HEALTHZ) -> tuple[int, str]:
            return http_get(lab, f"http://{address}{path}")

        def served() -> bool:
            return lab.probe("testpod", vip, 80, count=3, timeout=0.5).counts() == {pod: 3}

        argv = run_argv(manifests, mode, "--metrics-bind-address", METRICS, "--healthz-bind-address", HEALTHZ)
        with running_agent(functools.partial(lab.spawn, "node"), argv, tmp_path / "agent.log") as agent:
            wait_for(served, timeout=20)
            status, body = get("/healthz")
            assert status == 200 and json.loads(body)["nodeEligible"] is True, (body, agent.log())
            assert get("/proxyMode", METRICS) == (200, mode)
            config = json.loads(get("/configz", METRICS)[1])["kubeproxy.config.k8s.io"]
            assert (config["Mode"], config["HostnameOverride"]) == (mode, "node1")

            write(manifests / "node.json", node_object(TAINT))
            wait_for(lambda: get("/healthz")[0] == 503, timeout=10)
            assert json.loads(get("/healthz")[1])["nodeEligible"] is False
            assert get("/livez")[0] == 200
            assert served(), agent.log()  # draining, not broken: the rules stay

            write(manifests / "node.json", node_object())
            wait_for(lambda: get("/healthz")[0] == 200, timeout=10)
            metrics = get("/metrics", METRICS)[1]
            assert 'kubeproxy_proxy_healthz_total{code="503"}' in metrics
            assert 'kubeproxy_proxy_livez_total{code="200"} 1.0' in metrics
            assert 'kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv4"}' in metrics
