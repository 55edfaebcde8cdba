"""The conntrack node setup in a real kernel, inside a throwaway `kpn-…` namespace only.

The timeouts and tcp_be_liberal are per network namespace: they are set in the test's own
namespace, and the host's values are read before and after to show they did not move.
nf_conntrack_max and the hash size are global; outside the initial namespace the kernel makes
nf_conntrack_max read-only (mode 0444, EACCES even for root), which is the real "cannot be
written" case: a warning and a metric for the agent, exit 1 for `run --init-only`. The hash
size is never attempted after that (the writer only writes it once the maximum is set, as
kube-proxy does), and the tests check first that the maximum is read-only here, so that
nothing global is ever written.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kproxy_nft.agent.metrics import new_metrics
from kproxy_nft.agent.node_setup import setup_node
from kproxy_nft.kernel.sysctl import Status
from kproxy_nft.model import ConntrackSettings
from tests.kernel.conftest import run_in

pytestmark = pytest.mark.kernel

HOST_NETFILTER = Path("/proc/sys/net/netfilter")
PER_NAMESPACE = {  # sysctl → the value the test sets (none of them the kernel's default)
    "net.netfilter.nf_conntrack_tcp_timeout_established": 7200,
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait": 1800,
    "net.netfilter.nf_conntrack_tcp_be_liberal": 1,
    "net.netfilter.nf_conntrack_udp_timeout": 45,
    "net.netfilter.nf_conntrack_udp_timeout_stream": 150,
}
SETTINGS = ConntrackSettings(max_per_core=0, tcp_established_timeout=7200, tcp_close_wait_timeout=1800,
                             tcp_be_liberal=True, udp_timeout=45, udp_stream_timeout=150)
CLI = [sys.executable, "-c", "from kproxy_nft.cli import main; main()"]


def in_namespace(netns: str, name: str) -> int:
    return int(run_in(netns, ["sysctl", "-n", name]).stdout)


def on_host() -> dict[str, str]:
    """Every conntrack value of the root namespace (read only)."""
    return {path.name: path.read_text() for path in HOST_NETFILTER.glob("nf_conntrack_*")
            if path.name != "nf_conntrack_count"}


@pytest.fixture
def conntrack_netns(netns: str) -> str:
    """The test's namespace, where nf_conntrack has its sysctls and the maximum is read-only."""
    listing = run_in(netns, ["ls", "-l", "/proc/sys/net/netfilter/nf_conntrack_max"])
    if listing.returncode != 0:
        pytest.skip("nf_conntrack is not loaded: no conntrack sysctls")
    if not listing.stdout.startswith("-r--r--r--"):
        pytest.skip("this kernel lets a namespace write nf_conntrack_max: the hash size would be next")
    return netns


def test_per_namespace_settings_are_made_in_the_namespace(conntrack_netns: str) -> None:
    host = on_host()
    outcomes = setup_node(SETTINGS, netns=conntrack_netns)
    assert [o.status for o in outcomes] == [Status.SET] * len(PER_NAMESPACE)
    assert {name: in_namespace(conntrack_netns, name) for name in PER_NAMESPACE} == PER_NAMESPACE
    assert on_host() == host
    # A second start finds them made and writes nothing (kube-proxy compares first, too).
    assert {o.status for o in setup_node(SETTINGS, netns=conntrack_netns)} == {Status.UNCHANGED}


def test_a_read_only_maximum_is_a_warning_and_a_metric(conntrack_netns: str) -> None:
    host = on_host()
    metrics = new_metrics()
    outcomes = setup_node(ConntrackSettings(), metrics, netns=conntrack_netns)
    statuses = {o.write.name: o.status for o in outcomes}
    assert statuses["net.netfilter.nf_conntrack_max"] is Status.FAILED
    assert statuses["nf_conntrack hashsize"] is Status.SKIPPED
    assert "Permission denied" in outcomes[0].error
    assert metrics.registry.get_sample_value("kproxy_nft_sysctl_failures_total",
                                             {"name": "net.netfilter.nf_conntrack_max"}) == 1.0
    # The rest is made all the same: the default timeouts, in the namespace.
    assert in_namespace(conntrack_netns, "net.netfilter.nf_conntrack_tcp_timeout_established") == 86400
    assert on_host() == host


def test_init_only_exits_1_when_a_setting_cannot_be_made(conntrack_netns: str) -> None:
    """In the namespace (as in a container with a read-only /proc/sys): the defaults include
    nf_conntrack_max, which cannot be written there."""
    host = on_host()
    result = run_in(conntrack_netns, [*CLI, "run", "--init-only"])
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("kproxy-nft: error: init-only: 1 node setting(s) could not be made: "
                           "cannot set net.netfilter.nf_conntrack_max to "), last
    assert on_host() == host


def test_init_only_makes_the_settings_and_exits_0(conntrack_netns: str) -> None:
    flags = ["--conntrack-max-per-core", "0", "--conntrack-tcp-timeout-established", "2h",
             "--conntrack-tcp-timeout-close-wait", "30m", "--conntrack-tcp-be-liberal",
             "--conntrack-udp-timeout", "45s", "--conntrack-udp-timeout-stream", "2m30s"]
    host = on_host()
    result = subprocess.run([*CLI, "run", "--init-only", "--netns", conntrack_netns, *flags],
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert {name: in_namespace(conntrack_netns, name) for name in PER_NAMESPACE} == PER_NAMESPACE
    assert on_host() == host
