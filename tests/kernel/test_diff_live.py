"""`kproxy-nft diff` against the real kernel: `--live`, and the offline plan, equal `apply --dry-run`.

In a throwaway namespace holding OLD's rules (applied by `kproxy-nft apply`), three plans of NEW
must agree: `apply --dry-run` (the reference), `diff --live NEW` (the same proxier, reading the
kernel) and `diff OLD NEW` offline (the in-memory node, no kernel). Offline nftables plans list
the elements of one command in the order OLD added them, the kernel in its own: compared with
each command's elements sorted (docs/DIFF.md). The tests/test_diff.py goldens are the OLD and NEW.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.kernel.conftest import run_in
from tests.test_diff import NEW, NODE_FLAGS, OLD

pytestmark = pytest.mark.kernel

RULES_HEADING = re.compile(r"^rules \(.*\), as `apply --dry-run` prints them:\n", re.MULTILINE)


def cli(netns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_in(netns, [sys.executable, "-m", "kproxy_nft.cli", *args])


def rules_part(diff_text: str) -> str:
    """What follows the text report's rules heading: `apply --dry-run`'s output."""
    match = RULES_HEADING.search(diff_text)
    assert match is not None, diff_text
    return diff_text[match.end():]


def elements_sorted(plan: str) -> str:
    """The plan with the elements inside each `{ … }` of an element command sorted."""
    def sort_items(m: re.Match[str]) -> str:
        return "{ " + ", ".join(sorted(m[1].split(", "))) + " }"

    return "\n".join(re.sub(r"\{ (.*) \}", sort_items, line) if " element " in line else line
                     for line in plan.splitlines())


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_live_and_offline_diffs_print_what_apply_dry_run_prints(netns: str, mode: str) -> None:
    flags = [*NODE_FLAGS, "--proxy-mode", mode]
    assert cli(netns, "apply", "-f", OLD, *flags).returncode == 1
    dry_run = cli(netns, "apply", "--dry-run", "-f", NEW, *flags)
    assert dry_run.returncode == 1, dry_run.stderr
    live = cli(netns, "diff", "--live", NEW, *flags)
    assert (live.returncode, live.stderr) == (1, "")
    assert rules_part(live.stdout) == dry_run.stdout
    offline = subprocess.run([sys.executable, "-m", "kproxy_nft.cli", "diff", OLD, NEW, *flags],
                             capture_output=True, text=True, check=False)
    assert offline.returncode == 1, offline.stderr
    assert elements_sorted(rules_part(offline.stdout)) == elements_sorted(dry_run.stdout)


@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_live_diff_of_what_the_kernel_holds_is_empty(netns: str, mode: str) -> None:
    flags = [*NODE_FLAGS, "--proxy-mode", mode]
    assert cli(netns, "apply", "-f", NEW, *flags).returncode == 1
    live = cli(netns, "diff", "--live", NEW, *flags, "-o", "json")
    assert live.returncode == 0, live.stdout + live.stderr
