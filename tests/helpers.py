"""Small builders and paths shared by the tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from kproxy_nft.model import ClusterState, Endpoint, NodeContext, Protocol, ServicePort, ServicePortName

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
GOLDEN = Path(__file__).resolve().parent / "golden"
SEED_CONFIG = EXAMPLES / "kube-proxy-config.yaml"


def spn(name: str = "svc1", ns: str = "ns1", port: str = "p80", protocol: Protocol = Protocol.TCP) -> ServicePortName:
    return ServicePortName(ns, name, port, protocol)


def service(name: ServicePortName | None = None, ip: str = "172.30.0.41", port: int = 80, **kw: object) -> ServicePort:
    return ServicePort(name=name or spn(), port=port, target_port=port, cluster_ips=(ip,), **kw)  # type: ignore[arg-type]


def endpoint(ip: str, port: int = 80, **kw: object) -> Endpoint:
    return Endpoint(ip=ip, port=port, **kw)  # type: ignore[arg-type]


NODE = NodeContext(hostname="node1", cluster_cidrs=("10.0.0.0/8",))

DUAL_STACK_SERVICE_YAML = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: test}
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.70
  clusterIPs: [10.96.0.70, "fd00:96::70"]
  ports: [{name: http, port: 8080, targetPort: 80, protocol: TCP}]
"""
DUAL_STACK_SLICE_YAML = """\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-{family}, namespace: test, labels: {{kubernetes.io/service-name: web}}}}
addressType: {address_type}
ports: [{{name: http, port: 80, protocol: TCP}}]
endpoints: [{{addresses: ["{ip}"], conditions: {{ready: true}}}}]
"""


def write_dual_stack_web(directory: Path, ip4: str, ip6: str) -> None:
    """Manifests of the RequireDualStack Service test/web (10.96.0.70 and fd00:96::70, port 8080 → 80),
    with one ready endpoint per family: `svc.yaml`, `v4.yaml`, `v6.yaml` in `directory`."""
    directory.mkdir(exist_ok=True)
    (directory / "svc.yaml").write_text(DUAL_STACK_SERVICE_YAML)
    for family, kind, ip in (("v4", "IPv4", ip4), ("v6", "IPv6", ip6)):
        (directory / f"{family}.yaml").write_text(DUAL_STACK_SLICE_YAML.format(family=family, address_type=kind, ip=ip))


def changed_names(a: ClusterState, b: ClusterState) -> set[ServicePortName]:
    """The service ports whose service or endpoints differ between `a` and `b` (or exist in one only)."""
    return {n for n in {*a.services, *b.services}
            if a.services.get(n) != b.services.get(n) or a.endpoints_of(n) != b.endpoints_of(n)}  # fmt: skip


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> None:
    """Poll until `predicate()` holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError("condition not reached")
