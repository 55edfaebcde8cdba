"""Switching a live node to us, and between our modes, without a failed connection (#15 item 7).

Each scenario runs a connection loop (a fresh TCP connection after another, from a pod client
to a service's cluster IP) through the switch and asserts that none failed. The services are
those of kube-proxy's TestOverallIPTablesRules / TestOverallNFTablesRules
(`tests/kube_proxy/overall.yaml`), with the lab's pods at their endpoint addresses.

* (a) a node holding kube-proxy's iptables-mode rules, as kube-proxy's own test expects them
  (`tests/kube_proxy/iptables-overall.rules`): our iptables mode adopts them and has nothing
  to change; what it does send is kube-proxy's canary rule (see `test_iptables_mode_adopts_…`);
  and with kube-proxy's rules in iptables-legacy while ours go to iptables-nft, legacy's are
  removed once ours are in;
* (b) iptables mode → nftables mode → iptables mode, each mode's rules removed only once the
  other's first sync is in (`proxier.handover.remove_other_modes`, as the agent calls it);
* (c) a node holding kube-proxy's nftables-mode tables `ip`/`ip6 kube-proxy`
  (`tests/kube_proxy/nftables-overall.nft`): replaced by ours.

Sources (kubernetes/kubernetes): pkg/proxy/iptables/proxier_test.go, TestOverallIPTablesRules
(the index serving this project's look-ups gives that file's text without its commit: the
version with the nfacct counters and KUBE-PROXY-FIREWALL, 1.30 and later); pkg/proxy/nftables/
proxier_test.go, TestOverallNFTablesRules and `baseRules`, commit
81810de635aa13aa0a32992f6def3aa9d6025ebc. The texts are kept verbatim in tests/kube_proxy/;
every change made to load them is in this file, with its reason.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kproxy_nft.kernel.iptables_text import strip_comments
from kproxy_nft.lab import Addressing, ClientSpec, Lab, PodSpec
from kproxy_nft.lab.result import ProbeResult
from kproxy_nft.model import ClusterState, IPFamily, NodeContext
from kproxy_nft.proxier.handover import remove_other_modes
from kproxy_nft.proxier.iptables import IptablesProxier
from kproxy_nft.proxier.nftables import NftablesProxier
from kproxy_nft.sources.manifests import read_manifests
from tests.kernel.conftest import BACKENDS, run_in, serving_lab

pytestmark = pytest.mark.kernel

DATA = Path(__file__).resolve().parent.parent / "kube_proxy"
# kube-proxy's test node: its name (svc4's 10.180.0.5 is local to it) and its pod CIDR.
NODE = NodeContext(hostname="test-node", cluster_cidrs=("10.0.0.0/8",), localhost_nodeports=True)
CLUSTER_IP, ENDPOINT_POD = "172.30.0.41", "ep1"  # ns1/svc1:p80 → 10.180.0.1:80
SETTLE = 0.5  # seconds of connections before and after a switch


def cluster_state() -> ClusterState:
    return read_manifests([str(DATA / "overall.yaml")]).cluster_state()


@pytest.fixture
def lab() -> Iterator[Lab]:
    """The node, a pod at each endpoint address of kube-proxy's test, and a pod client."""
    pods = [PodSpec(f"ep{i}", f"10.180.0.{i}") for i in range(1, 6)]
    with serving_lab(pods, [ClientSpec("client", "10.0.0.50")],
                     addressing=Addressing(cluster_cidr="10.0.0.0/8", pod_gateway="10.0.0.1")) as serving:
        yield serving


def through(lab: Lab, switch: Callable[[], None]) -> ProbeResult:
    """Connections to ns1/svc1's cluster IP, back to back, before, during and after `switch`."""
    loop = lab.start_probe_loop("client", CLUSTER_IP, 80, timeout=1.0)
    try:
        time.sleep(SETTLE)
        switch()
        time.sleep(SETTLE)
    finally:
        result = loop.stop()
    return result


def assert_no_failed_connection(result: ProbeResult) -> None:
    assert len(result) > 20, result.summary()
    assert not result.failures and set(result.counts()) == {ENDPOINT_POD}, result.summary()


def saved(netns: str, backend: str) -> str:
    """Every table of one backend, IPv4, without timestamps and packet counters."""
    text = strip_comments(run_in(netns, [f"iptables-{backend}-save"]).stdout)
    return re.sub(r"\[\d+:\d+\]", "[0:0]", text)


# -- (a) kube-proxy's iptables mode ------------------------------------------------------------

# Where kube-proxy hooks its chains into the built-in ones: `iptablesJumpChains` and
# `iptablesKubeletJumpChains` (pkg/proxy/iptables/proxier.go), each ensured with
# `EnsureRule(Prepend, …)`, i.e. `iptables -I CHAIN 1 …`, in this order (the end state is the same
# whether they come before or after the restore, which needs the chains to exist here).
# Its test's expected text is the restore payload alone, so they are added here as it adds them.
KUBE_PROXY_JUMPS = (
    ("filter", "INPUT", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service "
                        "portals\" -j KUBE-EXTERNAL-SERVICES"),
    ("filter", "FORWARD", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service "
                          "portals\" -j KUBE-EXTERNAL-SERVICES"),
    ("filter", "INPUT", "-m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS"),
    ("filter", "FORWARD", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" "
                          "-j KUBE-SERVICES"),
    ("filter", "OUTPUT", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" "
                         "-j KUBE-SERVICES"),
    ("filter", "FORWARD", "-m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD"),
    ("filter", "INPUT", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" "
                        "-j KUBE-PROXY-FIREWALL"),
    ("filter", "OUTPUT", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" "
                         "-j KUBE-PROXY-FIREWALL"),
    ("filter", "FORWARD", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" "
                          "-j KUBE-PROXY-FIREWALL"),
    ("nat", "OUTPUT", "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
    ("nat", "PREROUTING", "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
    ("nat", "POSTROUTING", "-m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING"),
    ("filter", "INPUT", "-j KUBE-FIREWALL"),
    ("filter", "OUTPUT", "-j KUBE-FIREWALL"),
)


def kube_proxy_iptables_rules() -> str:
    """kube-proxy's expected restore payload, as kube-proxy itself writes it on this node.

    * Without the nfacct counters: kube-proxy writes `-m nfacct` (and the duplicate localhost
      node-port rules that carry it) only for counters it could create through netlink at start
      (`proxier.nfAcctCounters`, which its fake proxier sets to true); this host has no nfacct
      support, iptables-restore refuses a rule naming a missing counter, and kube-proxy then
      writes the same rules without them, which is what is loaded here.
    * `MASQUERADE --random-fully`: kube-proxy adds it when iptables supports it (1.6.2 and later;
      1.8.9 here). Its test's fake iptables does not.
    """
    lines = []
    for line in (DATA / "iptables-overall.rules").read_text().splitlines():
        if "-m nfacct" in line and "-d 127.0.0.0/8" in line:
            continue  # the localhost node-port duplicate exists only to count
        line = re.sub(r" -m nfacct --nfacct-name \S+", "", line)
        if line.endswith("requiring SNAT\" -j MASQUERADE"):
            line += " --random-fully"
        lines.append(line)
    return "\n".join(lines) + "\n"


def load_kube_proxy_iptables(netns: str, backend: str) -> None:
    """The node as kube-proxy's iptables mode leaves it: its canary chains (created empty by its
    `Monitor`, in mangle, nat and filter), its restore payload, then its jumps."""
    canaries = "".join(f"*{table}\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n" for table in ("mangle", "nat", "filter"))
    for payload in (canaries, kube_proxy_iptables_rules()):
        result = run_in(netns, [f"iptables-{backend}-restore", "-w", "--noflush"], payload)
        assert result.returncode == 0, result.stderr
    for table, chain, rule in KUBE_PROXY_JUMPS:
        result = run_in(netns, ["sh", "-c", f"iptables-{backend} -w -t {table} -I {chain} 1 {rule}"])
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_iptables_mode_adopts_kube_proxys_rules_and_changes_nothing(lab: Lab, backend: str) -> None:
    load_kube_proxy_iptables(lab.node_ns, backend)
    before = saved(lab.node_ns, backend)
    state = cluster_state()
    proxier = IptablesProxier(NODE, netns=lab.node_ns, iptables_backend=backend, families=(IPFamily.V4,))
    outcome: dict[str, object] = {}

    def adopt() -> None:
        outcome["plan"] = proxier.plan(state)  # what `kproxy-nft apply` would send: nothing
        outcome["sync"] = proxier.sync(state, full=True)  # the agent's first sync
        outcome["removed"] = remove_other_modes(proxier)

    result = through(lab, adopt)
    assert_no_failed_connection(result)
    plan = outcome["plan"]
    assert getattr(plan, "is_empty", False), getattr(plan, "payload", plan)
    assert outcome["sync"] == "v4 chains=0 jumps=0"
    assert outcome["removed"] == ()  # no other mode's rules on this node
    # The one thing sent: our canaries hold a rule (so that a flush is noticed too, not only a
    # deletion: `kernel.iptables.ensure_canaries`), kube-proxy's are empty.
    after = saved(lab.node_ns, backend)
    added = [line for line in after.splitlines() if line not in before.splitlines()]
    assert added == ["-A KUBE-PROXY-CANARY -j RETURN"] * 3, added
    assert [line for line in before.splitlines() if line not in after.splitlines()] == []


def test_kube_proxys_rules_in_the_other_iptables_backend_go_after_our_first_sync(lab: Lab) -> None:
    """kube-proxy ran iptables-legacy, ours writes iptables-nft: both hold the rules for a moment,
    then legacy's go (kube-proxy's chains, jumps and canaries), and no connection fails."""
    load_kube_proxy_iptables(lab.node_ns, "legacy")
    proxier = IptablesProxier(NODE, netns=lab.node_ns, iptables_backend="nft", families=(IPFamily.V4,))
    removed: list[tuple[str, ...]] = []

    def take_over() -> None:
        proxier.sync(cluster_state(), full=True)
        removed.append(remove_other_modes(proxier))

    assert_no_failed_connection(through(lab, take_over))
    assert removed == [("iptables-legacy IPv4: removed 25 chains, 12 jumps",
                        "iptables-legacy IPv4: removed KUBE-PROXY-CANARY from filter, nat, mangle")], removed
    assert kube_chains(lab.node_ns, "legacy") == []
    assert "KUBE-SERVICES" in kube_chains(lab.node_ns, "nft")


# -- (b) iptables mode → nftables mode → iptables mode ------------------------------------------


def nft_tables(netns: str) -> set[str]:
    return set(run_in(netns, ["nft", "list", "tables"]).stdout.splitlines())


def kube_chains(netns: str, backend: str) -> list[str]:
    """kube-proxy's (and our iptables mode's) chains in one backend, IPv4."""
    return [line.split()[0][1:] for line in saved(netns, backend).splitlines()
            if line.startswith(":KUBE-") and not line.startswith(":KUBE-FIREWALL ")]


def test_iptables_to_nftables_and_back_without_a_failed_connection(lab: Lab) -> None:
    state = cluster_state()
    node = NodeContext(hostname="test-node", cluster_cidrs=("10.0.0.0/8",))
    iptables_mode = IptablesProxier(node, netns=lab.node_ns, iptables_backend="nft", families=(IPFamily.V4,))
    iptables_mode.sync(state, full=True)
    assert lab.probe("client", CLUSTER_IP, 80).counts() == {ENDPOINT_POD: 1}
    nftables_mode = NftablesProxier(node, netns=lab.node_ns, families=(IPFamily.V4,))
    removed: list[tuple[str, ...]] = []

    def to_nftables() -> None:
        nftables_mode.sync(state, full=True)
        removed.append(remove_other_modes(nftables_mode))
        nftables_mode.close()  # this agent is done: the next one is the iptables mode's

    assert_no_failed_connection(through(lab, to_nftables))
    assert any(line.startswith("iptables-nft IPv4: removed ") for line in removed[0]), removed
    assert kube_chains(lab.node_ns, "nft") == []
    assert "table ip kproxy-nft" in nft_tables(lab.node_ns)

    back = IptablesProxier(node, netns=lab.node_ns, iptables_backend="nft", families=(IPFamily.V4,))

    def to_iptables() -> None:
        back.sync(state, full=True)
        removed.append(remove_other_modes(back))

    assert_no_failed_connection(through(lab, to_iptables))
    assert removed[1] == ("nftables: removed ip kproxy-nft",), removed
    assert "table ip kproxy-nft" not in nft_tables(lab.node_ns)
    assert "KUBE-SERVICES" in kube_chains(lab.node_ns, "nft")


# -- (c) kube-proxy's nftables mode ---------------------------------------------------------------


def declared_first(commands: list[str]) -> list[str]:
    """The same nft commands, every table, chain, set and map before any rule or element."""
    declaration = ("add table", "add chain", "add set", "add map")
    return ([line for line in commands if line.startswith(declaration)]
            + [line for line in commands if not line.startswith(declaration)])


def kube_proxy_nft_script() -> str:
    """kube-proxy's expected `ip kube-proxy` table, and its `ip6` counterpart, as one nft script.

    * Declarations first: the test's text is its fake's dump, which lists a service's rules
      before the endpoint chains they jump to; nft resolves each reference as it reads it, and
      kube-proxy's own transactions declare every chain before using it.
    * `ip6 kube-proxy`: the test is IPv4 only; a dual-stack kube-proxy writes the same base
      table (`baseRules`) for IPv6 with the ip6 family, IPv6 addresses, its IPv6 service range
      and node IP (here fd00:10:96::/112 and 2001:db8::1); without IPv6 services in this test.
    """
    text = (DATA / "nftables-overall.nft").read_text()
    base, _, services = text.partition("\n# svc1\n")

    def commands(part: str) -> list[str]:
        return [line for line in part.splitlines() if line and not line.startswith("#")]

    ipv6 = [line.replace("ip kube-proxy", "ip6 kube-proxy").replace("ipv4_addr", "ipv6_addr")
            .replace(" ip daddr", " ip6 daddr").replace("172.30.0.0/16", "fd00:10:96::/112")
            .replace("192.168.0.2", "2001:db8::1") for line in commands(base)]
    return "\n".join(declared_first(commands(base) + commands(services)) + declared_first(ipv6)) + "\n"


def test_nftables_mode_replaces_kube_proxys_nftables_tables(lab: Lab) -> None:
    result = run_in(lab.node_ns, ["nft", "-f", "-"], kube_proxy_nft_script())
    assert result.returncode == 0, result.stderr
    assert {"table ip kube-proxy", "table ip6 kube-proxy"} <= nft_tables(lab.node_ns)
    assert lab.probe("client", CLUSTER_IP, 80).counts() == {ENDPOINT_POD: 1}  # through kube-proxy's rules
    proxier = NftablesProxier(NODE, netns=lab.node_ns, families=(IPFamily.V4,))
    removed: list[tuple[str, ...]] = []

    def replace() -> None:
        proxier.sync(cluster_state(), full=True)
        removed.append(remove_other_modes(proxier))

    try:
        assert_no_failed_connection(through(lab, replace))
    finally:
        proxier.close()
    assert removed == [("nftables: removed ip kube-proxy, ip6 kube-proxy",)]
    tables = nft_tables(lab.node_ns)
    assert "table ip kproxy-nft" in tables and not {"table ip kube-proxy", "table ip6 kube-proxy"} & tables


def test_the_other_modes_rules_are_removed_only_where_they_are(lab: Lab) -> None:
    """Nothing to take over: nothing is removed, and no legacy table is created by looking."""
    proxier = NftablesProxier(NODE, netns=lab.node_ns, families=(IPFamily.V4,))
    try:
        proxier.sync(cluster_state(), full=True)
        assert remove_other_modes(proxier) == ()
    finally:
        proxier.close()
    legacy = subprocess.run(["ip", "netns", "exec", lab.node_ns, "iptables-legacy-save"],
                            capture_output=True, text=True)
    assert "*nat" not in legacy.stdout
