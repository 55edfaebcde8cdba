"""Kernel tests of kproxy_nft.lab: real namespaces, veths, servers and probes.

They need root and iproute2; the DNAT tests also need iptables-nft-restore.  No NAT rules
are loaded except in the DNAT tests, and only inside the lab's own node namespace.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kproxy_nft.lab import NODE, ClientSpec, Lab, NetlabError, PodSpec, ProbeResult

IP = shutil.which("ip")
IPTABLES_RESTORE = shutil.which("iptables-nft-restore")

kernel = pytest.mark.kernel
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or IP is None,
    reason="netlab needs root and the `ip` command (network namespaces, veth pairs)",
)
needs_iptables = pytest.mark.skipif(IPTABLES_RESTORE is None, reason="iptables-nft-restore not installed")

PODS = (
    PodSpec("pod1", "10.1.0.47", tcp_ports=(80,), udp_ports=(53,)),
    PodSpec("pod2", "10.1.0.48"),
    PodSpec("pod3", "10.1.0.49"),
)
CLIENTS = (ClientSpec("testpod", "10.1.0.50"), ClientSpec("ext", "192.168.100.2"))
VIP = "10.96.0.10"


def netns_names() -> set[str]:
    assert IP is not None
    out = subprocess.run([IP, "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def netns_inodes(names: tuple[str, ...]) -> set[int]:
    return {os.stat(f"/var/run/netns/{name}").st_ino for name in names}


def procs_in(inodes: set[int]) -> list[int]:
    """PIDs of processes living in any of the namespaces with these inodes."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.stat(entry / "ns" / "net").st_ino in inodes:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0 or IP is None:
        pytest.skip("netlab needs root and the `ip` command")
    with Lab(PODS, CLIENTS) as the_lab:
        the_lab.start_servers()
        yield the_lab


# ------------------------------------------------------------------ no kernel needed
def test_probe_result_helpers() -> None:
    doc = (
        '{"target": "10.96.0.10:80", "proto": "tcp", "attempts": ['
        '{"pod": "a", "seen_ip": "10.1.0.50", "seen_port": 1, "error": null},'
        '{"pod": "a", "seen_ip": "10.1.0.50", "seen_port": 2, "error": null},'
        '{"pod": null, "error": "timeout", "detail": "timed out", "elapsed": 1.0}]}'
    )
    res = ProbeResult.from_json(doc)
    assert res.counts() == {"a": 2}
    assert res.error_counts() == {"timeout": 1}
    assert [a.error for a in res.failures] == ["timeout"]
    assert not res.ok and len(res) == 3
    assert res.seen_ips() == {"10.1.0.50"}


def test_spec_validation() -> None:
    with pytest.raises(ValueError):
        PodSpec("Bad_Name", "10.1.0.2")
    with pytest.raises(ValueError):
        PodSpec("node", "10.1.0.2")
    with pytest.raises(ValueError):
        PodSpec("p", "fd00::1")
    with pytest.raises(ValueError):
        Lab([PodSpec("a", "10.1.0.2"), PodSpec("a", "10.1.0.3")])
    with pytest.raises(ValueError):
        Lab([PodSpec("a", "10.1.0.1")])  # the pod gateway address
    with pytest.raises(ValueError):
        Lab([PodSpec("a", "172.16.0.2")])  # pods live in the cluster CIDR


# ---------------------------------------------------------------- kernel: plain routing
@kernel
@needs_root
def test_topology_names(lab: Lab) -> None:
    assert all(ns.startswith(f"kpn-{lab.run_id}-") for ns in lab.namespaces)
    assert set(lab.namespaces) <= netns_names()
    assert lab.node_ips == ("192.168.100.1", "10.1.0.1")
    assert all(len(att.node_ifname) <= 15 for att in lab.attachments.values())
    links = lab.run_in(lab.node_ns, ["ip", "-o", "link"]).stdout
    assert lab.node_ifname("pod1") in links


@kernel
@needs_root
def test_pod_client_reaches_pod(lab: Lab) -> None:
    res = lab.probe("testpod", "10.1.0.47", 80, count=3)
    assert res.ok, res.summary()
    assert res.counts() == {"pod1": 3}
    assert res.seen_ips() == {"10.1.0.50"}


@kernel
@needs_root
def test_external_client_and_pod_to_pod(lab: Lab) -> None:
    res = lab.probe("ext", "10.1.0.48", 80, count=2)
    assert res.counts() == {"pod2": 2} and res.seen_ips() == {"192.168.100.2"}
    res = lab.probe("pod3", "10.1.0.48", 80)
    assert res.counts() == {"pod2": 1} and res.seen_ips() == {"10.1.0.49"}


@kernel
@needs_root
def test_node_reaches_pod(lab: Lab) -> None:
    res = lab.probe(NODE, "10.1.0.49", 80)
    assert res.counts() == {"pod3": 1}
    assert res.seen_ips() == {"10.1.0.1"}  # route src on the pod veth


@kernel
@needs_root
def test_refused_is_fast(lab: Lab) -> None:
    res = lab.probe("testpod", "10.1.0.47", 81, count=3, timeout=2.0)
    assert res.error_counts() == {"refused": 3}
    assert max(a.elapsed for a in res.attempts) < 0.5


@kernel
@needs_root
def test_udp(lab: Lab) -> None:
    res = lab.probe("ext", "10.1.0.47", 53, count=3, proto="udp")
    assert res.counts() == {"pod1": 3} and res.seen_ips() == {"192.168.100.2"}
    # ICMP port unreachable, not rate limited (icmp_ratelimit=0 in the lab)
    res = lab.probe("testpod", "10.1.0.47", 54, count=10, proto="udp", timeout=2.0)
    assert res.error_counts() == {"refused": 10}
    assert max(a.elapsed for a in res.attempts) < 0.5


@kernel
@needs_root
def test_service_ip_without_rules_times_out(lab: Lab) -> None:
    res = lab.probe("testpod", VIP, 8080, count=1, timeout=0.3)
    assert res.error_counts() == {"timeout": 1}


@kernel
@needs_root
def test_source_port_and_curl_compatible_answer(lab: Lab) -> None:
    res = lab.probe("ext", "10.1.0.47", 80, count=2, source_port=40123)
    assert res.counts() == {"pod1": 2}
    assert {a.seen_port for a in res.attempts} == {40123}


@kernel
@needs_root
def test_probe_loop(lab: Lab) -> None:
    loop = lab.start_probe_loop("testpod", "10.1.0.48", 80, timeout=1.0)
    time.sleep(0.3)
    res = loop.stop()
    assert len(res) >= 5 and res.ok, res.summary()
    assert res.counts() == {"pod2": len(res)}
    assert loop.stop() is res


@kernel
@needs_root
def test_stop_server_then_refused(lab: Lab) -> None:
    with Lab([PodSpec("solo", "10.1.0.9")], [ClientSpec("c", "10.1.0.10")]) as lab2:
        lab2.start_servers()
        assert lab2.probe("c", "10.1.0.9", 80).counts() == {"solo": 1}
        lab2.stop_server("solo")
        assert lab2.probe("c", "10.1.0.9", 80).error_counts() == {"refused": 1}


@kernel
@needs_root
def test_run_in_refuses_foreign_namespace(lab: Lab) -> None:
    with pytest.raises(KeyError):
        lab.run_in("kpn-someone-else", ["true"])


# --------------------------------------------------------------------- kernel: cleanup
@kernel
@needs_root
def test_cleanup_on_exit_and_on_exception() -> None:
    with Lab([PodSpec("p", "10.1.0.2")], [ClientSpec("c", "192.168.100.2")]) as lab:
        names = lab.namespaces
        inodes = netns_inodes(names)
        lab.start_servers()
        lab.start_probe_loop("c", "10.1.0.2", 80)
        assert set(names) <= netns_names()
        assert procs_in(inodes)
    assert not set(names) & netns_names()
    assert procs_in(inodes) == []

    with pytest.raises(RuntimeError, match="boom"), Lab([PodSpec("p", "10.1.0.2")]) as lab:
        names = lab.namespaces
        inodes = netns_inodes(names)
        lab.start_servers()
        raise RuntimeError("boom")
    assert not set(names) & netns_names()
    assert procs_in(inodes) == []


@kernel
@needs_root
def test_cleanup_when_setup_is_interrupted() -> None:
    class Interrupted(Lab):
        def _build(self) -> None:
            super()._build()
            raise KeyboardInterrupt

    lab = Interrupted([PodSpec("p", "10.1.0.2")])
    with pytest.raises(KeyboardInterrupt), lab:
        pass
    assert not set(lab.namespaces) & netns_names()


@kernel
@needs_root
def test_server_start_failure_is_reported_and_cleaned() -> None:
    with pytest.raises(NetlabError, match="not ready"), Lab([PodSpec("p", "10.1.0.2", tcp_ports=(80, 80))]) as lab:
        lab.start_servers()
    assert not set(lab.namespaces) & netns_names()


# ------------------------------------------------------------------------ kernel: DNAT
DNAT_RULES = f"""*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
-A PREROUTING -d {VIP}/32 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.1.0.47:80
-A OUTPUT -d {VIP}/32 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.1.0.47:80
-A POSTROUTING -s 10.1.0.47/32 -d 10.1.0.47/32 -j MASQUERADE
COMMIT
"""


@kernel
@needs_root
@needs_iptables
def test_dnat_prerouting_output_and_hairpin() -> None:
    assert IPTABLES_RESTORE is not None
    with Lab(PODS, CLIENTS) as lab:
        lab.start_servers()
        assert lab.probe("testpod", VIP, 8080, timeout=0.3).error_counts() == {"timeout": 1}
        lab.run_in(lab.node_ns, [IPTABLES_RESTORE], input=DNAT_RULES)

        res = lab.probe("testpod", VIP, 8080, count=3)  # nat PREROUTING
        assert res.counts() == {"pod1": 3} and res.seen_ips() == {"10.1.0.50"}
        res = lab.probe("ext", VIP, 8080, count=2)
        assert res.counts() == {"pod1": 2} and res.seen_ips() == {"192.168.100.2"}
        res = lab.probe(NODE, VIP, 8080, count=2)  # locally generated: nat OUTPUT
        assert res.counts() == {"pod1": 2}
        assert res.seen_ips() == {"192.168.100.1"} and res.seen_ips() <= set(lab.node_ips)
        res = lab.probe("pod1", VIP, 8080, count=2)  # hairpin back into the same pod, masqueraded
        assert res.counts() == {"pod1": 2} and res.seen_ips() == {"10.1.0.1"}
        res = lab.probe("testpod", VIP, 8081, timeout=0.3)  # not DNATed: lost upstream
        assert res.error_counts() == {"timeout": 1}
