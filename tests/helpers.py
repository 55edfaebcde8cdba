"""Small builders and paths shared by the tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from kproxy_nft.model import Endpoint, NodeContext, Protocol, ServicePort, ServicePortName

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


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> None:
    """Poll until `predicate()` holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError("condition not reached")
