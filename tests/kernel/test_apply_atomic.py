"""`apply` is all or nothing across IPv4 and IPv6, against the real kernel, with both iptables backends.

iptables-restore commits one family at a time, so when IPv6 fails after IPv4 committed,
`apply_families` reverts IPv4. Proved here in throwaway `kpn-` namespaces (deleted even when a
test fails): `iptables-save` and `ip6tables-save` print the same, byte for byte (their `#`
comment lines aside), before and after an apply whose IPv6 half fails:

* in-process, through the kernel layer, with IPv6 failing for three real reasons: another
  writer made a chain we are about to delete busy between plan and apply (the real binary,
  the real kernel refusal), a rule the kernel refuses at commit, and one `--test` refuses;
* end to end, `kproxy-nft apply` run in the namespace with an `ip6tables-<backend>-restore`
  first in PATH that passes `--test` runs to the real tool and refuses every commit: exit
  status 2 and one line on stderr.

And the nftables mode's `apply`: both families are one transaction, so a transaction that
fails in its `ip6` part leaves `nft list ruleset` as it was.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kproxy_nft.compile.iptables import Ruleset, compile_ruleset
from kproxy_nft.compile.nftables import compile_all
from kproxy_nft.kernel.iptables import (
    Host,
    IptablesBackend,
    Plan,
    RestoreError,
    apply_families,
    plan,
    read_state,
    tool_name,
)
from kproxy_nft.kernel.iptables_plan import ChainChangeKind
from kproxy_nft.kernel.nftables import NftablesBackend, NftablesError
from kproxy_nft.model import IPFamily
from tests.helpers import write_dual_stack_web
from tests.kernel.conftest import BACKENDS, run_in
from tests.kernel.test_iptables_apply import FOREIGN, restore, saved
from tests.test_reconcile import NODE, inject, sample_state

pytestmark = pytest.mark.kernel

FAMILIES = (IPFamily.V4, IPFamily.V6)


def both_saved(netns: str, backend: str) -> dict[IPFamily, str]:
    """iptables-save and ip6tables-save output, every table, without the `#` comment lines."""
    return {family: saved(netns, backend, family) for family in FAMILIES}


def rulesets(services: int) -> list[Ruleset]:
    """The first `services` sample services (dual-stack), compiled for each family."""
    return [compile_ruleset(sample_state(services=services), NODE, family) for family in FAMILIES]


def apply_both(host: Host, desired: list[Ruleset]) -> None:
    apply_families(host, [plan(rules, read_state(host, rules.family)) for rules in desired])


# ---------------------------------------------------------------------------------------------
# in-process: the kernel layer
# ---------------------------------------------------------------------------------------------


def busy_chain(netns: str, backend: str, plans: list[Plan]) -> list[Plan]:
    """Another writer, between plan and apply, jumps to a chain the IPv6 plan deletes."""
    (v6,) = [p for p in plans if p.family is IPFamily.V6]
    doomed = sorted(c.chain for c in v6.chains if c.kind is ChainChangeKind.DELETED and c.table == "nat")
    assert doomed, v6.payload
    restore(netns, backend, IPFamily.V6, f"*nat\n-A FOREIGN -j {doomed[0]}\nCOMMIT\n")
    return plans


def kernel_refusal(netns: str, backend: str, plans: list[Plan]) -> list[Plan]:
    """A rule every parser accepts and the kernel refuses (DNAT on the POSTROUTING path)."""
    return [inject(p, "nat", "-A KUBE-POSTROUTING -j DNAT --to-destination fd00::9") if p.family is IPFamily.V6
            else p for p in plans]


def parse_error(netns: str, backend: str, plans: list[Plan]) -> list[Plan]:
    """A rule `--test` refuses, in the second table of the IPv6 payload."""
    return [inject(p, "filter", "-A KUBE-FORWARD -m no-such-match --foo -j RETURN") if p.family is IPFamily.V6
            else p for p in plans]


FAILURES = {"busy-chain": busy_chain, "kernel-refusal": kernel_refusal, "parse-error": parse_error}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_ipv4_is_reverted_when_ipv6_fails(netns: str, backend: str, failure: str) -> None:
    for family in FAMILIES:
        restore(netns, backend, family, FOREIGN[family])
    host = Host(IptablesBackend(backend), netns)
    apply_both(host, rulesets(3))
    plans = [plan(rules, read_state(host, rules.family)) for rules in rulesets(2)]  # one service goes
    assert all(not p.is_empty for p in plans)
    plans = FAILURES[failure](netns, backend, plans)
    before = both_saved(netns, backend)
    with pytest.raises(RestoreError) as caught:
        apply_families(host, plans)
    assert both_saved(netns, backend) == before
    error = caught.value
    assert error.tool == tool_name(IptablesBackend(backend), IPFamily.V6, "restore")
    assert error.kernel_unchanged, str(error)
    assert "IPv4 reverted" in str(error) and "\n" not in str(error)


@pytest.mark.parametrize("backend", BACKENDS)
def test_both_families_apply_when_nothing_fails(netns: str, backend: str) -> None:
    host = Host(IptablesBackend(backend), netns)
    apply_both(host, rulesets(3))
    apply_both(host, rulesets(2))
    for rules in rulesets(2):
        assert plan(rules, read_state(host, rules.family)).is_empty


# ---------------------------------------------------------------------------------------------
# end to end: `kproxy-nft apply` in the namespace
# ---------------------------------------------------------------------------------------------

# An ip6tables-<backend>-restore that hands `--test` runs to the real tool and refuses every
# commit, with what iptables-nft says when the kernel refuses a rule.
FAILING_RESTORE = """\
#!/bin/sh
for arg in "$@"; do
    if [ "$arg" = "--test" ]; then exec {real} "$@"; fi
done
cat >/dev/null
echo "{tool} v1.8.9 (nf_tables): " >&2
echo "line 3: RULE_APPEND failed (Invalid argument): rule in chain KUBE-SERVICES" >&2
exit 4
"""


def write_manifests(directory: Path, generation: int) -> None:
    host = 10 + generation
    write_dual_stack_web(directory, f"10.1.0.{host}", f"fd00:10::{host}")


def cli_apply(netns: str, backend: str, manifests: Path, path: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = ["ip", "netns", "exec", netns, sys.executable, "-m", "kproxy_nft.cli", "apply", "-f", str(manifests),
            "--proxy-mode", "iptables", "--iptables-backend", backend, "--cluster-cidr", "10.1.0.0/16,fd00:10::/64"]
    env = {**os.environ, "PATH": path} if path else None
    return subprocess.run(argv, capture_output=True, text=True, env=env, check=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cli_apply_whose_ipv6_restore_fails_exits_2_with_both_families_unchanged(
    netns: str, backend: str, tmp_path: Path
) -> None:
    manifests = tmp_path / "manifests"
    write_manifests(manifests, 0)
    first = cli_apply(netns, backend, manifests)
    assert first.returncode == 1, first.stdout + first.stderr  # changes applied
    tool = tool_name(IptablesBackend(backend), IPFamily.V6, "restore")
    real = shutil.which(tool)
    assert real is not None
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / tool).write_text(FAILING_RESTORE.format(real=real, tool=tool))
    (bin_dir / tool).chmod(0o755)
    write_manifests(manifests, 1)  # both families' endpoints move
    before = both_saved(netns, backend)
    failed = cli_apply(netns, backend, manifests, path=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert failed.returncode == 2, failed.stdout + failed.stderr
    assert both_saved(netns, backend) == before
    (line,) = failed.stderr.splitlines()
    assert line.startswith(f"kproxy-nft: error: RestoreError: {tool} failed")
    assert "RULE_APPEND failed (Invalid argument)" in line and "IPv4 reverted" in line
    assert "the kernel is unchanged" in line
    # The same apply with the real tool goes through.
    assert cli_apply(netns, backend, manifests).returncode == 1
    assert cli_apply(netns, backend, manifests).returncode == 0


# ---------------------------------------------------------------------------------------------
# nftables: one transaction for both families
# ---------------------------------------------------------------------------------------------


def ruleset_text(netns: str) -> str:
    result = run_in(netns, ["nft", "list", "ruleset"])
    assert result.returncode == 0, result.stderr
    return result.stdout


# Commands at the end of a transaction that changes both families, refused in its ip6 part.
NFT_FAILURES = {
    "jump-to-missing-chain": "add rule ip6 kproxy-nft services jump no-such-chain\n",
    "missing-element": "delete element ip6 kproxy-nft service-ips { fd00::9 . tcp . 1 }\n",
    "parse-error": "add rule ip6 kproxy-nft services this is not nft\n",
}


@pytest.mark.parametrize("failure", sorted(NFT_FAILURES))
def test_a_failing_nftables_transaction_leaves_the_ruleset_identical(netns: str, failure: str) -> None:
    with NftablesBackend(netns) as backend:
        backend.full_sync(compile_all(sample_state(services=3), NODE))
        step = backend.plan(compile_all(sample_state(endpoint_generation=1, services=2), NODE))
        assert " ip kproxy-nft " in step.text and " ip6 kproxy-nft " in step.text  # both families change
        before = ruleset_text(netns)
        with pytest.raises(NftablesError):
            backend.apply(dataclasses.replace(step, text=step.text + NFT_FAILURES[failure]))
        assert ruleset_text(netns) == before
        backend.apply(step)  # the real plan still fits: nothing was recorded
        assert ruleset_text(netns) != before
