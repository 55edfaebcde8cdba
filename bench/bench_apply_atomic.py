"""Benchmark: making `apply` all-or-nothing across IPv4 and IPv6 in iptables mode (needs root).

Prints figures; not a test. iptables-restore commits each family on its own, so when IPv6 fails
after IPv4 committed, IPv4 must be undone, or the failure foreseen. Two ways, measured here for
each backend (nft, legacy) in throwaway `kpn-bench-*` network namespaces, on a dual-stack
synthetic cluster (every service has an IPv4 and an IPv6 cluster IP and endpoints):

1. `--test` first: `iptables-restore --test --noflush` of each family's payload before
   committing either. Paid on every apply that changes something.
2. revert: commit IPv4, and only if IPv6 then fails, read IPv4 back, send
   `revert_plan(before, now)` and read again to check (`kernel.iptables.revert`). Paid only
   on failure.

The plans and commits go through the iptables proxier, one per family (`Proxier.plan`, then
`Proxier.apply`, timed per family). The proxier runs neither way on demand (`--test` is not
what it does; its revert runs inside `apply` only when IPv6 really fails), so those two are
timed on the kernel layer, on the proxier's own plans.

Two situations: a full apply into an empty namespace (a node's first apply), and one endpoint
of one service moved with the whole ruleset in place (the everyday apply).

Then what `--test` validates, per backend: payloads that the parser accepts but the kernel
refuses, whether `--test` refuses them, whether the real restore does, and (with strace, when
installed) whether the kernel was shown the rules during `--test`.

Usage:
    sudo python bench/bench_apply_atomic.py [--services 10000] [--endpoints 10] [--backends nft,legacy]
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import cast

from _common import exit_on_sigterm, open_proxier, print_grid, restore_argv, restore_command, timed, with_endpoints

from kproxy_nft.kernel.iptables import Host, IptablesBackend, _prepare, _restore, read_state, revert
from kproxy_nft.kernel.iptables_plan import Plan, revert_plan
from kproxy_nft.lab.netns import throwaway_netns
from kproxy_nft.lab.synthetic import synthetic_cluster, synthetic_name
from kproxy_nft.model import ClusterState, IPFamily, NodeContext
from kproxy_nft.proxier import ProxierPlan

NODE = NodeContext(hostname="node0", cluster_cidrs=("10.0.0.0/8", "fd00:128::/64"))
FAMILIES = (IPFamily.V4, IPFamily.V6)


def v6_of(ip: str, prefix: str) -> str:
    """An IPv6 twin of an IPv4 address: the same low 32 bits under `prefix`."""
    return str(ipaddress.ip_address(int(ipaddress.ip_address(prefix)) + int(ipaddress.ip_address(ip))))


def dual_stack(state: ClusterState) -> ClusterState:
    """`state` with an IPv6 cluster IP per service and an IPv6 twin of every endpoint."""
    services = {
        name: dataclasses.replace(port, cluster_ips=(*port.cluster_ips, v6_of(port.cluster_ips[0], "fd00:96::")))
        for name, port in state.services.items()
    }
    endpoints = {
        name: (*eps, *(dataclasses.replace(ep, ip=v6_of(ep.ip, "fd00:128::")) for ep in eps))
        for name, eps in state.endpoints.items()
    }
    return ClusterState(services, endpoints)


def one_endpoint_moved(state: ClusterState, i: int) -> ClusterState:
    """`state` with the first IPv4 and the first IPv6 endpoint of service i moved to new addresses."""
    name = synthetic_name(i)
    v4 = [ep for ep in state.endpoints_of(name) if ":" not in ep.ip]
    v6 = [ep for ep in state.endpoints_of(name) if ":" in ep.ip]
    v4[0] = dataclasses.replace(v4[0], ip=f"10.255.0.{1 + i % 250}")
    v6[0] = dataclasses.replace(v6[0], ip=f"fd00:255::{1 + i % 250:x}")
    return with_endpoints(state, name, tuple(sorted((*v4, *v6), key=lambda ep: ep.address)))


def kernel_plan(plan: ProxierPlan) -> Plan:
    """The kernel layer's plan inside a one-family iptables `ProxierPlan` (its `detail`: one
    (plan, serves localhost NodePorts) pair per family)."""
    ((inner, _),) = cast("tuple[tuple[Plan, bool], ...]", plan.detail)
    return inner


def seconds_of_test_run(p: Plan, host: Host) -> float:
    """Seconds an `iptables-restore --test --noflush` of the plan's payload takes (as apply sends it)."""
    sent = _prepare(host, p, p.edits)
    result, seconds = timed(lambda: _restore(host, p.family, sent, test=True))
    assert result.returncode == 0, result.stderr
    return seconds


@dataclasses.dataclass
class Row:
    backend: str
    situation: str
    lines: dict[IPFamily, int]
    commit: dict[IPFamily, float]
    test: dict[IPFamily, float]
    read: float = 0.0  # revert: read IPv4 back
    undo_plan: float = 0.0  # revert_plan(before, now)
    undo_restore: float = 0.0
    check: float = 0.0  # read again, plan again: nothing left
    revert_total: float = 0.0  # kernel.iptables.revert, end to end
    undo_lines: int = 0


def measure(ns: str, backend: str, state: ClusterState, situation: str) -> Row:
    """Plan both families, --test both payloads, commit both, then revert IPv4 (timed in parts)."""
    with (open_proxier("iptables", NODE, ns, iptables_backend=backend, families=(IPFamily.V4,)) as v4,
          open_proxier("iptables", NODE, ns, iptables_backend=backend, families=(IPFamily.V6,)) as v6):
        proxiers = {IPFamily.V4: v4, IPFamily.V6: v6}
        plans = {f: proxiers[f].plan(state) for f in FAMILIES}
        inner = {f: kernel_plan(plans[f]) for f in FAMILIES}
        row = Row(backend, situation, {f: inner[f].payload.count("\n") for f in FAMILIES}, {}, {})
        host = Host(IptablesBackend(backend), ns)  # the kernel layer's, for --test and the revert
        for f in FAMILIES:
            row.test[f] = seconds_of_test_run(inner[f], host)
        for f in FAMILIES:
            _, row.commit[f] = timed(lambda f=f: proxiers[f].apply(plans[f]))  # type: ignore[misc]
        before = inner[IPFamily.V4].before
        # The revert in parts (what `revert` does), then again end to end after re-committing.
        now, row.read = timed(lambda: read_state(host, IPFamily.V4))
        undo, row.undo_plan = timed(lambda: revert_plan(before, now))
        row.undo_lines = undo.payload.count("\n")
        sent = _prepare(host, undo, undo.edits)
        result, row.undo_restore = timed(lambda: _restore(host, IPFamily.V4, sent))
        assert result.returncode == 0, result.stderr
        left, row.check = timed(lambda: revert_plan(before, read_state(host, IPFamily.V4)))
        assert left.is_empty
        v4.apply(v4.plan(state))
        _, row.revert_total = timed(lambda: revert(host, before))
        v4.apply(v4.plan(state))
    return row


def print_table(rows: list[Row]) -> None:
    def both(d: dict[IPFamily, float]) -> str:
        return f"{d[IPFamily.V4]:.2f}+{d[IPFamily.V6]:.2f}"

    header = ("backend", "situation", "payload lines v4+v6", "commit s v4+v6", "--test s v4+v6",
              "--test/commit", "revert v4 s: read", "plan", "restore", "check", "revert() total", "undo lines")
    cells = [header]
    for r in rows:
        commit, test = sum(r.commit.values()), sum(r.test.values())
        cells.append((
            r.backend, r.situation, f"{r.lines[IPFamily.V4]}+{r.lines[IPFamily.V6]}", both(r.commit), both(r.test),
            f"{test / commit:.0%}", f"{r.read:.2f}", f"{r.undo_plan:.2f}", f"{r.undo_restore:.2f}", f"{r.check:.2f}",
            f"{r.revert_total:.2f}", str(r.undo_lines),
        ))  # fmt: skip
    print_grid(cells)


# ---------------------------------------------------------------------------------------------
# what --test validates
# ---------------------------------------------------------------------------------------------

# (name, setup payload or "", payload): each accepted by the parser, or not, and by the kernel, or not.
PROBES = (
    ("unknown match (parse error)", "", "*filter\n-A INPUT -m no-such-match --foo -j RETURN\nCOMMIT\n"),
    ("jump to a missing chain", "", "*filter\n-A INPUT -j KUBE-NO-SUCH-CHAIN\nCOMMIT\n"),
    ("DNAT in the filter table", "", "*filter\n-A FORWARD -j DNAT --to-destination 10.9.9.9\nCOMMIT\n"),
    ("DNAT in nat POSTROUTING", "", "*nat\n-A POSTROUTING -j DNAT --to-destination 10.9.9.9\nCOMMIT\n"),
    ("a chain loop", "", "*filter\n:LA - [0:0]\n:LB - [0:0]\n-A LA -j LB\n-A LB -j LA\n-A INPUT -j LA\nCOMMIT\n"),
    ("-X of a chain still jumped to", "*filter\n:LC - [0:0]\n-A INPUT -j LC\nCOMMIT\n", "*filter\n-X LC\nCOMMIT\n"),
    ("-D of a rule that is not there", "", "*filter\n-D INPUT -s 192.0.2.1 -j ACCEPT\nCOMMIT\n"),
)


def kernel_saw_rules(ns: str, argv: list[str], payload: str) -> str:
    """Whether a restore handed rules to the kernel (nft: NFT_MSG_NEWRULE; legacy: SET_REPLACE)."""
    strace = shutil.which("strace")
    if strace is None:
        return "n/a"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "trace"
        # strace inside the namespace: from outside it cannot tell netfilter's netlink sockets.
        subprocess.run(["ip", "netns", "exec", ns, strace, "-f", "-o", str(out), "-e", "trace=sendmsg,setsockopt",
                        *argv], input=payload, text=True, capture_output=True, check=False)
        trace = out.read_text()
    return "yes" if "NFT_MSG_NEWRULE" in trace or "SO_SET_REPLACE" in trace else "no"


def probe_test(backends: list[str]) -> None:
    print("\nWhat `iptables-restore --test --noflush` refuses (exit status), against the real restore:")
    cells = [("backend", "payload", "--test", "kernel shown rules in --test", "real restore", "real restore says")]
    for backend in backends:
        for name, setup, payload in PROBES:
            # Bare restores on purpose: what iptables-restore itself refuses, nothing of ours involved.
            with throwaway_netns("kpn-bench") as ns:
                run = restore_argv(ns, backend, IPFamily.V4, "--noflush")
                if setup:
                    subprocess.run(run, input=setup, text=True, capture_output=True, check=True)
                test = subprocess.run([*run, "--test"], input=payload, text=True, capture_output=True, check=False)
                saw = kernel_saw_rules(ns, restore_command(backend, IPFamily.V4, "--noflush", "--test"), payload)
                real = subprocess.run(run, input=payload, text=True, capture_output=True, check=False)
                says = " / ".join(line.strip() for line in real.stderr.splitlines() if line.strip())[:90]
                cells.append((backend, name, "refused" if test.returncode else "passed", saw,
                              "refused" if real.returncode else "passed", says))
    print_grid(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--backends", default="nft,legacy")
    args = parser.parse_args()
    exit_on_sigterm()
    backends = args.backends.split(",")
    state = dual_stack(synthetic_cluster(args.services, args.endpoints))
    changed = one_endpoint_moved(state, args.services // 2)
    print(f"{args.services} dual-stack services × {args.endpoints} endpoints per family")
    rows = []
    for backend in backends:
        with throwaway_netns("kpn-bench") as ns:
            rows.append(measure(ns, backend, state, "full apply, empty kernel"))
            rows.append(measure(ns, backend, changed, "one endpoint moved"))
    print()
    print_table(rows)
    print("\n--test: paid on every apply. revert: paid only when IPv6 fails after IPv4 committed;")
    print("'read' could be skipped by reverting from the plan's predicted state, 'check' is a safety net.")
    probe_test(backends)


if __name__ == "__main__":
    main()
