"""Proxy settings: a KubeProxyConfiguration file and command-line flags → `ProxySettings`.

kube-proxy's rule: a flag given on the command line wins over the config file, which wins over
the built-in default. `Overrides` holds only what the user actually passed (None = not given),
so `resolve` can apply that rule field by field. Reading the file is the only I/O here.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kproxy_nft.convert import NodeInfo
from kproxy_nft.model import MASQUERADE_BIT_DEFAULT, NodeContext

CONFIG_API_VERSIONS = ("kubeproxy.config.k8s.io/v1alpha1",)
PROXY_MODES = ("iptables", "nftables")


class ConfigError(ValueError):
    """A bad setting; the message names the file (or flag) and the field."""


@dataclass(frozen=True)
class ProxySettings:
    mode: str
    node: NodeContext


@dataclass(frozen=True)
class Overrides:
    """Settings given as flags; None (or empty) means 'not given, use the file or default'."""

    mode: str | None = None
    hostname: str | None = None
    node_ips: tuple[str, ...] = ()
    cluster_cidrs: tuple[str, ...] = ()
    masquerade_all: bool | None = None
    masquerade_bit: int | None = None
    nodeport_addresses: tuple[str, ...] = ()
    zone: str | None = None
    localhost_nodeports: bool | None = None
    service_cidrs: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


def _split_cidrs(values: Any, where: str) -> tuple[str, ...]:
    """CIDRs from a comma-separated string or a list (kube-proxy accepts `a,b` for dual-stack)."""
    if values in (None, ""):
        return ()
    items = values.split(",") if isinstance(values, str) else list(values)
    out = []
    for item in items:
        text = str(item).strip()
        if text == "primary":
            out.append(text)
            continue
        try:
            ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ConfigError(f"{where}: {text!r} is not a valid CIDR") from None
        out.append(text)
    return tuple(out)


def _check_ips(values: tuple[str, ...], where: str) -> tuple[str, ...]:
    for v in values:
        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise ConfigError(f"{where}: {v!r} is not a valid IP address") from None
    return values


def load_config_file(path: str) -> dict[str, Any]:
    """The KubeProxyConfiguration document of a file, as a dict."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {e}") from None
    if not isinstance(data, dict) or data.get("kind") != "KubeProxyConfiguration":
        raise ConfigError(f"{path}: kind: expected KubeProxyConfiguration")
    if data.get("apiVersion") not in CONFIG_API_VERSIONS:
        raise ConfigError(f"{path}: apiVersion: expected one of {', '.join(CONFIG_API_VERSIONS)}")
    return data


def resolve(file_config: dict[str, Any] | None, flags: Overrides, default_hostname: str,
            source: str = "config") -> ProxySettings:
    """Merge defaults ← config file ← flags into the settings the compilers use."""
    cfg = file_config or {}
    iptables_cfg = cfg.get("iptables") or {}
    nftables_cfg = cfg.get("nftables") or {}
    if not isinstance(iptables_cfg, dict) or not isinstance(nftables_cfg, dict):
        raise ConfigError(f"{source}: iptables/nftables: expected a mapping")

    mode = flags.mode or cfg.get("mode") or "iptables"
    if mode not in PROXY_MODES:
        raise ConfigError(f"{source}: mode: unsupported proxy mode {mode!r} ({' or '.join(PROXY_MODES)})")

    hostname = (flags.hostname or cfg.get("hostnameOverride") or default_hostname).strip().lower()
    cluster_cidrs = flags.cluster_cidrs or _split_cidrs(cfg.get("clusterCIDR"), f"{source}: clusterCIDR")
    masquerade_all = flags.masquerade_all
    if masquerade_all is None:
        masquerade_all = bool(
            cfg.get("masqueradeAll") or iptables_cfg.get("masqueradeAll") or nftables_cfg.get("masqueradeAll")
        )
    bit = flags.masquerade_bit
    if bit is None:
        bit = iptables_cfg.get("masqueradeBit", MASQUERADE_BIT_DEFAULT)
    if not isinstance(bit, int) or not 0 <= bit <= 31:
        raise ConfigError(f"{source}: iptables.masqueradeBit: must be between 0 and 31, got {bit!r}")
    nodeport = flags.nodeport_addresses or _split_cidrs(cfg.get("nodePortAddresses"), f"{source}: nodePortAddresses")
    if not nodeport and mode == "nftables":
        nodeport = ("primary",)  # kube-proxy's nftables-mode default (its iptables mode: all)
    localhost = flags.localhost_nodeports
    if localhost is None:
        # kube-proxy defaults this to true; we default to false (CVE-2020-8558: route_localnet
        # exposes node ports to neighbours that spoof 127.0.0.1).
        localhost = iptables_cfg.get("localhostNodePorts", False)
    if not isinstance(localhost, bool):
        raise ConfigError(f"{source}: iptables.localhostNodePorts: expected true or false, got {localhost!r}")
    service_cidrs = flags.service_cidrs  # KubeProxyConfiguration has no such field: flag (or ServiceCIDR objects)
    if "primary" in (*cluster_cidrs, *service_cidrs):
        raise ConfigError(f"{source}: 'primary' is only valid in nodePortAddresses")
    bind = cfg.get("bindAddress")
    node_ips = flags.node_ips or ((str(bind),) if bind and bind not in ("0.0.0.0", "::") else ())

    node = NodeContext(
        hostname=hostname,
        node_ips=_check_ips(tuple(node_ips), "--node-ip"),
        zone=flags.zone,
        cluster_cidrs=cluster_cidrs,
        masquerade_all=masquerade_all,
        masquerade_bit=bit,
        nodeport_addresses=nodeport,
        localhost_nodeports=localhost,
        service_cidrs=service_cidrs,
    )
    return ProxySettings(mode=mode, node=node)


def with_node_object(settings: ProxySettings, info: NodeInfo) -> ProxySettings:
    """This node's Node object fills in what neither flags nor the config file set: its
    addresses (the first is the primary, whose family `dump` prints) and its zone. kube-proxy's
    rule: `--node-ip` / `bindAddress` win over the Node's addresses, as the agent does with the
    API's Node (`Agent.fixed_node_fields`)."""
    node = settings.node
    return dataclasses.replace(settings, node=dataclasses.replace(
        node, node_ips=node.node_ips or info.ips, zone=node.zone or info.zone))


def go_duration(seconds: float) -> str:
    """A duration as Go's `time.Duration.String` writes it (metav1.Duration in JSON): 30s,
    1m0s, 1h0m0s, 500ms, 1.5s."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:g}s"
    if hours or minutes:
        text = f"{int(minutes)}m{text}"
    if hours:
        text = f"{int(hours)}h{text}"
    return text


def configz(settings: ProxySettings, *, kubeconfig: str | None, metrics_bind_address: str,
            healthz_bind_address: str, sync_period: float, min_sync_period: float) -> dict[str, Any]:
    """The effective configuration as kube-proxy's `/configz` shows it: under the group name,
    its internal `KubeProxyConfiguration`, which has no JSON tags, so the keys are the Go field
    names (pkg/proxy/apis/config/types.go, kubernetes/kubernetes commit
    008b3652959ca58af8be3fb5b6ecfe9ae7638282). Only the sections that mean something here:
    not IPVS, Winkernel, Windows, logging. Conntrack settings kproxy-nft does not make are null."""
    node = settings.node
    return {"kubeproxy.config.k8s.io": {
        "Linux": {
            "Conntrack": {"MaxPerCore": None, "Min": None, "TCPEstablishedTimeout": None,
                          "TCPCloseWaitTimeout": None, "TCPBeLiberal": False, "UDPTimeout": "0s",
                          "UDPStreamTimeout": "0s"},
            "MasqueradeAll": node.masquerade_all,
            "OOMScoreAdj": None,
        },
        "FeatureGates": {},
        "ClientConnection": {"Kubeconfig": kubeconfig or ""},
        "HostnameOverride": node.hostname,
        "BindAddress": node.node_ips[0] if node.node_ips else "0.0.0.0",  # noqa: S104 - kube-proxy's default
        "HealthzBindAddress": healthz_bind_address,
        "MetricsBindAddress": metrics_bind_address,
        "BindAddressHardFail": False,
        "EnableProfiling": False,
        "Mode": settings.mode,
        "IPTables": {"MasqueradeBit": node.masquerade_bit, "LocalhostNodePorts": node.localhost_nodeports},
        "NFTables": {"MasqueradeBit": node.masquerade_bit},
        "DetectLocalMode": "ClusterCIDR",
        "DetectLocal": {"BridgeInterface": "", "ClusterCIDRs": list(node.cluster_cidrs), "InterfaceNamePrefix": ""},
        "NodePortAddresses": list(node.nodeport_addresses),
        "SyncPeriod": go_duration(sync_period),
        "MinSyncPeriod": go_duration(min_sync_period),
    }}
