"""`--detect-local-mode` and its settings (issue 15, item 5): flags and KubeProxyConfiguration
fields with kube-proxy's names, the validation kube-proxy does at startup, NodeCIDR from the
Node object, `/configz`, and the rule each detector puts in both modes' rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from kproxy_nft.cli import main
from kproxy_nft.config import ConfigError, Overrides, configz, load_config_file, resolve, with_node_object
from kproxy_nft.convert import NodeInfo
from kproxy_nft.model import IPFamily, LocalDetector, LocalMode

HEADER = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"

# This node's Node (podCIDRs 10.1.0.0/24) and a NodePort service with externalTrafficPolicy
# Local whose one endpoint is on another node: the cluster IP's masquerade rule and the
# external chain's pod short-circuit both carry the detector.
MANIFESTS = """\
apiVersion: v1
kind: Node
metadata: {name: node-1}
spec: {podCIDRs: [10.1.0.0/24]}
status: {addresses: [{type: InternalIP, address: 192.168.100.1}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: ["10.1.1.5"]
  nodeName: node-b
"""


def config_file(tmp_path: Path, body: str) -> dict[str, object]:
    path = tmp_path / "kube-proxy.yaml"
    path.write_text(HEADER + body)
    return load_config_file(str(path))


# -- settings -------------------------------------------------------------------------------------


def test_default_is_cluster_cidr() -> None:
    node = resolve(None, Overrides(cluster_cidrs=("10.1.0.0/16",)), "h").node
    assert node.detect_local_mode is LocalMode.CLUSTER_CIDR
    assert node.local_detector(IPFamily.V4) == LocalDetector(cidr="10.1.0.0/16")


def test_config_fields_with_kube_proxys_names(tmp_path: Path) -> None:
    cfg = config_file(tmp_path, "detectLocalMode: InterfaceNamePrefix\n"
                                "detectLocal: {bridgeInterface: cni0, interfaceNamePrefix: veth}\n")
    node = resolve(cfg, Overrides(), "h").node
    assert (node.detect_local_mode, node.pod_bridge_interface, node.pod_interface_name_prefix) == (
        LocalMode.INTERFACE_NAME_PREFIX, "cni0", "veth")
    assert node.local_detector(IPFamily.V6) == LocalDetector(interface="veth", prefix=True)


def test_flags_win_over_the_file(tmp_path: Path) -> None:
    cfg = config_file(tmp_path, "detectLocalMode: InterfaceNamePrefix\ndetectLocal: {interfaceNamePrefix: veth}\n")
    node = resolve(cfg, Overrides(detect_local_mode="BridgeInterface", pod_bridge_interface="br0"), "h").node
    assert node.local_detector(IPFamily.V4) == LocalDetector(interface="br0")


@pytest.mark.parametrize(("flags", "body", "message"), [
    (Overrides(detect_local_mode="PodCIDR"), "",
     "--detect-local-mode: unsupported value 'PodCIDR': supported values: "
     "ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix"),
    (Overrides(), "detectLocalMode: clustercidr\n",
     "kube-proxy.yaml: detectLocalMode: unsupported value 'clustercidr': supported values: "
     "ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix"),
    (Overrides(detect_local_mode="BridgeInterface"), "",
     "--detect-local-mode: BridgeInterface needs --pod-bridge-interface (or detectLocal.bridgeInterface): "
     "must not be empty"),
    (Overrides(), "detectLocalMode: InterfaceNamePrefix\n",
     "detectLocalMode: InterfaceNamePrefix needs --pod-interface-name-prefix (or detectLocal.interfaceNamePrefix)"),
    (Overrides(detect_local_mode="BridgeInterface", pod_bridge_interface="br0 -j ACCEPT"), "",
     "--pod-bridge-interface (detectLocal.bridgeInterface): unsafe"),
    (Overrides(), "detectLocal: [cni0]\n", "detectLocal: expected a mapping"),
])
def test_bad_settings_are_refused_at_startup(tmp_path: Path, flags: Overrides, body: str, message: str) -> None:
    """kube-proxy: validateDetectLocalMode (NotSupported, with the valid values) and
    validateDetectLocalConfiguration (the interface of the mode must not be empty)."""
    with pytest.raises(ConfigError) as caught:
        resolve(config_file(tmp_path, body), flags, "h", source=str(tmp_path / "kube-proxy.yaml"))
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("command", ["dump", "apply", "run"])
def test_an_unknown_mode_on_the_command_line_is_one_line_and_exit_2(tmp_path: Path, command: str) -> None:
    """Refused while reading the settings: before any manifest, API or kernel is touched."""
    (tmp_path / "m.yaml").write_text(MANIFESTS)
    source = ["--manifests", str(tmp_path)] if command == "run" else ["-f", str(tmp_path)]
    result = CliRunner().invoke(main, [command, *source, "--detect-local-mode", "Bridge"])
    assert result.exit_code == 2
    assert result.stderr == ("kproxy-nft: error: --detect-local-mode: unsupported value 'Bridge': supported values: "
                             "ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix\n")


def test_node_cidr_reads_the_node_objects_pod_cidrs() -> None:
    settings = resolve(None, Overrides(detect_local_mode="NodeCIDR", cluster_cidrs=("10.0.0.0/8",)), "node-1")
    assert settings.node.local_detector(IPFamily.V4) is None  # no Node yet: no detector, as in kube-proxy
    node = with_node_object(settings, NodeInfo(("192.168.100.1",), None, ("10.1.0.0/24", "fd00:1::/64"))).node
    assert node.local_detector(IPFamily.V4) == LocalDetector(cidr="10.1.0.0/24")
    assert node.local_detector(IPFamily.V6) == LocalDetector(cidr="fd00:1::/64")


def test_configz_shows_the_effective_mode() -> None:
    settings = resolve(None, Overrides(detect_local_mode="InterfaceNamePrefix", pod_interface_name_prefix="veth"), "h")
    shown = configz(settings, kubeconfig=None, metrics_bind_address="127.0.0.1:10249",
                    healthz_bind_address="0.0.0.0:10256", sync_period=30, min_sync_period=1)["kubeproxy.config.k8s.io"]
    assert shown["DetectLocalMode"] == "InterfaceNamePrefix"
    assert shown["DetectLocal"] == {"BridgeInterface": "", "ClusterCIDRs": [], "InterfaceNamePrefix": "veth"}


# -- the rules, both modes ------------------------------------------------------------------------

# (flags, the iptables masquerade and short-circuit matches, the nftables ones)
RULES = {
    "ClusterCIDR": ([], ("! -s 10.1.0.0/16 -j KUBE-MARK-MASQ", "-s 10.1.0.0/16 -j KUBE-SVC-"),
                    ("ip saddr != 10.1.0.0/16 jump mark-for-masquerade", "ip saddr 10.1.0.0/16 meta l4proto tcp dnat")),
    "NodeCIDR": ([], ("! -s 10.1.0.0/24 -j KUBE-MARK-MASQ", "-s 10.1.0.0/24 -j KUBE-SVC-"),
                 ("ip saddr != 10.1.0.0/24 jump mark-for-masquerade", "ip saddr 10.1.0.0/24 meta l4proto tcp dnat")),
    "BridgeInterface": (["--pod-bridge-interface", "cni0"], ("! -i cni0 -j KUBE-MARK-MASQ", "-i cni0 -j KUBE-SVC-"),
                        ('iifname != "cni0" jump mark-for-masquerade', 'iifname "cni0" meta l4proto tcp dnat')),
    "InterfaceNamePrefix": (["--pod-interface-name-prefix", "veth"],
                            ("! -i veth+ -j KUBE-MARK-MASQ", "-i veth+ -j KUBE-SVC-"),
                            ('iifname != "veth*" jump mark-for-masquerade', 'iifname "veth*" meta l4proto tcp dnat')),
}


@pytest.mark.parametrize("detect_mode", sorted(RULES))
@pytest.mark.parametrize("proxy_mode", ["iptables", "nftables"])
def test_each_detector_in_the_rules(tmp_path: Path, detect_mode: str, proxy_mode: str) -> None:
    (tmp_path / "m.yaml").write_text(MANIFESTS)
    flags, iptables_matches, nftables_matches = RULES[detect_mode]
    result = CliRunner().invoke(main, ["dump", "-f", str(tmp_path), "--proxy-mode", proxy_mode,
                                       "--hostname-override", "node-1", "--cluster-cidr", "10.1.0.0/16",
                                       "--detect-local-mode", detect_mode, *flags])
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.stdout.splitlines()]
    masquerade, short_circuit = iptables_matches if proxy_mode == "iptables" else nftables_matches
    assert sum(masquerade in line for line in lines) == 1, result.stdout
    assert sum(short_circuit in line for line in lines) == 1, result.stdout
    # No other detector leaks in: the cluster CIDR is only ever the ClusterCIDR mode's.
    assert ("10.1.0.0/16" in result.stdout) is (detect_mode == "ClusterCIDR")


# -- the agent: NodeCIDR from the API's (or --manifests') Node --------------------------------------


def test_the_agent_takes_pod_cidrs_from_its_node_object() -> None:
    """The agent's Node events (API or `run --manifests`) give NodeCIDR its CIDRs; every
    service is recompiled when they change."""
    from kubernetes.client import V1Node

    from kproxy_nft.agent.main import Agent
    from kproxy_nft.agent.metrics import new_metrics
    from kproxy_nft.model import NodeContext
    from kproxy_nft.sources.events import Replace
    from tests.fake_proxier import FakeProxier

    proxier = FakeProxier(NodeContext(hostname="node-1", detect_local_mode=LocalMode.NODE_CIDR))
    agent = Agent(proxier, new_metrics(), min_sync_period=0.0, sync_period=30.0)
    agent.events.put(Replace("nodes", (V1Node.from_dict({"metadata": {"name": "node-1"},
                                                         "spec": {"podCIDRs": ["10.1.0.0/24"]}}),)))
    agent._drain(0)  # noqa: SLF001 - one loop step, without the thread
    assert proxier.node.local_detector(IPFamily.V4) == LocalDetector(cidr="10.1.0.0/24")
