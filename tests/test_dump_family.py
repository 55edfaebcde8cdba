"""`dump` without `--ip-family` prints the primary node IP's family, as kube-proxy's primary
proxier does; `apply` plans only the families the node IPs name (issue 15, item 8)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from kproxy_nft.cli import load_inputs, main

DUAL_STACK = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  ipFamilyPolicy: PreferDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-v6
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv6
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: ["fd00:1::5"]
"""


def dump(tmp_path: Path, *args: str) -> Result:
    manifest = tmp_path / "web.yaml"
    manifest.write_text(DUAL_STACK)
    return CliRunner().invoke(main, ["dump", "-f", str(manifest), "--proxy-mode", "iptables", *args],
                              catch_exceptions=False)


@pytest.mark.parametrize("node_ips", [["2001:db8::1"], ["2001:db8::1,192.0.2.1"]])
def test_dump_defaults_to_the_primary_node_ip_family(tmp_path: Path, node_ips: list[str]) -> None:
    args = [arg for ip in node_ips for arg in ("--node-ip", ip)]
    result = dump(tmp_path, *args, "--iptables-localhost-nodeports", "true")
    assert result.exit_code == 0, result.output
    assert "-d fd00:96::10 --dport 80" in result.stdout and "[fd00:1::5]:8080" in result.stdout
    assert "127.0.0.0/8" not in result.stdout  # ip6tables-restore refuses an IPv4 CIDR
    assert result.stdout == dump(tmp_path, *args, "--iptables-localhost-nodeports", "true",
                                 "--ip-family", "6").stdout


def test_dump_defaults_to_ipv4_for_an_ipv4_or_unknown_node_ip(tmp_path: Path) -> None:
    for args in ([], ["--node-ip", "192.0.2.1,2001:db8::1"]):
        result = dump(tmp_path, *args)
        assert "-d 10.96.0.10 --dport 80" in result.stdout and "fd00:96::10" not in result.stdout


def test_an_explicit_ip_family_wins(tmp_path: Path) -> None:
    result = dump(tmp_path, "--node-ip", "2001:db8::1", "--ip-family", "4")
    assert "-d 10.96.0.10 --dport 80" in result.stdout


def test_apply_plans_only_the_node_ip_family(tmp_path: Path) -> None:
    manifest = tmp_path / "web.yaml"
    manifest.write_text(DUAL_STACK)
    result = CliRunner().invoke(main, ["apply", "--dry-run", "-f", str(manifest), "--proxy-mode", "iptables",
                                       "--iptables-backend", "nft", "--node-ip", "2001:db8::1"],
                                catch_exceptions=False)
    assert result.exit_code == 1, result.output
    assert "(IPv6)" in result.stdout and "(IPv4)" not in result.stdout


NODE = """\
apiVersion: v1
kind: Node
metadata: {name: node-1, labels: {topology.kubernetes.io/zone: zone-b}}
spec: {podCIDRs: ["fd00:1::/64"]}
status:
  addresses: [{type: InternalIP, address: "2001:db8::7"}, {type: InternalIP, address: 192.0.2.7}]
"""


def test_dump_and_apply_take_this_nodes_node_object_from_the_manifests(tmp_path: Path) -> None:
    (tmp_path / "node.yaml").write_text(NODE)
    (tmp_path / "other-node.yaml").write_text(NODE.replace("node-1", "node-2").replace("2001:db8::7", "192.0.2.9"))
    result = dump(tmp_path, "-f", str(tmp_path), "--hostname-override", "node-1")
    assert "-d fd00:96::10 --dport 80" in result.stdout  # the Node's primary IP is IPv6
    manifests, settings = load_inputs([str(tmp_path)], hostname_override="node-1")
    assert (settings.node.node_ips, settings.node.zone) == (("2001:db8::7", "192.0.2.7"), "zone-b")
    # Flags win over the Node object, as kube-proxy's --node-ip does.
    _, settings = load_inputs([str(tmp_path)], hostname_override="node-1", node_ips=("192.0.2.1",), zone="z")
    assert (settings.node.node_ips, settings.node.zone) == (("192.0.2.1",), "z")
    _, settings = load_inputs([str(tmp_path)], hostname_override="node-3")  # no Node of that name
    assert settings.node.node_ips == ()


def test_a_malformed_node_manifest_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "node.yaml"
    bad.write_text(NODE.replace("spec: {podCIDRs: [\"fd00:1::/64\"]}",
                                "spec: {taints: [{key: example.com/drain, effect: Later}]}"))
    result = CliRunner().invoke(main, ["dump", "-f", str(bad)], catch_exceptions=False)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (f"kproxy-nft: error: {bad}: document 1 (Node node-1): spec.taints[0].effect: "
                             "'Later' is not one of NoSchedule, PreferNoSchedule, NoExecute\n")
