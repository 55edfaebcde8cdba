"""`kproxy-nft diff OLD NEW`: goldens of its three formats, properties, exit statuses, no root.

Goldens: tests/golden/diff-old.yaml → diff-new.yaml seen from node-a (a type change, endpoints
replaced, a terminating UDP endpoint, a Local-policy LB gaining its local endpoint, a UDP port
removed and one added), in text, JSON and Markdown; regenerate after an intended change with
`python -m tests.test_diff` and review the diff. Properties, on random valid clusters (the
fuzzers' `valid_documents`): a cluster diffed with itself is empty (the Service level, and the
rules planned against the in-memory node that holds it); the order of the documents never
matters; swapping OLD and NEW swaps what is added and removed.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner, Result
from hypothesis import given, settings
from hypothesis import strategies as st

from kproxy_nft.cli import main
from kproxy_nft.config import ProxySettings
from kproxy_nft.diff import (
    NODE_FIELDS,
    SERVICE_FIELDS,
    Answering,
    DiffReport,
    FieldChange,
    RuleChange,
    ServicePortDiff,
    StateDiff,
    Status,
    diff_states,
)
from kproxy_nft.diff.render import MARKDOWN_RULES_LIMIT, as_json, render_markdown
from kproxy_nft.diff_offline import offline_families, offline_rules
from kproxy_nft.model import ClusterState, NodeContext, ServicePort
from kproxy_nft.sources.manifests import read_manifests
from tests.fuzz_strategies import nodes, render, valid_documents, with_service_cidrs
from tests.helpers import GOLDEN

OLD, NEW = str(GOLDEN / "diff-old.yaml"), str(GOLDEN / "diff-new.yaml")
NODE_FLAGS = ["--hostname-override", "node-a", "--node-ip", "192.168.100.1", "--cluster-cidr", "10.1.0.0/16"]
# golden file → (mode, output format, OLD, NEW)
GOLDENS = {
    "diff-change.iptables.txt": ("iptables", "text", OLD, NEW),
    "diff-change.nftables.txt": ("nftables", "text", OLD, NEW),
    "diff-change.iptables.json": ("iptables", "json", OLD, NEW),
    "diff-change.nftables.md": ("nftables", "markdown", OLD, NEW),
    "diff-same.nftables.md": ("nftables", "markdown", OLD, OLD),
}


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, ["diff", *args], catch_exceptions=False)


def golden_args(name: str) -> list[str]:
    mode, output, old, new = GOLDENS[name]
    return [old, new, *NODE_FLAGS, "--proxy-mode", mode, "-o", output]


@pytest.mark.parametrize("name", sorted(GOLDENS))
def test_output_matches_golden(name: str) -> None:
    result = invoke(*golden_args(name))
    assert result.exit_code == (0 if "same" in name else 1), result.stderr
    assert result.stdout == (GOLDEN / name).read_text()


def test_json_golden_says_what_changed() -> None:
    """The JSON contract, read as a CI job would (docs/DIFF.md)."""
    doc = json.loads((GOLDEN / "diff-change.iptables.json").read_text())
    assert doc["differs"] is True and doc["rules"]["changes"] is True
    ports = {s["name"]: s for s in doc["services"]}
    assert ports["default/logs:syslog"]["status"] == "removed"
    assert ports["default/web:http"]["fields"][0] == {"field": "type", "old": "ClusterIP", "new": "NodePort"}
    lb = ports["default/lb:https"]["frontends"]
    assert {(f["address"], f["port"], f["change"]) for f in lb} == {
        ("192.0.2.10", 443, "starts answering"), (None, 31443, "starts answering")}
    flows = ports["kube-system/dns:dns"]["stale_flows"]
    assert flows == [{"family": 4, "protocol": "udp", "address": "10.96.0.53", "port": 53,
                      "endpoint": "10.1.0.5:53", "reason": "endpoint gone"}]


def test_markdown_cuts_long_rules_to_fit_a_comment() -> None:
    payload = "".join(f"-A KUBE-SVC-X -j KUBE-SEP-{i}\n" for i in range(10_000))
    rules = RuleChange("iptables", "offline", False, ("iptables-nft IPv4: to change",), payload)
    text = render_markdown(DiffReport(StateDiff(), rules))
    assert len(text) < MARKDOWN_RULES_LIMIT + 1000
    assert "more lines: see `kproxy-nft diff -o text`" in text and text.endswith("</details>\n")


# ---------------------------------------------------------------------------------------------
# exit statuses; no root, no kernel
# ---------------------------------------------------------------------------------------------


def test_exit_0_when_same_1_when_different() -> None:
    assert invoke(OLD, OLD, *NODE_FLAGS).exit_code == 0
    assert invoke(OLD, NEW, *NODE_FLAGS).exit_code == 1


@pytest.mark.parametrize(("args", "message"), [
    ([OLD], "diff OLD NEW takes 2 manifest arguments, not 1"),
    (["--live", OLD, NEW], "diff --live NEW takes 1 manifest argument, not 2"),
    (["-", "-"], "only one side can be read from stdin"),
    ([OLD, str(GOLDEN / "missing.yaml")], "missing.yaml: cannot read"),
])
def test_bad_arguments_exit_2_with_one_line(args: list[str], message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr


def test_a_bad_document_is_named_like_dump_names_it(tmp_path: os.PathLike[str]) -> None:
    bad = os.path.join(tmp_path, "bad.yaml")
    with open(bad, "w") as f:
        f.write("apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: 99999}]}\n")
    result = invoke(OLD, bad)
    assert result.exit_code == 2
    assert result.stderr == ("kproxy-nft: error: " + bad + ": document 1 (Service default/x): spec.ports[0].port: "
                             "must be between 1 and 65535, inclusive, got 99999\n")


def test_paths_joined_with_commas_are_one_side(tmp_path: os.PathLike[str]) -> None:
    """OLD as two files (`a,b`) is the same cluster as the one file holding both."""
    text = (GOLDEN / "diff-old.yaml").read_text()
    first, second = (os.path.join(tmp_path, n) for n in ("a.yaml", "b.yaml"))
    split = text.index("---\napiVersion: v1\nkind: Service\nmetadata: {name: lb")
    with open(first, "w") as f:
        f.write(text[:split])
    with open(second, "w") as f:
        f.write(text[split:])
    assert invoke(f"{first},{second}", OLD, *NODE_FLAGS).exit_code == 0


def test_live_without_root_exits_2_saying_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 65534)
    result = invoke("--live", NEW, *NODE_FLAGS)
    assert result.exit_code == 2
    assert result.stderr.startswith("kproxy-nft: error: diff --live reads the rules the kernel holds, which needs root")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to become nobody")
def test_runs_as_nobody_without_a_kernel() -> None:
    """The CI-container use: an unprivileged user, no netns, no kernel rules read or written."""
    command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "kproxy_nft.cli",
               "diff", *golden_args("diff-change.nftables.md")]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/nonexistent"}
    result = subprocess.run(command, capture_output=True, text=True, cwd="/", env=env, check=False)
    assert (result.returncode, result.stderr) == (1, "")
    assert result.stdout == (GOLDEN / "diff-change.nftables.md").read_text()


# ---------------------------------------------------------------------------------------------
# the field tables, and properties
# ---------------------------------------------------------------------------------------------


def test_every_model_field_is_compared() -> None:
    """A new ServicePort or NodeContext field must be given a name in the diff (or it is never shown)."""
    assert set(SERVICE_FIELDS) == {f.name for f in dataclasses.fields(ServicePort)} - {"name"}
    assert set(NODE_FIELDS) == {f.name for f in dataclasses.fields(NodeContext)}


def test_a_node_change_alone_is_seen_through_the_services() -> None:
    """Same objects, another node (a Node object among the manifests changed its name): the
    Local-policy LB now has its endpoint here, so its LB IP and node port start answering."""
    state = read_manifests([OLD]).cluster_state()
    node_a, node_b = NodeContext(hostname="node-a"), NodeContext(hostname="node-b")
    diff = diff_states(state, state, node_a, node_b, offline_families(node_b))
    assert diff.node == (FieldChange("hostname", "node-a", "node-b"),)
    lb = next(s for s in diff.services if s.name.name == "lb")
    assert lb.status is Status.CHANGED and not lb.fields
    assert [(str(f.frontend), f.change) for f in lb.frontends] == [
        ("tcp 192.0.2.10:443", Answering.STARTS), ("tcp *:31443", Answering.STARTS)]


def cluster(docs: list[object], node: NodeContext) -> tuple[ClusterState, NodeContext]:
    """The state and node `load_inputs` would make of these documents."""
    manifests = read_manifests(["-"], stdin=io.StringIO(render(docs, "yaml").data.decode("utf-8", "surrogatepass")))
    return manifests.cluster_state(), with_service_cidrs(node, manifests)


def report(old: ClusterState, new: ClusterState, old_node: NodeContext, new_node: NodeContext,
           mode: str) -> DiffReport:
    families = {*offline_families(old_node), *offline_families(new_node)}
    state = diff_states(old, new, old_node, new_node, families)
    rules = offline_rules(old, ProxySettings(mode, old_node), new, ProxySettings(mode, new_node))
    return DiffReport(state, rules)


modes = st.sampled_from(["iptables", "nftables"])


@settings(max_examples=40, deadline=None)
@given(valid_documents(), nodes, modes)
def test_a_cluster_diffed_with_itself_is_empty(docs: list[object], node: NodeContext, mode: str) -> None:
    state, node = cluster(docs, node)
    result = report(state, state, node, node, mode)
    assert result.state == StateDiff()
    assert result.rules.is_empty, result.rules.payload
    assert not result.differs


@settings(max_examples=30, deadline=None)
@given(st.data(), valid_documents(), valid_documents(), nodes, modes)
def test_the_order_of_the_documents_never_matters(data: st.DataObject, old_docs: list[object], new_docs: list[object],
                                                   node: NodeContext, mode: str) -> None:
    shuffled = [data.draw(st.permutations(docs)) for docs in (old_docs, new_docs)]
    (old, old_node), (new, new_node) = cluster(old_docs, node), cluster(new_docs, node)
    (old2, old_node2), (new2, new_node2) = (cluster(docs, node) for docs in shuffled)
    assert as_json(report(old, new, old_node, new_node, mode)) == as_json(report(old2, new2, old_node2, new_node2,
                                                                                  mode))


def backwards(entry: ServicePortDiff) -> ServicePortDiff:
    """`entry` as the diff NEW → OLD shows it (the flows cleared are left out: they are not symmetric)."""
    status = {Status.ADDED: Status.REMOVED, Status.REMOVED: Status.ADDED}.get(entry.status, entry.status)
    return dataclasses.replace(
        entry, status=status, stale_flows=(),
        fields=tuple(FieldChange(c.field, c.new, c.old) for c in entry.fields),
        endpoints=tuple(dataclasses.replace(e, added=e.removed, removed=e.added) for e in entry.endpoints),
        frontends=tuple(dataclasses.replace(f, change=Answering.STOPS if f.change is Answering.STARTS
                                            else Answering.STARTS) for f in entry.frontends),
    )


def without_flows(diff: StateDiff) -> dict[str, ServicePortDiff]:
    entries = (dataclasses.replace(s, stale_flows=()) for s in diff.services)
    return {str(s.name) + s.name.protocol: s for s in entries if s.is_visible}


@settings(max_examples=60, deadline=None)
@given(valid_documents(), valid_documents(), nodes)
def test_swapping_old_and_new_swaps_added_and_removed(old_docs: list[object], new_docs: list[object],
                                                      node: NodeContext) -> None:
    (old, old_node), (new, new_node) = cluster(old_docs, node), cluster(new_docs, node)
    families = {*offline_families(old_node), *offline_families(new_node)}
    forwards = without_flows(diff_states(old, new, old_node, new_node, families))
    reverse_diff = diff_states(new, old, new_node, old_node, families)
    reverse = without_flows(reverse_diff)
    assert forwards.keys() == reverse.keys()
    for key, entry in forwards.items():
        # The type shown is NEW's (OLD's for a removed port): it flips with the sides.
        assert dataclasses.replace(backwards(entry), service_type=reverse[key].service_type) == reverse[key]
    forward_node = diff_states(old, new, old_node, new_node, families).node
    assert forward_node == tuple(FieldChange(c.field, c.new, c.old) for c in reverse_diff.node)


if __name__ == "__main__":
    for golden in GOLDENS:
        (GOLDEN / golden).write_text(CliRunner().invoke(main, ["diff", *golden_args(golden)]).stdout)
        print(f"wrote {golden}")
