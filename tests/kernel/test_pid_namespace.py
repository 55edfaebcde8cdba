"""The drift monitor in a pid namespace of its own (a container without hostPID), for real.

nf_tables names the process behind each commit by its pid in the host's pid namespace; in a pid
namespace of its own the agent could not recognise its own commits, so `NftMonitor` refuses
there and the agent probes canaries instead (`in_host_pid_namespace`). The unit tests fake that
answer; these ask the kernel, through `unshare --pid --fork --mount-proc` (a pid and a mount
namespace that end with the process; nothing of the host's is changed).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.kernel

PROBE = """
import sys
from kproxy_nft.kernel.nft_monitor import NftMonitor, in_host_pid_namespace
from kproxy_nft.kernel.nftables_events import Interest
print(in_host_pid_namespace())
try:
    NftMonitor(sys.argv[1], Interest(), lambda tables, chains: None)
except OSError as e:
    print("refused:", e)
else:
    print("monitoring")
"""


def probe(netns: str, *prefix: str) -> list[str]:
    """What a process sees, started under `prefix`, its monitor listening in `netns`."""
    done = subprocess.run([*prefix, sys.executable, "-c", PROBE, netns], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_in_a_pid_namespace_of_its_own_the_monitor_refuses(netns: str) -> None:
    answer, outcome = probe(netns, "unshare", "--pid", "--fork", "--mount-proc")
    assert answer == "False"
    assert outcome.startswith("refused:") and "hostPID" in outcome


def test_in_the_hosts_pid_namespace_it_monitors(netns: str) -> None:
    assert probe(netns) == ["True", "monitoring"]
