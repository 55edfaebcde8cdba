"""Proxy settings: a KubeProxyConfiguration file and command-line flags → `ProxySettings`.

kube-proxy's rule: a flag given on the command line wins over the config file, which wins over
the built-in default. `Overrides` holds only what the user actually passed (None = not given),
so `resolve` can apply that rule field by field. Reading the file is the only I/O here.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kproxy_nft.compile.render import UnsafeValue, interface
from kproxy_nft.convert import NodeInfo
from kproxy_nft.model import MASQUERADE_BIT_DEFAULT, ConntrackSettings, LocalMode, NodeContext

CONFIG_API_VERSIONS = ("kubeproxy.config.k8s.io/v1alpha1",)
PROXY_MODES = ("iptables", "nftables")
DEFAULT_MODE = "iptables"  # kube-proxy's default on Linux


class ConfigError(ValueError):
    """A bad setting; the message names the file (or flag) and the field."""


@dataclass(frozen=True)
class ProxySettings:
    mode: str
    node: NodeContext
    conntrack: ConntrackSettings = ConntrackSettings()  # node setup at startup (kernel/sysctl.py)


@dataclass(frozen=True)
class ConntrackOverrides:
    """The `--conntrack-*` flags given (None: not given); durations in seconds."""

    max_per_core: int | None = None
    min: int | None = None
    tcp_timeout_established: float | None = None
    tcp_timeout_close_wait: float | None = None
    tcp_be_liberal: bool | None = None
    udp_timeout: float | None = None
    udp_timeout_stream: float | None = None


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
    detect_local_mode: str | None = None
    pod_bridge_interface: str | None = None
    pod_interface_name_prefix: str | None = None
    conntrack: ConntrackOverrides = ConntrackOverrides()
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


_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_go_duration(text: str) -> float:
    """Seconds of a Go duration (`time.ParseDuration`, metav1.Duration): 24h0m0s, 1h, 90s,
    500ms, 0; ValueError otherwise."""
    body = text.strip()
    sign = -1.0 if body.startswith("-") else 1.0
    body = body.lstrip("+-")
    if body == "0":
        return 0.0
    total, at = 0.0, 0
    while at < len(body):
        m = _GO_DURATION_PART.match(body, at)
        if m is None:
            break
        total += float(m.group(1)) * _GO_UNITS[m.group(2)]
        at = m.end()
    if not body or at != len(body):
        raise ValueError(f"{text!r} is not a duration (e.g. 24h0m0s, 1h, 30s)")
    return sign * total


def _detect_local(cfg: dict[str, Any], flags: Overrides, source: str) -> tuple[LocalMode, str, str]:
    """The local-traffic detector's mode, bridge and prefix, validated as kube-proxy does
    (`validateDetectLocalMode`, `validateDetectLocalConfiguration` in
    pkg/proxy/apis/config/validation/validation.go): one of the four modes, and the
    interface setting the mode reads must not be empty."""
    detect = cfg.get("detectLocal") or {}
    if not isinstance(detect, dict):
        raise ConfigError(f"{source}: detectLocal: expected a mapping")
    given = flags.detect_local_mode or cfg.get("detectLocalMode") or LocalMode.CLUSTER_CIDR.value
    where = "--detect-local-mode" if flags.detect_local_mode else f"{source}: detectLocalMode"
    try:
        mode = LocalMode(given)
    except ValueError:
        supported = ", ".join(m.value for m in LocalMode)
        raise ConfigError(f"{where}: unsupported value {given!r}: supported values: {supported}") from None
    bridge = flags.pod_bridge_interface or str(detect.get("bridgeInterface") or "")
    prefix = flags.pod_interface_name_prefix or str(detect.get("interfaceNamePrefix") or "")
    for needed, value, flag, field_name in (
        (LocalMode.BRIDGE_INTERFACE, bridge, "--pod-bridge-interface", "detectLocal.bridgeInterface"),
        (LocalMode.INTERFACE_NAME_PREFIX, prefix, "--pod-interface-name-prefix", "detectLocal.interfaceNamePrefix"),
    ):
        if mode is needed and not value:
            raise ConfigError(f"{where}: {mode.value} needs {flag} (or {field_name}): must not be empty")
        if value:
            try:
                interface(value, flag)
            except UnsafeValue as e:
                raise ConfigError(f"{flag} ({field_name}): {e}") from None
    return mode, bridge, prefix


def _duration(value: Any, where: str) -> float:
    if isinstance(value, str):
        try:
            seconds = parse_go_duration(value)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        seconds = 0.0  # a bare 0 in YAML: unambiguous, whatever the unit
    else:
        raise ConfigError(f"{where}: expected a duration such as 24h0m0s, got {value!r}")
    if seconds < 0:
        raise ConfigError(f"{where}: must be greater than or equal to 0")
    return seconds


def _conntrack(cfg: dict[str, Any], flags: ConntrackOverrides, source: str) -> ConntrackSettings:
    """kube-proxy's `conntrack` section: a flag wins, then the file (null: the default); each
    value must be >= 0 (`validateKubeProxyConntrackConfiguration`)."""
    section = cfg.get("conntrack") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: conntrack: expected a mapping")
    default = ConntrackSettings()

    def pick(flag: Any, key: str, fallback: Any) -> Any:
        return flag if flag is not None else (fallback if section.get(key) is None else section[key])

    counts: dict[str, int] = {}
    for key, flag, fallback in (("maxPerCore", flags.max_per_core, default.max_per_core),
                                ("min", flags.min, default.min)):
        value = pick(flag, key, fallback)
        if type(value) is not int or value < 0:
            raise ConfigError(f"{source}: conntrack.{key}: must be an integer >= 0, got {value!r}")
        counts[key] = value
    liberal = pick(flags.tcp_be_liberal, "tcpBeLiberal", default.tcp_be_liberal)
    if not isinstance(liberal, bool):
        raise ConfigError(f"{source}: conntrack.tcpBeLiberal: expected true or false, got {liberal!r}")
    seconds: dict[str, float] = {}
    for key, given, default_seconds in (
        ("tcpEstablishedTimeout", flags.tcp_timeout_established, default.tcp_established_timeout),
        ("tcpCloseWaitTimeout", flags.tcp_timeout_close_wait, default.tcp_close_wait_timeout),
        ("udpTimeout", flags.udp_timeout, default.udp_timeout),
        ("udpStreamTimeout", flags.udp_timeout_stream, default.udp_stream_timeout),
    ):
        in_file = section.get(key)
        seconds[key] = (given if given is not None else
                        default_seconds if in_file is None else _duration(in_file, f"{source}: conntrack.{key}"))
    return ConntrackSettings(
        max_per_core=counts["maxPerCore"], min=counts["min"],
        tcp_established_timeout=seconds["tcpEstablishedTimeout"], tcp_close_wait_timeout=seconds["tcpCloseWaitTimeout"],
        tcp_be_liberal=liberal, udp_timeout=seconds["udpTimeout"], udp_stream_timeout=seconds["udpStreamTimeout"],
    )


def resolve(file_config: dict[str, Any] | None, flags: Overrides, default_hostname: str,
            source: str = "config") -> ProxySettings:
    """Merge defaults ← config file ← flags into the settings the compilers use."""
    cfg = file_config or {}
    iptables_cfg = cfg.get("iptables") or {}
    nftables_cfg = cfg.get("nftables") or {}
    if not isinstance(iptables_cfg, dict) or not isinstance(nftables_cfg, dict):
        raise ConfigError(f"{source}: iptables/nftables: expected a mapping")

    mode = flags.mode or cfg.get("mode") or DEFAULT_MODE
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
    detect_local_mode, bridge, prefix = _detect_local(cfg, flags, source)

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
        detect_local_mode=detect_local_mode,
        pod_bridge_interface=bridge,
        pod_interface_name_prefix=prefix,
    )
    return ProxySettings(mode=mode, node=node, conntrack=_conntrack(cfg, flags.conntrack, source))


def with_node_object(settings: ProxySettings, info: NodeInfo) -> ProxySettings:
    """This node's Node object fills in what neither flags nor the config file set: its
    addresses (the first is the primary, whose family `dump` prints) and its zone. kube-proxy's
    rule: `--node-ip` / `bindAddress` win over the Node's addresses, as the agent does with the
    API's Node (`Agent.fixed_node_fields`). Its spec.podCIDRs are the NodeCIDR detector's
    (no flag sets them, as in kube-proxy)."""
    node = settings.node
    return dataclasses.replace(settings, node=dataclasses.replace(
        node, node_ips=node.node_ips or info.ips, zone=node.zone or info.zone, pod_cidrs=info.pod_cidrs))


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
    not IPVS, Winkernel, Windows, logging."""
    node, ct = settings.node, settings.conntrack
    return {"kubeproxy.config.k8s.io": {
        "Linux": {
            "Conntrack": {"MaxPerCore": ct.max_per_core, "Min": ct.min,
                          "TCPEstablishedTimeout": go_duration(ct.tcp_established_timeout),
                          "TCPCloseWaitTimeout": go_duration(ct.tcp_close_wait_timeout),
                          "TCPBeLiberal": ct.tcp_be_liberal, "UDPTimeout": go_duration(ct.udp_timeout),
                          "UDPStreamTimeout": go_duration(ct.udp_stream_timeout)},
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
        "DetectLocalMode": node.detect_local_mode.value,
        "DetectLocal": {"BridgeInterface": node.pod_bridge_interface, "ClusterCIDRs": list(node.cluster_cidrs),
                        "InterfaceNamePrefix": node.pod_interface_name_prefix},
        "NodePortAddresses": list(node.nodeport_addresses),
        "SyncPeriod": go_duration(sync_period),
        "MinSyncPeriod": go_duration(min_sync_period),
    }}


def kube_proxy_configuration(settings: ProxySettings, *, kubeconfig: str | None, metrics_bind_address: str,
                             healthz_bind_address: str, sync_period: float, min_sync_period: float) -> dict[str, Any]:
    """The effective settings as a kubeproxy.config.k8s.io/v1alpha1 KubeProxyConfiguration
    (`--write-config-to`; kube-proxy's `writeConfigFile`), which `--config` reads back to the
    same settings. JSON names of staging/src/k8s.io/kube-proxy/config/v1alpha1/types.go
    (kubernetes/kubernetes commit 052d2d84f95e90aa94868b51a48b1ae7a1c91152). The ServiceCIDRs,
    the zone and a second node IP have no field there (they are flags, or the API's)."""
    node, ct = settings.node, settings.conntrack
    periods = {"syncPeriod": go_duration(sync_period), "minSyncPeriod": go_duration(min_sync_period)}
    return {
        "apiVersion": CONFIG_API_VERSIONS[0],
        "kind": "KubeProxyConfiguration",
        "bindAddress": node.node_ips[0] if node.node_ips else "0.0.0.0",  # noqa: S104 - kube-proxy's default
        "clientConnection": {"kubeconfig": kubeconfig or ""},
        "clusterCIDR": ",".join(node.cluster_cidrs),
        "conntrack": {"maxPerCore": ct.max_per_core, "min": ct.min,
                      "tcpEstablishedTimeout": go_duration(ct.tcp_established_timeout),
                      "tcpCloseWaitTimeout": go_duration(ct.tcp_close_wait_timeout),
                      "tcpBeLiberal": ct.tcp_be_liberal, "udpTimeout": go_duration(ct.udp_timeout),
                      "udpStreamTimeout": go_duration(ct.udp_stream_timeout)},
        "detectLocalMode": node.detect_local_mode.value,
        "detectLocal": {"bridgeInterface": node.pod_bridge_interface,
                        "interfaceNamePrefix": node.pod_interface_name_prefix},
        "healthzBindAddress": healthz_bind_address,
        "hostnameOverride": node.hostname,
        "iptables": {"masqueradeAll": node.masquerade_all, "masqueradeBit": node.masquerade_bit,
                     "localhostNodePorts": node.localhost_nodeports, **periods},
        "nftables": {"masqueradeAll": node.masquerade_all, "masqueradeBit": node.masquerade_bit, **periods},
        "metricsBindAddress": metrics_bind_address,
        "mode": settings.mode,
        "nodePortAddresses": list(node.nodeport_addresses),
    }
