"""Stale UDP conntrack flows in a real kernel: a client that keeps its socket follows the rules again.

One long-lived UDP socket in a pod-client namespace talks to a ClusterIP service of a fresh
netlab (its node namespace programmed by the agent's backends, in every mode). Without the
cleanup its flow keeps the old NAT decision - both situations are asserted first, so the
tests fail if the cleanup is a no-op - and after `ConntrackCleaner.after_sync` the next
datagram of the same socket reaches a live endpoint. `conntrack -L` is only used to look.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kproxy_nft.kernel.conntrack import ConntrackCleaner, list_flows
from kproxy_nft.kernel.netns import entered
from kproxy_nft.lab import ClientSpec, Lab, PodSpec
from kproxy_nft.model import ClusterState, Endpoint, IPFamily, NodeContext, Protocol, ServicePort, ServicePortName
from kproxy_nft.proxier import Proxier
from kproxy_nft.proxier.iptables import IptablesProxier
from kproxy_nft.proxier.nftables import NftablesProxier

pytestmark = pytest.mark.kernel

NODE = NodeContext(hostname="node1", cluster_cidrs=("10.1.0.0/16",))
PODS = (PodSpec("pod1", "10.1.0.47", udp_ports=(53,)), PodSpec("pod2", "10.1.0.48", udp_ports=(53,)))
CLIENT = ClientSpec("client", "10.1.0.50")
VIP = "10.96.0.53"
DNS = ServicePort(ServicePortName("kube-system", "dns", "dns", Protocol.UDP), 53, 53, cluster_ips=(VIP,))


def state(*pod_ips: str) -> ClusterState:
    return ClusterState({DNS.name: DNS}, {DNS.name: tuple(Endpoint(ip, 53) for ip in pod_ips)})


@pytest.fixture
def lab() -> Iterator[Lab]:
    """A fresh lab per test: each starts with an empty conntrack table."""
    if os.geteuid() != 0:
        pytest.skip("netlab needs root")
    with Lab(PODS, (CLIENT,)) as the_lab:
        the_lab.start_servers()
        yield the_lab


@pytest.fixture(params=["iptables-nft", "iptables-legacy", "nftables"])
def backend(request: pytest.FixtureRequest, lab: Lab) -> Proxier:
    """The agent's backend of the mode under test, programming the lab's node (gone with the lab)."""
    if request.param == "nftables":
        return NftablesProxier(NODE, netns=lab.node_ns)
    return IptablesProxier(NODE, iptables_backend=request.param.split("-")[1], netns=lab.node_ns)


@pytest.fixture
def client(lab: Lab) -> Iterator[socket.socket]:
    """One UDP socket inside the client namespace, connected to the VIP: one source port throughout."""
    with entered(lab.client_ns(CLIENT.name)):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # created here, it stays in that namespace
    try:
        sock.settimeout(0.5)
        sock.connect((VIP, 53))
        yield sock
    finally:
        sock.close()


def ask(sock: socket.socket) -> str | None:
    """Send one datagram; the answering pod's name, or None when no pod answers.

    Not NATed, a datagram to the VIP either vanishes (routed to the lab's dead end) or, where
    the rules reject traffic to cluster IPs that was not DNATed, comes back as "refused".
    """
    sock.send(b"who\n")
    try:
        return sock.recv(512).decode().split()[0]
    except (TimeoutError, ConnectionRefusedError):
        return None


def reply_sources(lab: Lab) -> set[str]:
    """Where the node's UDP flows to the VIP are NATed to, as the conntrack tool shows them."""
    out = subprocess.run(
        ["ip", "netns", "exec", lab.node_ns, "conntrack", "-L", "-p", "udp", "--orig-dst", VIP],
        capture_output=True, text=True, check=True,
    ).stdout
    # Each line holds the original tuple, then the reply tuple: the second `src=` is the reply source.
    return {line.split("src=")[2].split()[0] for line in out.splitlines() if line.count("src=") == 2}


def test_flow_to_a_removed_endpoint_moves_on(lab: Lab, backend: Proxier, client: socket.socket) -> None:
    cleaner = ConntrackCleaner(NODE, netns=lab.node_ns)
    backend.sync(state("10.1.0.47"), True)
    assert cleaner.after_sync(state("10.1.0.47")).ok
    assert ask(client) == "pod1"

    backend.sync(state("10.1.0.48"), False)  # pod1 is no longer an endpoint
    # Without a cleanup the flow keeps its DNAT to pod1: this is what the cleanup is for.
    assert ask(client) == "pod1"
    assert reply_sources(lab) == {"10.1.0.47"}

    result = cleaner.after_sync(state("10.1.0.48"))
    assert result.ok and result.deleted == 1, result
    assert ask(client) == "pod2"
    assert reply_sources(lab) == {"10.1.0.48"}
    flows = list_flows(IPFamily.V4, [Protocol.UDP], netns=lab.node_ns)
    assert [(f.orig_dst, f.reply_src, f.orig_sport) for f in flows] == [
        (VIP, "10.1.0.48", client.getsockname()[1])
    ]


def test_flow_created_before_the_service_had_endpoints_is_flushed(
    lab: Lab, backend: Proxier, client: socket.socket
) -> None:
    cleaner = ConntrackCleaner(NODE, netns=lab.node_ns)
    backend.sync(ClusterState(), True)  # no service yet: the datagram is routed to the dead end
    assert ask(client) is None
    assert reply_sources(lab) == {VIP}  # a flow without NAT: its answer would come from the VIP

    backend.sync(state("10.1.0.47"), False)
    assert ask(client) is None  # the un-NATed flow black-holes the client despite the new rules

    result = cleaner.after_sync(state("10.1.0.47"))
    assert result.ok and result.deleted == 1, result
    assert ask(client) == "pod1"


DNS_YAML = f"""\
apiVersion: v1
kind: Service
metadata: {{name: dns, namespace: kube-system}}
spec: {{clusterIP: {VIP}, ports: [{{name: dns, port: 53, protocol: UDP}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: dns-1, namespace: kube-system, labels: {{kubernetes.io/service-name: dns}}}}
addressType: IPv4
ports: [{{name: dns, port: 53, protocol: UDP}}]
endpoints: [{{addresses: ["10.1.0.48"]}}]
"""


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_cli_apply_cleans_after_a_change(lab: Lab, client: socket.socket, mode: str, tmp_path: Path) -> None:
    def apply() -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "kproxy_nft.cli", "apply", "-f", str(tmp_path), "--proxy-mode", mode,
                "--cluster-cidr", "10.1.0.0/16", "--iptables-backend", "nft"]
        return lab.run_in("node", argv, check=False)  # the whole command runs inside the lab's node

    # No service yet. (Rules must exist: a namespace without NAT rules tracks no connections.)
    res = apply()
    assert res.returncode == 1 and "stale flows" not in res.stdout, res.stdout + res.stderr
    assert ask(client) is None
    assert reply_sources(lab) == {VIP}

    (tmp_path / "dns.yaml").write_text(DNS_YAML)
    res = apply()
    assert res.returncode == 1, res.stdout + res.stderr
    assert "conntrack: 1 stale flows deleted" in res.stdout, res.stdout + res.stderr
    assert ask(client) == "pod2"


def test_cleanup_in_a_missing_namespace_reports_instead_of_raising() -> None:
    result = ConntrackCleaner(NODE, netns="kpn-does-not-exist").after_sync(state("10.1.0.47"))
    assert not result.ok and "kpn-does-not-exist" in result.errors[0]
