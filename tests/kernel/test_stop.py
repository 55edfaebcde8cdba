"""SIGTERM ends `kproxy-nft run` within 2 s whatever it is doing, and the kernel keeps whole transactions.

The agent programs a cluster big enough that its first full sync takes seconds; it is told to
stop in the middle of it, and once settled. Either way it must be gone within 2 s, and the
kernel must hold every Service or none (a transaction is committed whole or not sent), and
after the settled stop, all of them (the rules stay in place).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import wait_for
from tests.kernel.conftest import run_in

pytestmark = pytest.mark.kernel
SERVICES = 6000
ENDPOINTS = 5


def cluster(path: Path) -> None:
    """One `kind: List` file: SERVICES Services, each with a slice of ENDPOINTS endpoints."""
    items = []
    for i in range(SERVICES):
        name = f"svc{i}"
        items.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
                      "spec": {"clusterIP": f"10.96.{i // 250}.{i % 250 + 1}",
                               "ports": [{"name": "http", "port": 80}]}})
        items.append({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                      "metadata": {"name": f"{name}-1", "namespace": "default",
                                   "labels": {"kubernetes.io/service-name": name}},
                      "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                      "endpoints": [{"addresses": [f"10.1.{i // 40}.{(i % 40) * ENDPOINTS + j + 1}"]}
                                    for j in range(ENDPOINTS)]})
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))


def programmed(netns: str, mode: str) -> Callable[[], int]:
    """How many Services the kernel holds rules for."""
    if mode == "nftables":
        def count() -> int:
            listing = run_in(netns, ["nft", "list", "map", "ip", "kproxy-nft", "service-ips"]).stdout
            return len(re.findall(r"\. tcp \. 80 :", listing))
    else:
        def count() -> int:
            saved = run_in(netns, ["iptables-nft-save", "-t", "nat"]).stdout
            return len(re.findall(r"^-A KUBE-SERVICES .*-j KUBE-SVC-", saved, re.MULTILINE))
    return count


def settled(count: Callable[[], int]) -> int:
    """The count once a restore our agent left running has finished (it commits on its own)."""
    last = -1
    for _ in range(60):
        now = count()
        if now == last:
            return now
        last = now
        time.sleep(1.0)
    return last


def start(mode: str, netns: str, manifests: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([
        sys.executable, "-c", "from kproxy_nft.cli import main; main()", "run", "--manifests", str(manifests),
        "--netns", netns, "--proxy-mode", mode, "--iptables-backend", "nft", "--hostname-override", "node1",
        "--cluster-cidr", "10.1.0.0/16", "--min-sync-period", "0.1",
        "--metrics-bind-address", "127.0.0.1:0", "--healthz-bind-address", "127.0.0.1:0",
    ], stdout=log.open("w"), stderr=subprocess.STDOUT)


def children(pid: int) -> list[str]:
    """The command names of a process's children (any of its threads')."""
    names = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for kid in kids:
            try:
                names.append(Path(f"/proc/{kid}/comm").read_text().strip())
            except OSError:
                continue
    return names


def stopped_within(agent: subprocess.Popen[bytes], seconds: float) -> float:
    began = time.monotonic()
    agent.send_signal(signal.SIGTERM)
    try:
        agent.wait(timeout=10)
    finally:
        if agent.poll() is None:
            agent.kill()
    took = time.monotonic() - began
    assert took <= seconds, f"SIGTERM → exit took {took:.2f} s"
    return took


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_sigterm_during_the_first_full_sync_and_at_rest(mode: str, netns: str, tmp_path: Path) -> None:
    manifests = tmp_path / "cluster.json"
    cluster(manifests)
    count = programmed(netns, mode)
    log = tmp_path / "agent.log"

    agent = start(mode, netns, manifests, log)
    wait_for(lambda: "kproxy-nft agent:" in log.read_text(), timeout=20)
    if mode == "iptables":  # while iptables-restore has the first sync's payload: a transaction in flight
        wait_for(lambda: "iptables-nft-re" in children(agent.pid), timeout=60, interval=0.01)  # comm: 15 chars
    else:  # converting, compiling or sending (in-process): somewhere in the first sync
        time.sleep(2.5)
    stopped_within(agent, 2.0)
    assert settled(count) in (0, SERVICES), log.read_text()

    agent = start(mode, netns, manifests, log)
    wait_for(lambda: count() == SERVICES, timeout=120)
    wait_for(lambda: "result=ok" in log.read_text(), timeout=60)
    stopped_within(agent, 2.0)
    assert count() == SERVICES  # the rules stay in place
