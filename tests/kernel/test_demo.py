"""`kproxy-nft demo` replays the seed end to end and leaves nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from kproxy_nft.lab import demo

pytestmark = pytest.mark.kernel


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.mark.parametrize("options", [["--backend", "nft"], ["--backend", "legacy"], ["--proxy-mode", "nftables"]],
                         ids=["iptables-nft", "iptables-legacy", "nftables"])
def test_demo_reaches_every_pod_through_every_service_port(options: list[str]) -> None:
    before = namespaces()
    argv = [sys.executable, "-m", "kproxy_nft.cli", "demo", "-n", "30", *options]
    env = {**os.environ, "COLUMNS": "200"}  # rich wraps to the terminal width; keep pod names whole
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for pod in ("sample-deployment-6cd85bd5f-svmhh", "sample-deployment-6cd85bd5f-wm7vv",
                "sample-deployment-6cd85bd5f-jq2wc"):
        assert out.count(pod) == 4  # one bar per service port, one row of the kernel's counters
    assert_counters_agree_with_the_tally(out)
    for vip in ("10.101.181.214:8080", "10.102.199.133:8080", "10.102.199.133:8443"):
        assert vip in out
    assert "from testpod 10.1.0.50" in out and "from outside 10.1.0.1" in out
    # The seed's 6.2.2: short names through the search list, and dig's SRV answer, via kube-dns.
    assert "curl http://sample-clusterip-multi:8080 → sample-clusterip-multi.default.svc.cluster.local. A" in out
    assert "SRV 0 100 8443 sample-clusterip-multi.default.svc.cluster.local." in out
    assert "sample-clusterip-multi.default.svc.cluster.local. 5 IN A 10.102.199.133" in out
    assert "0 failures" in out
    assert namespaces() - before == set()  # nothing of the demo is left (others may come and go)


def assert_counters_agree_with_the_tally(out: str) -> None:
    """The trace of testpod → 10.101.181.214:8080 is shown, and the kernel's per-endpoint counts
    for it equal the GETs each pod answered, in the demo's own answer table."""
    assert "trace (kproxy-nft trace --live --src 10.1.0.50 --dst 10.101.181.214:8080)" in out
    assert "verdict: dnat" in out
    tally = re.search(r"sample-clusterip:http-port\s*│\s*10\.101\.181\.214:8080\s*│\s*(\d+)\s*│\s*(\d+)\s*│\s*(\d+)",
                      out)
    assert tally is not None, out
    counted = re.findall(r"│ sample-deployment-\S+\s*│ (10\.1\.0\.4[789])\s*│\s*(\d+)\s*│\s*(\d+)\s*│", out)
    assert [ip for ip, _, _ in counted] == ["10.1.0.47", "10.1.0.48", "10.1.0.49"], out
    assert [int(kernel) for _, kernel, _ in counted] == [int(n) for n in tally.groups()]
    assert all(kernel == answered for _, kernel, answered in counted)
    assert "the kernel's counters agree with the pods' answers" in out


def test_demo_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo.os, "geteuid", lambda: 1000)
    with pytest.raises(demo.DemoError, match="run it as root"):
        demo.preflight(("iptables-nft-restore", "iptables-nft-save"))
    monkeypatch.setattr(demo.os, "geteuid", lambda: 0)
    monkeypatch.setattr(demo.shutil, "which", lambda tool: None if tool == "iptables-nft-restore" else "/bin/x")
    with pytest.raises(demo.DemoError, match="missing iptables-nft-restore"):
        demo.preflight(("iptables-nft-restore", "iptables-nft-save"))
