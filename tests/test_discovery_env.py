"""`kproxy-nft env`: the Service variables kubelet injects, against golden files and kubelet's rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from kproxy_nft.cli import main
from kproxy_nft.discovery.envvars import env_name, render_env, service_environment
from kproxy_nft.discovery.load import load
from tests.helpers import EXAMPLES, GOLDEN

# A cluster with the API server's Service, a UDP+TCP Service, a dual-stack IPv6-primary one
# with an unnamed port, and Services that get no variables (headless, ExternalName, elsewhere).
APPS = """\
apiVersion: v1
kind: Service
metadata: {name: kubernetes, namespace: default}
spec:
  clusterIP: 10.96.0.1
  ports: [{name: https, port: 443, targetPort: 6443}]
---
apiVersion: v1
kind: Service
metadata: {name: dns-cache, namespace: apps}
spec:
  clusterIP: 10.96.0.53
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata: {name: web6, namespace: apps}
spec:
  clusterIP: fd00::10
  clusterIPs: [fd00::10, 10.96.0.60]
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: peers, namespace: apps}
spec:
  clusterIP: None
  ports: [{name: gossip, port: 7946}]
---
apiVersion: v1
kind: Service
metadata: {name: upstream, namespace: apps}
spec:
  type: ExternalName
  externalName: api.example.com
---
apiVersion: v1
kind: Service
metadata: {name: billing, namespace: finance}
spec:
  clusterIP: 10.96.7.7
  ports: [{port: 8080}]
"""


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def apps(tmp_path: Path) -> Path:
    path = tmp_path / "apps.yaml"
    path.write_text(APPS)
    return path


def parse_env(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines())


def test_golden_env_of_the_seed() -> None:
    """The seed's two Services as a pod in `default` sees them (notes 6.2.2)."""
    result = run("env", "-f", str(EXAMPLES), "--namespace", "default")
    assert result.exit_code == 0, result.output
    assert result.stdout == (GOLDEN / "env-default.txt").read_text()
    assert result.stderr == ""  # the KubeProxyConfiguration in examples/ is not news here


def test_golden_env_of_a_namespace_with_udp_ipv6_and_the_api_service(apps: Path) -> None:
    result = run("env", "-f", str(apps), "-n", "apps")
    assert result.exit_code == 0, result.output
    assert result.stdout == (GOLDEN / "env-apps.txt").read_text()


def test_values_follow_kubelet(apps: Path) -> None:
    env = parse_env(run("env", "-f", str(apps), "-n", "apps").stdout)
    assert env["KUBERNETES_SERVICE_HOST"] == "10.96.0.1"
    assert env["KUBERNETES_SERVICE_PORT"] == "443"  # the Service port, not the targetPort
    assert env["KUBERNETES_SERVICE_PORT_HTTPS"] == "443"
    assert env["KUBERNETES_PORT_443_TCP"] == "tcp://10.96.0.1:443"
    assert env["DNS_CACHE_PORT"] == "udp://10.96.0.53:53"  # the first port, its protocol
    assert env["DNS_CACHE_SERVICE_PORT_DNS_TCP"] == "53"
    assert env["DNS_CACHE_PORT_53_UDP_PROTO"] == "udp" and env["DNS_CACHE_PORT_53_TCP_PROTO"] == "tcp"
    # IPv6: the primary cluster IP, bracketed in URLs only; an unnamed port has no _SERVICE_PORT_<NAME>.
    assert env["WEB6_SERVICE_HOST"] == "fd00::10"
    assert env["WEB6_PORT"] == "tcp://[fd00::10]:80"
    assert env["WEB6_PORT_80_TCP_ADDR"] == "fd00::10"
    assert not [k for k in env if k.startswith("WEB6_SERVICE_PORT_")]
    assert not [k for k in env if k.startswith(("PEERS_", "UPSTREAM_", "BILLING_"))]


def test_kubernetes_service_is_always_there(apps: Path) -> None:
    """Without service links, or in another namespace, only the API server's Service remains."""
    for args in (("-n", "apps", "--no-service-links"), ("-n", "elsewhere")):
        env = parse_env(run("env", "-f", str(apps), *args).stdout)
        assert env and all(k.startswith("KUBERNETES_") for k in env), args
    assert run("env", "-f", str(EXAMPLES), "--no-service-links").stdout == ""  # the seed has no such Service


def test_a_kubernetes_service_in_the_pods_namespace_wins(tmp_path: Path) -> None:
    own = APPS + "---\n" + APPS.split("---\n")[0].replace("namespace: default", "namespace: apps").replace(
        "10.96.0.1", "10.96.9.9"
    )
    (tmp_path / "m.yaml").write_text(own)
    services = load([str(tmp_path / "m.yaml")]).services
    assert service_environment(services, "apps")["KUBERNETES_SERVICE_HOST"] == "10.96.9.9"
    assert service_environment(services, "apps", service_links=False)["KUBERNETES_SERVICE_HOST"] == "10.96.0.1"
    assert service_environment(services, "default")["KUBERNETES_SERVICE_HOST"] == "10.96.0.1"


def test_json_format_holds_the_same_variables(apps: Path) -> None:
    lines = parse_env(run("env", "-f", str(apps), "-n", "apps").stdout)
    assert json.loads(run("env", "-f", str(apps), "-n", "apps", "--format", "json").stdout) == lines


def test_names_and_rendering() -> None:
    assert env_name("sample-clusterip-multi") == "SAMPLE_CLUSTERIP_MULTI"
    assert env_name("8080-http") == "8080_HTTP"
    assert render_env({"A": "1", "B": "x=y"}) == "A=1\nB=x=y\n"
    assert render_env({}) == ""


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = run("env", "-f", str(tmp_path / "missing.yaml"))
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "missing.yaml: cannot read" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(APPS.replace("port: 443", "port: 70000"))
    result = run("env", "-f", str(bad))
    assert result.exit_code == 2
    assert "bad.yaml: document 1 (Service default/kubernetes): spec.ports[0].port" in result.stderr
