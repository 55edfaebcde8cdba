"""healthCheckNodePort through the real agent: `kproxy-nft run --netns`, probed from outside the node.

The agent process runs in the root namespace and programs the lab's node namespace (`--netns`);
its health-check server must listen *inside* that namespace, on the node's addresses, where an
external client (standing in for a cloud load balancer) probes it. Endpoint changes in the
manifests change the answer; removing the Service closes the port. Nothing listens in the
root namespace (the agent's own metrics/healthz go to ephemeral loopback ports there).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kproxy_nft.agent.healthcheck import HealthCheck, HealthCheckServers
from kproxy_nft.lab import ClientSpec, Lab, PodSpec
from kproxy_nft.model import NodeContext
from tests.helpers import wait_for
from tests.kernel.agentproc import run_argv, running_agent, write
from tests.kernel.conftest import run_in

pytestmark = pytest.mark.kernel

HC_PORT = 32123
NODE_IP = "192.168.100.1"  # netlab's Addressing.node_ip: what external clients reach

# Run inside the external client's namespace: one GET, printed as JSON. Status 0: connection
# refused (nothing listens); -1: any other failure (e.g. reset by a server being closed).
PROBE = """
import json, sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
        out = [r.status, dict(r.headers), r.read().decode()]
except urllib.error.HTTPError as e:
    out = [e.code, dict(e.headers), e.read().decode()]
except urllib.error.URLError as e:
    out = [0 if isinstance(e.reason, ConnectionRefusedError) else -1, {}, repr(e.reason)]
except OSError as e:
    out = [-1, {}, repr(e)]
print(json.dumps(out))
"""

SERVICE = json.dumps({
    "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
    "spec": {
        "type": "LoadBalancer", "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
        "externalTrafficPolicy": "Local", "healthCheckNodePort": HC_PORT,
        "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 80, "nodePort": 30080},
                  {"name": "https", "protocol": "TCP", "port": 443, "targetPort": 443, "nodePort": 30443}],
    },
})


def endpoint_slice(pod1_ready: bool) -> str:
    """pod1 on this node (ready, or terminating), pod2 on another node; two ports per pod."""
    conditions = {"ready": True} if pod1_ready else {"ready": False, "serving": True, "terminating": True}
    return json.dumps({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}, {"name": "https", "port": 443, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.1.0.47"], "nodeName": "node1", "conditions": conditions},
            {"addresses": ["10.1.0.48"], "nodeName": "node2", "conditions": {"ready": True}},
        ],
    })


@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_agent_serves_health_checks_inside_the_node_namespace(mode: str, tmp_path: Path) -> None:
    """Both modes: the rules each mode installs (e.g. iptables' filter chains for eTP Local
    services without local endpoints) must leave the health-check port reachable."""
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    write(manifests / "service.json", SERVICE)
    write(manifests / "slice.json", endpoint_slice(pod1_ready=True))
    pods = [PodSpec("pod1", "10.1.0.47")]
    with Lab(pods, [ClientSpec("lb", "192.168.100.2")]) as lab:
        def probe() -> tuple[int, dict[str, str], Any]:
            out = lab.run_in("lb", [sys.executable, "-I", "-S", "-c", PROBE, f"http://{NODE_IP}:{HC_PORT}/"])
            status, headers, body = json.loads(out.stdout)
            return status, headers, json.loads(body) if status > 0 and body else body

        argv = run_argv(manifests, mode, "--netns", lab.node_ns,
                        "--metrics-bind-address", "127.0.0.1:0", "--healthz-bind-address", "127.0.0.1:0")
        with running_agent(subprocess.Popen, argv, tmp_path / "agent.log") as agent:
            wait_for(lambda: probe()[0] > 0, timeout=15.0, interval=0.2)
            status, headers, body = probe()
            assert status == 200, agent.log()
            # pod1 counts once although it is behind two ports; pod2 is on another node.
            assert body == {"service": {"namespace": "shop", "name": "web"}, "localEndpoints": 1,
                            "serviceProxyHealthy": True}
            assert headers["X-Load-Balancing-Endpoint-Weight"] == "1"
            assert headers["Content-Type"] == "application/json"
            # Not in the agent's own (root) namespace.
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", HC_PORT), timeout=2).close()

            # pod1 starts terminating: the load balancer must drain this node (same server, new answer).
            write(manifests / "slice.json", endpoint_slice(pod1_ready=False))
            wait_for(lambda: probe()[0] == 503, timeout=15.0, interval=0.2)
            assert probe()[2]["localEndpoints"] == 0

            # The Service goes: the port is closed.
            (manifests / "service.json").unlink()
            wait_for(lambda: probe()[0] == 0, timeout=15.0, interval=0.2)  # refused, not merely reset
            assert f"healthcheck port={HC_PORT} closed" in agent.log()


def test_default_bind_is_dual_stack_inside_the_namespace(netns: str) -> None:
    """host None: one socket on `::` taking IPv4 too (where the namespace has IPv6)."""
    run_in(netns, ["ip", "link", "set", "lo", "up"])
    if run_in(netns, ["sysctl", "-n", "net.ipv6.conf.all.disable_ipv6"]).stdout.strip() != "0":
        pytest.skip("no IPv6 in a fresh namespace on this kernel")
    manager = HealthCheckServers(NodeContext(hostname="node1"), lambda: True, netns=netns)
    try:
        manager.reconcile({HC_PORT: HealthCheck("shop", "web", 3)})
        assert manager.ports == {HC_PORT}
        for url in (f"http://127.0.0.1:{HC_PORT}/", f"http://[::1]:{HC_PORT}/healthz"):
            status, headers, body = json.loads(run_in(netns, [sys.executable, "-I", "-S", "-c", PROBE, url]).stdout)
            assert status == 200 and json.loads(body)["localEndpoints"] == 3, url
        listening = run_in(netns, ["ss", "-Hltn", f"sport = :{HC_PORT}"]).stdout
        # ss writes a dual-stack socket (`::`, IPV6_V6ONLY off) as `*:port`; `[::]:port` would be v6 only.
        assert listening.count("LISTEN") == 1 and f"*:{HC_PORT}" in listening, listening
    finally:
        manager.stop()
    assert "LISTEN" not in run_in(netns, ["ss", "-Hltn", f"sport = :{HC_PORT}"]).stdout
