"""Settings: defaults ← KubeProxyConfiguration ← flags, as kube-proxy resolves them."""

from __future__ import annotations

from pathlib import Path

import pytest

from kproxy_nft.config import ConfigError, Overrides, load_config_file, resolve
from tests.helpers import SEED_CONFIG


def test_seed_config_gives_the_docker_desktop_node() -> None:
    settings = resolve(load_config_file(str(SEED_CONFIG)), Overrides(), default_hostname="ignored")
    assert settings.mode == "iptables"
    assert settings.node.hostname == "docker-desktop"
    assert settings.node.cluster_cidrs == ("10.1.0.0/16",)
    assert settings.node.masquerade_mark == "0x4000"


def test_flags_win_over_the_file() -> None:
    flags = Overrides(hostname="Node-7", cluster_cidrs=("10.244.0.0/16",), masquerade_all=True, masquerade_bit=15)
    node = resolve(load_config_file(str(SEED_CONFIG)), flags, default_hostname="x").node
    assert (node.hostname, node.cluster_cidrs, node.masquerade_all, node.masquerade_mark) == (
        "node-7", ("10.244.0.0/16",), True, "0x8000")


def test_defaults_without_a_file() -> None:
    node = resolve(None, Overrides(), default_hostname="MyHost").node
    assert node.hostname == "myhost" and node.cluster_cidrs == () and not node.masquerade_all


def test_dual_stack_cluster_cidr_is_comma_separated(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
                    "clusterCIDR: 10.0.0.0/8,fd00::/48\n")
    assert resolve(load_config_file(str(path)), Overrides(), "h").node.cluster_cidrs == ("10.0.0.0/8", "fd00::/48")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("kind: Service\n", "kind: expected KubeProxyConfiguration"),
        ("apiVersion: v9\nkind: KubeProxyConfiguration\n", "apiVersion"),
        ("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nclusterCIDR: nope\n",
         "clusterCIDR: 'nope' is not a valid CIDR"),
        ("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nmode: ipvs\n",
         "mode: unsupported proxy mode 'ipvs'"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path: Path, body: str, expected: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=expected):
        resolve(load_config_file(str(path)), Overrides(), "h")
