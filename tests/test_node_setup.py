"""Node setup kube-proxy does (issue 15, item 6): the conntrack settings, their flags and config
fields with kube-proxy's names and defaults, what is computed from them, and the writer against
a fake /proc/sys and /sys tree (nf_conntrack_max and the hash size are global: never the host's
here). tests/kernel/test_node_setup.py makes the per-namespace ones in a kpn- namespace."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from kproxy_nft.agent.metrics import new_metrics
from kproxy_nft.agent.node_setup import failed, setup_node
from kproxy_nft.cli import main
from kproxy_nft.config import (
    ConfigError,
    ConntrackOverrides,
    Overrides,
    configz,
    load_config_file,
    parse_go_duration,
    resolve,
)
from kproxy_nft.kernel.sysctl import HASHSIZE, NETFILTER, Status, conntrack_max, conntrack_writes
from kproxy_nft.model import ConntrackSettings

HEADER = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
NAMES = ("nf_conntrack_max", "nf_conntrack_tcp_timeout_established", "nf_conntrack_tcp_timeout_close_wait",
         "nf_conntrack_tcp_be_liberal", "nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream")


def resolved(tmp_path: Path, body: str = "", flags: ConntrackOverrides | None = None) -> ConntrackSettings:
    path = tmp_path / "kube-proxy.yaml"
    path.write_text(HEADER + body)
    return resolve(load_config_file(str(path)), Overrides(conntrack=flags or ConntrackOverrides()), "h").conntrack


# -- settings -------------------------------------------------------------------------------------


def test_kube_proxys_defaults(tmp_path: Path) -> None:
    """pkg/proxy/apis/config/v1alpha1/defaults.go: 32768 per core, at least 131072, 24h, 1h;
    tcpBeLiberal false and the UDP timeouts 0 (left alone)."""
    assert resolved(tmp_path) == ConntrackSettings(32768, 131072, 86400.0, 3600.0, False, 0.0, 0.0)
    assert resolved(tmp_path, "conntrack: {maxPerCore: null, tcpEstablishedTimeout: null}\n") == ConntrackSettings()


def test_config_fields_and_flags(tmp_path: Path) -> None:
    body = ("conntrack:\n  maxPerCore: 0\n  min: 1000\n  tcpEstablishedTimeout: 2h30m0s\n  tcpCloseWaitTimeout: 0s\n"
            "  tcpBeLiberal: true\n  udpTimeout: 30s\n  udpStreamTimeout: 5m\n")
    assert resolved(tmp_path, body) == ConntrackSettings(0, 1000, 9000.0, 0.0, True, 30.0, 300.0)
    flags = ConntrackOverrides(max_per_core=10, tcp_timeout_established=60.0, tcp_be_liberal=False, udp_timeout=0.0)
    assert resolved(tmp_path, body, flags) == ConntrackSettings(10, 1000, 60.0, 0.0, False, 0.0, 300.0)


@pytest.mark.parametrize(("body", "message"), [
    ("conntrack: {maxPerCore: -1}\n", "conntrack.maxPerCore: must be an integer >= 0, got -1"),
    ("conntrack: {min: lots}\n", "conntrack.min: must be an integer >= 0"),
    ("conntrack: {tcpEstablishedTimeout: -1s}\n", "tcpEstablishedTimeout: must be greater than or equal to 0"),
    ("conntrack: {udpTimeout: 30}\n", "conntrack.udpTimeout: expected a duration such as 24h0m0s, got 30"),
    ("conntrack: {udpStreamTimeout: 1 day}\n", "conntrack.udpStreamTimeout: '1 day' is not a duration"),
    ("conntrack: {tcpBeLiberal: yes please}\n", "conntrack.tcpBeLiberal: expected true or false"),
    ("conntrack: [1]\n", "conntrack: expected a mapping"),
])
def test_bad_values_name_the_field(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolved(tmp_path, body)


@pytest.mark.parametrize(("text", "seconds"), [
    ("24h0m0s", 86400.0), ("1h", 3600.0), ("90s", 90.0), ("1.5m", 90.0), ("500ms", 0.5), ("0", 0.0), ("0s", 0.0),
    ("1h30m", 5400.0), ("-1s", -1.0),
])
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1", "1d", "h", "1h 2m", "1.2.3s"])
def test_not_go_durations(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_go_duration(text)


def test_configz_shows_the_conntrack_settings() -> None:
    settings = resolve(None, Overrides(conntrack=ConntrackOverrides(tcp_be_liberal=True, udp_timeout=30.0)), "h")
    shown = configz(settings, kubeconfig=None, metrics_bind_address="127.0.0.1:10249",
                    healthz_bind_address="0.0.0.0:10256", sync_period=30, min_sync_period=1)
    assert shown["kubeproxy.config.k8s.io"]["Linux"]["Conntrack"] == {
        "MaxPerCore": 32768, "Min": 131072, "TCPEstablishedTimeout": "24h0m0s", "TCPCloseWaitTimeout": "1h0m0s",
        "TCPBeLiberal": True, "UDPTimeout": "30s", "UDPStreamTimeout": "0s"}


# -- what to set -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("per_core", "minimum", "cpus", "expected"), [
    (32768, 131072, 2, 131072),  # the floor wins on a small node
    (32768, 131072, 16, 524288),
    (32768, 0, 1, 32768),
    (0, 131072, 64, 0),  # 0: leave the limit, and ignore the minimum
])
def test_conntrack_max_is_kube_proxys(per_core: int, minimum: int, cpus: int, expected: int) -> None:
    assert conntrack_max(ConntrackSettings(max_per_core=per_core, min=minimum), cpus) == expected


def test_the_writes_and_their_order() -> None:
    writes = conntrack_writes(ConntrackSettings(), cpus=8)
    assert [(w.name, w.value) for w in writes] == [
        ("net.netfilter.nf_conntrack_max", 262144), ("nf_conntrack hashsize", 65536),
        ("net.netfilter.nf_conntrack_tcp_timeout_established", 86400),
        ("net.netfilter.nf_conntrack_tcp_timeout_close_wait", 3600)]
    everything = ConntrackSettings(0, 0, 0.0, 0.0, True, 30.0, 300.0)
    assert [(w.name, w.value) for w in conntrack_writes(everything, cpus=8)] == [
        ("net.netfilter.nf_conntrack_tcp_be_liberal", 1), ("net.netfilter.nf_conntrack_udp_timeout", 30),
        ("net.netfilter.nf_conntrack_udp_timeout_stream", 300)]
    assert conntrack_writes(ConntrackSettings(0, 0, 0.0, 0.0, False, 0.0, 0.0), cpus=8) == ()


# -- the writer, on a fake tree ---------------------------------------------------------------------


def fake_root(tmp_path: Path, hashsize: int = 16384, **values: int) -> Path:
    """A /proc/sys/net/netfilter and the nf_conntrack hashsize parameter, as files."""
    netfilter = tmp_path / NETFILTER
    netfilter.mkdir(parents=True)
    defaults = dict.fromkeys(NAMES, 0) | {"nf_conntrack_max": 65536, "nf_conntrack_tcp_timeout_established": 432000}
    for name, value in (defaults | values).items():
        (netfilter / name).write_text(f"{value}\n")
    (tmp_path / HASHSIZE).parent.mkdir(parents=True)
    (tmp_path / HASHSIZE).write_text(f"{hashsize}\n")
    return tmp_path


def read(root: Path, name: str) -> int:
    return int((root / (HASHSIZE if name == "hashsize" else f"{NETFILTER}/{name}")).read_text())


def test_sets_what_differs_and_leaves_the_rest(tmp_path: Path) -> None:
    root = fake_root(tmp_path, nf_conntrack_tcp_timeout_close_wait=3600)
    outcomes = setup_node(ConntrackSettings(), root=root, cpus=2)
    assert [o.status for o in outcomes] == [Status.SET, Status.SET, Status.SET, Status.UNCHANGED]
    assert (read(root, "nf_conntrack_max"), read(root, "hashsize")) == (131072, 32768)
    assert read(root, "nf_conntrack_tcp_timeout_established") == 86400
    assert not failed(outcomes)


def test_the_hash_size_is_only_ever_raised(tmp_path: Path) -> None:
    """kube-proxy writes it only when below max/4: a bigger table set by the admin stays."""
    root = fake_root(tmp_path, hashsize=262144)
    outcomes = setup_node(ConntrackSettings(), root=root, cpus=2)
    assert outcomes[1].status is Status.UNCHANGED and read(root, "hashsize") == 262144


def test_a_setting_that_cannot_be_written_is_a_warning_and_a_metric(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = fake_root(tmp_path)
    # The kernel refuses nf_conntrack_max outside the initial network namespace (EACCES); here a
    # directory in its place refuses the write the same way, as an OSError.
    (root / NETFILTER / "nf_conntrack_max").unlink()
    (root / NETFILTER / "nf_conntrack_max").mkdir()
    metrics = new_metrics()
    with caplog.at_level(logging.WARNING, logger="kproxy_nft.agent"):
        outcomes = setup_node(ConntrackSettings(), metrics, root=root, cpus=2)
    assert [o.status for o in outcomes] == [Status.FAILED, Status.SKIPPED, Status.SET, Status.SET]
    assert read(root, "hashsize") == 16384  # never touched without its maximum
    assert [o.write.name for o in failed(outcomes)] == ["net.netfilter.nf_conntrack_max"]
    value = metrics.registry.get_sample_value("kproxy_nft_sysctl_failures_total",
                                              {"name": "net.netfilter.nf_conntrack_max"})
    assert value == 1.0
    assert any("cannot" in r.message and "nf_conntrack_max" in r.message for r in caplog.records)


def test_write_config_to_round_trips_through_config(tmp_path: Path) -> None:
    """`run --write-config-to FILE` writes the effective settings and exits; `--config FILE`
    reads them back to the same settings (kube-proxy's writeConfigFile)."""
    path = tmp_path / "out.yaml"
    flags = ["--proxy-mode", "nftables", "--hostname-override", "node-1", "--node-ip", "192.168.100.1",
             "--cluster-cidr", "10.1.0.0/16,fd00:1::/64", "--masquerade-all", "--detect-local-mode",
             "InterfaceNamePrefix", "--pod-interface-name-prefix", "veth", "--conntrack-min", "1000",
             "--conntrack-tcp-timeout-established", "2h", "--conntrack-tcp-be-liberal",
             "--conntrack-udp-timeout-stream", "3m"]
    result = CliRunner().invoke(main, ["run", *flags, "--write-config-to", str(path)])
    assert result.exit_code == 0, result.output
    written = resolve(load_config_file(str(path)), Overrides(), "other")
    expected = resolve(None, Overrides(
        mode="nftables", hostname="node-1", node_ips=("192.168.100.1",), cluster_cidrs=("10.1.0.0/16", "fd00:1::/64"),
        masquerade_all=True, detect_local_mode="InterfaceNamePrefix", pod_interface_name_prefix="veth",
        conntrack=ConntrackOverrides(min=1000, tcp_timeout_established=7200.0, tcp_be_liberal=True,
                                     udp_timeout_stream=180.0)), "other")
    assert written == expected


def test_a_bad_duration_flag_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["run", "--conntrack-udp-timeout", "soon", "--write-config-to", "/dev/null"])
    assert result.exit_code == 2 and "'soon' is not a duration" in result.stderr
