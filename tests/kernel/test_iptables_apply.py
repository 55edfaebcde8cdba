"""The iptables backend against the real kernel, with both backends (nft and legacy).

Each test runs in its own throwaway network namespace (`netns` fixture: `kpn-<random>`,
deleted even when the test fails), connected to nothing. What is proved here:

* the canonical form is what iptables-save prints, for every rule shape we know (the survey)
  and for everything the compiler writes: apply, read back, and the plan is empty;
* an endpoint change rewrites that service's chains and nothing else;
* other software's chains and rules survive apply and cleanup; cleanup leaves only them;
* a restore that fails (an invalid rule injected through the test hook) leaves iptables-save
  output byte-identical: in the first table of the payload, in a later one that
  iptables-restore --test catches, or one the kernel refuses at commit after the first table
  already committed (then the revert restores it).
"""

from __future__ import annotations

import pytest

from kproxy_nft.compile.iptables import Ruleset, compile_ruleset
from kproxy_nft.kernel.iptables import Host, IptablesBackend, RestoreError, apply, cleanup, plan, read_state
from kproxy_nft.kernel.iptables_plan import Plan
from kproxy_nft.kernel.iptables_rule import canonical
from kproxy_nft.kernel.iptables_text import strip_comments
from kproxy_nft.lab.synthetic import synthetic_cluster, synthetic_endpoints, synthetic_name
from kproxy_nft.model import ClusterState, IPFamily, NodeContext
from kproxy_nft.proxier.iptables import IptablesProxier
from tests.kernel.conftest import BACKENDS, iptables_apply, run_in
from tests.test_iptables_text import NODE_CIDR, NODE_MASQUERADE_ALL, SURVEY, examples_ruleset, variant_state
from tests.test_reconcile import inject, many_services, ours, two_table_change, view, wanted

pytestmark = pytest.mark.kernel

FAMILIES = (IPFamily.V4, IPFamily.V6)


def tool(backend: str, family: IPFamily, action: str) -> str:
    return f"{'iptables' if family is IPFamily.V4 else 'ip6tables'}-{backend}-{action}"


def restore(netns: str, backend: str, family: IPFamily, text: str) -> None:
    result = run_in(netns, [tool(backend, family, "restore"), "-w", "--noflush"], text)
    assert result.returncode == 0, result.stderr


def saved(netns: str, backend: str, family: IPFamily = IPFamily.V4, *args: str) -> str:
    """iptables-save output without its timestamped comment lines."""
    result = run_in(netns, [tool(backend, family, "save"), *args])
    assert result.returncode == 0, result.stderr
    return strip_comments(result.stdout)


def sync(host: Host, desired: Ruleset) -> None:
    """Apply `desired`, then check the kernel now holds exactly what the plan predicted."""
    step = plan(desired, read_state(host, desired.family))
    apply(step, host)
    now = read_state(host, desired.family)
    assert ours(now) == wanted(desired)
    assert view(now) == view(step.after)
    again = plan(desired, now)
    assert again.is_empty, again.payload


CLUSTER_NODE = NodeContext(cluster_cidrs=("10.0.0.0/8",))


def one_endpoint_change(host: Host, services: int, endpoints: int, changed: int) -> tuple[Ruleset, Plan]:
    """Sync a synthetic cluster, then plan (not apply) a new generation of service `changed`'s endpoints."""
    state = synthetic_cluster(services, endpoints)
    sync(host, compile_ruleset(state, CLUSTER_NODE))
    moved = {**state.endpoints, synthetic_name(changed): synthetic_endpoints(changed, endpoints, generation=1)}
    desired = compile_ruleset(ClusterState(state.services, moved), CLUSTER_NODE)
    return desired, plan(desired, read_state(host))


FOREIGN = {
    IPFamily.V4: "\n".join([
        "*nat", ":FOREIGN - [0:0]", "-A PREROUTING -j FOREIGN", "-A POSTROUTING -s 192.0.2.0/24 -j MASQUERADE",
        "-A FOREIGN -p tcp -m tcp --dport 22 -j RETURN", "COMMIT",
        "*filter", ":KUBE-FIREWALL - [0:0]", "-A INPUT -j KUBE-FIREWALL",
        "-A KUBE-FIREWALL -m mark --mark 0x8000/0x8000 -j DROP", "COMMIT", "",
    ]),
    IPFamily.V6: "\n".join([
        "*nat", ":FOREIGN - [0:0]", "-A PREROUTING -j FOREIGN", "-A POSTROUTING -s 2001:db8::/32 -j MASQUERADE",
        "COMMIT", "",
    ]),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the canonical form is the kernel's
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_iptables_save_prints_each_rule_in_its_canonical_form(netns: str, backend: str, family: IPFamily) -> None:
    cases = [(table, written, expected) for fam, table, written, expected in SURVEY if fam == family.value]
    tables: dict[str, list[str]] = {"nat": [":KUBE-SEP-X - [0:0]"], "filter": []}
    for n, (table, written, _) in enumerate(cases):
        tables[table] = [f":S{n} - [0:0]", *tables[table], f"-A S{n} {written}"]
    restore(netns, backend, family, "".join(f"*{t}\n" + "\n".join(lines) + "\nCOMMIT\n" for t, lines in tables.items()))
    printed = {t: saved(netns, backend, family, "-t", t).splitlines() for t in tables}
    for n, (table, written, expected) in enumerate(cases):
        (line,) = [line[len(f"-A S{n} ") :] for line in printed[table] if line.startswith(f"-A S{n} ")]
        assert line == expected  # the recording in tests/test_iptables_text.py still holds
        assert canonical(written, family) == line


# ---------------------------------------------------------------------------------------------
# apply: idempotent, minimal
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_apply_read_back_plan_is_empty_through_a_series_of_rulesets(
    netns: str, backend: str, family: IPFamily
) -> None:
    restore(netns, backend, family, FOREIGN[family])
    host = Host(IptablesBackend(backend), netns)
    series = [
        examples_ruleset(family),
        compile_ruleset(variant_state(), NODE_CIDR, family),
        compile_ruleset(variant_state(), NODE_MASQUERADE_ALL, family),
        compile_ruleset(synthetic_cluster(30, 3), CLUSTER_NODE, family),
        compile_ruleset(variant_state(), NODE_CIDR, family),
    ]
    for desired in series:
        sync(host, desired)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_endpoint_change_rewrites_only_that_services_chains(netns: str, backend: str) -> None:
    host = Host(IptablesBackend(backend), netns)
    desired, step = one_endpoint_change(host, services=20, endpoints=3, changed=7)
    assert step.tables == ("nat",)
    assert "KUBE-SERVICES" not in step.payload
    assert {c.owner for c in step.chains} == {synthetic_name(7)}
    assert {c.kind for c in step.chains} == {"added", "changed", "deleted"}
    sync(host, desired)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("foreign", [False, True], ids=["fresh", "with-foreign-rules"])
def test_a_large_payload_goes_through_with_the_nft_cache_prelude(netns: str, backend: str, foreign: bool) -> None:
    """Over 5,000 lines in a table: the nft backend adds `-S` and the built-in chains (see apply)."""
    if foreign:
        restore(netns, backend, IPFamily.V4, FOREIGN[IPFamily.V4])
    before = {t: saved(netns, backend, IPFamily.V4, "-t", t) for t in ("filter", "nat")}
    host = Host(IptablesBackend(backend), netns)
    desired = many_services(400)
    assert plan(desired, read_state(host)).edits[0].line_count > 5000
    sync(host, desired)
    cleanup(host)
    assert {t: saved(netns, backend, IPFamily.V4, "-t", t) for t in ("filter", "nat")} == before


# ---------------------------------------------------------------------------------------------
# other software's rules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_foreign_rules_survive_apply_and_cleanup(netns: str, backend: str) -> None:
    restore(netns, backend, IPFamily.V4, FOREIGN[IPFamily.V4])
    before = {t: saved(netns, backend, IPFamily.V4, "-t", t) for t in ("filter", "nat")}
    host = Host(IptablesBackend(backend), netns)
    sync(host, examples_ruleset())
    nat = saved(netns, backend, IPFamily.V4, "-t", "nat")
    for line in before["nat"].splitlines():
        assert line in nat.splitlines()  # every foreign chain and rule is still there
    removal = cleanup(host)
    assert not removal.is_empty
    assert {t: saved(netns, backend, IPFamily.V4, "-t", t) for t in ("filter", "nat")} == before
    assert cleanup(host).is_empty


# ---------------------------------------------------------------------------------------------
# failures leave the kernel as it was
# ---------------------------------------------------------------------------------------------

# (table, line) to add to a payload of two tables, nat then filter, and what must happen.
INJECTIONS = {
    # In the first table: iptables-restore stops before its COMMIT, nothing is committed.
    "parse-error-in-nat": ("nat", "-A KUBE-SERVICES -m no-such-match --foo -j RETURN"),
    # Passes --test, the kernel refuses it (DNAT is not allowed on the POSTROUTING path).
    "kernel-refusal-in-nat": ("nat", "-A KUBE-POSTROUTING -j DNAT --to-destination 10.9.9.9"),
    # In the second table: the --test run refuses it before anything is sent for real.
    "parse-error-in-filter": ("filter", "-A KUBE-FORWARD -m no-such-match --foo -j RETURN"),
    # Passes --test; the kernel refuses it at commit (DNAT is not a filter target), after the
    # nat table of the same payload committed: the revert must undo nat.
    "kernel-refusal-in-filter": ("filter", "-A KUBE-FORWARD -j DNAT --to-destination 10.9.9.9"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("injection", sorted(INJECTIONS))
def test_a_failing_restore_leaves_iptables_save_byte_identical(netns: str, backend: str, injection: str) -> None:
    restore(netns, backend, IPFamily.V4, FOREIGN[IPFamily.V4])
    host = Host(IptablesBackend(backend), netns)
    first, second = two_table_change()
    sync(host, first)
    before = saved(netns, backend)
    step = plan(second, read_state(host))
    assert step.tables == ("nat", "filter")
    table, line = INJECTIONS[injection]
    broken = inject(step, table, line)
    with pytest.raises(RestoreError) as caught:
        apply(broken, host)
    assert saved(netns, backend) == before
    error = caught.value
    assert error.kernel_unchanged, str(error)
    assert error.line is not None and broken.payload_line(error.line) in (line, "COMMIT")
    if injection == "kernel-refusal-in-filter":
        assert "reverted: nat" in str(error)
    # The same plan without the bad rule goes through.
    sync(host, second)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failing_single_table_restore_changes_nothing(netns: str, backend: str) -> None:
    host = Host(IptablesBackend(backend), netns)
    _, step = one_endpoint_change(host, services=5, endpoints=2, changed=1)
    before = saved(netns, backend)
    assert step.tables == ("nat",)
    with pytest.raises(RestoreError, match="atomic per table"):
        apply(inject(step, *INJECTIONS["kernel-refusal-in-nat"]), host)
    assert saved(netns, backend) == before


@pytest.mark.parametrize("how", ["apply", "agent"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_localhost_nodeports_turn_route_localnet_on_even_over_kubelets_chain(
    netns: str, backend: str, how: str
) -> None:
    """kube-proxy sets route_localnet whenever localhost NodePorts are on, also when KUBE-FIREWALL
    already exists (a pre-1.27 kubelet wrote it): neither `apply` nor an agent's first sync may skip it."""

    def program(state: ClusterState, node: NodeContext) -> None:
        if how == "apply":
            iptables_apply(netns, backend, state, node)
        else:
            IptablesProxier(node, netns=netns, iptables_backend=backend, families=(IPFamily.V4,)).sync(state, full=True)

    run_in(netns, [f"iptables-{backend}", "-N", "KUBE-FIREWALL"])
    run_in(netns, ["sysctl", "-q", "-w", "net.ipv4.conf.all.route_localnet=0"])
    program(synthetic_cluster(3, 2), NodeContext(hostname="node1", localhost_nodeports=True))
    assert run_in(netns, ["sysctl", "-n", "net.ipv4.conf.all.route_localnet"]).stdout.strip() == "1"
    run_in(netns, ["sysctl", "-q", "-w", "net.ipv4.conf.all.route_localnet=0"])
    program(ClusterState(), NodeContext(hostname="node1"))
    assert run_in(netns, ["sysctl", "-n", "net.ipv4.conf.all.route_localnet"]).stdout.strip() == "0"
