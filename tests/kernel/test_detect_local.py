"""`--detect-local-mode` with real packets, in every mode: who counts as "from a pod".

The lab and the programming modes are test_service_types.py's (iptables-nft, iptables-legacy,
nftables). Its node namespace has no bridge: each pod or client hangs off a veth of its own,
named by the lab `vp<i>-<pod>` for pods and `vc<i>-<client>` for clients (`vp0-pod1`,
`vc0-testpod`, `vc1-ext`). kube-proxy's BridgeInterface detector is an exact input-interface
match (`-i NAME`, `iifname "NAME"`) and does not care what kind of link NAME is, so the veth
of `testpod` stands in for the pods' bridge; InterfaceNamePrefix takes `vp`, the prefix of
every pod veth.

For each detector: the traffic it calls local reaches a cluster IP with its source kept, the
rest (outside clients, and pods the detector does not cover) is masqueraded; and under
externalTrafficPolicy Local with endpoints only on another node, local traffic to the node
port short-circuits to those endpoints while the rest is dropped. ClusterCIDR stays set
(10.1.0.0/16, holding every pod) in all cases, so a detector that fell back to it would keep
the covered-by-CIDR pod's source and fail. The CIDR detectors' probes are traced
(`Mode.probe`: the tracer's prediction is checked too); the tracer cannot evaluate input
interfaces (`-i`, `iifname`: a traced packet has none), so the interface detectors' probes are
plain `Lab.probe`s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pytest

from kproxy_nft.lab import Lab, ProbeResult
from kproxy_nft.model import ClusterState, IPFamily, LocalMode, NodeContext, TrafficPolicy
from tests.kernel.test_service_types import (  # noqa: F401 - lab, mode: the fixtures, shared
    DROP_TIMEOUT,
    NODE_A,
    NODE_IP,
    SPREAD2,
    Mode,
    assert_dropped,
    assert_reaches,
    cluster,
    ep,
    lab,
    masqueraded,
    mode,
    svc,
)

pytestmark = pytest.mark.kernel

NODE_PORT = 30084  # the lab's node listener answers it: a drop is the rules', not a refusal
VIP = "10.96.3.10"
ENDPOINTS = {"pod2", "pod3"}  # pod1 is a client here, never its own backend


@dataclass(frozen=True)
class Detector:
    """A detector's settings, the client it calls local and the ones it does not."""

    name: str
    node: NodeContext
    local: str
    others: tuple[str, ...]

    def probe(self, netlab: Lab, programmed: Mode, client: str, ip: str, port: int, **kw: Any) -> ProbeResult:
        """Traced where the tracer can follow the detector (a source CIDR), else plain."""
        detector = self.node.local_detector(IPFamily.V4)
        if detector is not None and detector.cidr is not None:
            return programmed.probe(netlab, client, ip, port, **kw)
        return netlab.probe(client, ip, port, **kw)


DETECTORS = (
    Detector("ClusterCIDR", dataclasses.replace(NODE_A, detect_local_mode=LocalMode.CLUSTER_CIDR),
             "testpod", ("ext",)),
    # This node's pod CIDR holds testpod (10.1.0.50) but not pod1 (10.1.0.47), as if pod1 ran elsewhere.
    Detector("NodeCIDR", dataclasses.replace(NODE_A, detect_local_mode=LocalMode.NODE_CIDR,
                                             pod_cidrs=("10.1.0.48/29",)), "testpod", ("pod1", "ext")),
    Detector("BridgeInterface", dataclasses.replace(NODE_A, detect_local_mode=LocalMode.BRIDGE_INTERFACE,
                                                    pod_bridge_interface="vc0-testpod"), "testpod", ("pod1", "ext")),
    Detector("InterfaceNamePrefix", dataclasses.replace(NODE_A, detect_local_mode=LocalMode.INTERFACE_NAME_PREFIX,
                                                        pod_interface_name_prefix="vp"), "pod1", ("testpod", "ext")),
)


def _state() -> ClusterState:
    """One service: a cluster IP, and a node port with externalTrafficPolicy Local whose
    endpoints are all on another node."""
    service = svc("dl", VIP, node_port=NODE_PORT, service_type="NodePort",
                  external_traffic_policy=TrafficPolicy.LOCAL)
    return cluster((service, (ep("pod2", "node-b"), ep("pod3", "node-b"))))


@pytest.mark.parametrize("detector", DETECTORS, ids=lambda d: d.name)
def test_detector_decides_masquerade_and_the_pod_short_circuit(lab: Lab, mode: Mode,  # noqa: F811
                                                               detector: Detector) -> None:
    mode.load(_state(), detector.node)
    local_ip = lab.ip_of(detector.local)
    # Cluster IP: local traffic keeps its source; everything else is masqueraded.
    send = detector.probe
    assert_reaches(mode, send(lab, mode, detector.local, VIP, 80, count=SPREAD2), ENDPOINTS, {local_ip})
    for client in detector.others:
        assert_reaches(mode, send(lab, mode, client, VIP, 80, count=SPREAD2), ENDPOINTS, masqueraded(lab))
    # externalTrafficPolicy Local, no endpoint here: pods short-circuit to the cluster's endpoints
    # (kube-proxy's "pod traffic for ... external destinations"); anyone else is dropped.
    assert_reaches(mode, send(lab, mode, detector.local, NODE_IP, NODE_PORT, count=SPREAD2), ENDPOINTS)
    for client in detector.others:
        assert_dropped(mode, send(lab, mode, client, NODE_IP, NODE_PORT, count=2, timeout=DROP_TIMEOUT))


def test_node_cidr_without_pod_cidrs_has_no_detector(lab: Lab, mode: Mode) -> None:  # noqa: F811
    """NodeCIDR before the Node has spec.podCIDRs: no detector, so (as in kube-proxy) nothing is
    masqueraded for coming from outside and no pod short-circuits the Local policy."""
    mode.load(_state(), dataclasses.replace(NODE_A, detect_local_mode=LocalMode.NODE_CIDR))
    assert_reaches(mode, mode.probe(lab, "ext", VIP, 80, count=SPREAD2), ENDPOINTS, {lab.ip_of("ext")})
    assert_dropped(mode, mode.probe(lab, "testpod", NODE_IP, NODE_PORT, count=2, timeout=DROP_TIMEOUT))
