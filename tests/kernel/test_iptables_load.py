"""The compiler's output loads as is with iptables-restore, with both iptables backends."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kproxy_nft.compile.iptables import compile_ruleset, render_restore
from kproxy_nft.lab.synthetic import synthetic_cluster
from kproxy_nft.model import NodeContext
from tests.helpers import EXAMPLES, SEED_CONFIG
from tests.kernel.conftest import BACKENDS, run_in

pytestmark = pytest.mark.kernel


def examples_dump() -> str:
    return subprocess.run(
        [sys.executable, "-m", "kproxy_nft.cli", "dump", "-f", str(EXAMPLES), "--config", str(SEED_CONFIG)],
        capture_output=True, text=True, check=True,
    ).stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_examples_dump_loads(netns: str, backend: str) -> None:
    text = examples_dump()
    result = run_in(netns, [f"iptables-{backend}-restore"], text)
    assert result.returncode == 0, result.stderr
    saved = run_in(netns, [f"iptables-{backend}-save", "-t", "nat"]).stdout
    # Every chain we declared is in the kernel, and the DNATs to the seed's pods are there.
    declared = {line[1:].split()[0] for line in text.split("*nat", 1)[1].splitlines() if line.startswith(":")}
    assert declared <= {line[1:].split()[0] for line in saved.splitlines() if line.startswith(":")}
    assert saved.count("-j DNAT --to-destination 10.1.0.4") == 9


@pytest.mark.parametrize("backend", BACKENDS)
def test_generated_thousand_service_cluster_loads(netns: str, backend: str) -> None:
    state = synthetic_cluster(1000, 5)
    text = render_restore(compile_ruleset(state, NodeContext(cluster_cidrs=("10.128.0.0/9",))))
    result = run_in(netns, [f"iptables-{backend}-restore"], text)
    assert result.returncode == 0, result.stderr
    saved = run_in(netns, [f"iptables-{backend}-save", "-t", "nat"]).stdout
    assert sum(1 for line in saved.splitlines() if line.startswith(":KUBE-SEP-")) == 5000
    assert sum(1 for line in saved.splitlines() if line.startswith(":KUBE-SVC-")) == 1000
