"""`run --manifests DIR` (`ManifestSource`): only manifest files are watched, only changed files
are parsed again, and their changes go to the agent as watch events (issue 15, items 8 and 1)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from kproxy_nft.agent.http import ProxyHealth
from kproxy_nft.agent.metrics import new_metrics
from kproxy_nft.sources.events import Change, Event, Rejection, Replace
from kproxy_nft.sources.manifest_watch import ManifestSource
from tests.test_agent_invalid import service_doc, slice_doc

NODE = """\
apiVersion: v1
kind: Node
metadata: {{name: {name}, labels: {{topology.kubernetes.io/zone: zone-a}}}}
spec:
  podCIDRs: [{pod_cidr}]
  taints: [{{key: node.kubernetes.io/unschedulable, effect: NoSchedule}}]
status:
  addresses: [{{type: InternalIP, address: 192.0.2.10}}]
"""


class Watched:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.events: list[Event] = []
        self.source = ManifestSource([str(directory)], self.events.append, threading.Event(), node_name="node-1")

    def write(self, name: str, *docs: str) -> None:
        (self.directory / name).write_text("---\n".join(docs))

    def poll(self) -> list[Event]:
        self.events.clear()
        self.source.poll()
        return list(self.events)


def names(events: list[Event]) -> list[tuple[str, str, str]]:
    return [(e.resource, e.type, e.obj.metadata.name) for e in events if isinstance(e, Change)]


@pytest.fixture
def watched(tmp_path: Path) -> Watched:
    w = Watched(tmp_path)
    w.write("web.yaml", service_doc("web", "10.96.0.10"), slice_doc("web-1", "web", "10.1.0.1"))
    w.write("api.yaml", service_doc("api", "10.96.0.11"), slice_doc("api-1", "api", "10.1.0.2"))
    return w


def test_the_first_poll_hands_on_complete_lists(watched: Watched) -> None:
    events = watched.poll()
    lists = {e.resource: sorted(obj.metadata.name for obj in e.items) for e in events if isinstance(e, Replace)}
    assert lists == {"services": ["api", "web"], "endpointslices": ["api-1", "web-1"], "nodes": []}


def test_a_log_file_written_into_the_directory_is_never_parsed(watched: Watched) -> None:
    watched.poll()
    parsed = watched.source.parses
    log = watched.directory / "agent.log"
    for line in range(20):
        with log.open("a") as f:
            f.write(f"line {line}\n")
        assert watched.poll() == []
    (watched.directory / "notes.txt").write_text("kind: Service\n")
    assert watched.poll() == []
    assert watched.source.parses == parsed


def test_only_the_changed_file_is_parsed_and_its_objects_sent_as_changes(watched: Watched) -> None:
    watched.poll()
    parsed = watched.source.parses
    watched.write("api.yaml", service_doc("api", "10.96.0.21"))  # the slice api-1 is gone
    assert names(watched.poll()) == [("services", "MODIFIED", "api"), ("endpointslices", "DELETED", "api-1")]
    assert watched.source.parses == parsed + 1
    # Touched without a change: read again, not parsed again, nothing sent.
    os.utime(watched.directory / "web.yaml")
    assert watched.poll() == []
    assert watched.source.parses == parsed + 1


def test_an_edit_within_one_timestamp_tick_is_not_missed(watched: Watched) -> None:
    watched.poll()
    path = watched.directory / "api.yaml"
    stat = path.stat()
    watched.write("api.yaml", service_doc("api", "10.96.0.12"), slice_doc("api-1", "api", "10.1.0.2"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime: the stamp cannot tell
    assert ("services", "MODIFIED", "api") in names(watched.poll())


def test_an_object_moved_to_another_file_is_not_deleted(watched: Watched) -> None:
    watched.poll()
    watched.write("api.yaml", service_doc("api", "10.96.0.11"))
    watched.write("api-slices.yaml", slice_doc("api-1", "api", "10.1.0.2"))
    changes = names(watched.poll())
    assert ("endpointslices", "MODIFIED", "api-1") in changes
    assert not [change for change in changes if change[1] == "DELETED"]


def test_a_removed_file_deletes_its_objects(watched: Watched) -> None:
    watched.poll()
    (watched.directory / "web.yaml").unlink()
    assert sorted(names(watched.poll())) == [("endpointslices", "DELETED", "web-1"), ("services", "DELETED", "web")]


def test_this_nodes_node_object_is_handed_on_and_others_are_not(watched: Watched) -> None:
    watched.write("nodes.yaml", NODE.format(name="node-1", pod_cidr="10.1.0.0/24"),
                  NODE.format(name="node-2", pod_cidr="10.1.1.0/24"))
    events = watched.poll()
    (nodes,) = [e for e in events if isinstance(e, Replace) and e.resource == "nodes"]
    assert [node.metadata.name for node in nodes.items] == ["node-1"]
    watched.write("nodes.yaml", NODE.format(name="node-1", pod_cidr="10.1.0.0/24").replace(
        "taints: [", "taints: [{key: ToBeDeletedByClusterAutoscaler, value: '1700000000', effect: NoSchedule}, "))
    (change,) = [e for e in watched.poll() if isinstance(e, Change)]
    assert (change.resource, change.obj.spec.taints[0].key) == ("nodes", "ToBeDeletedByClusterAutoscaler")


@pytest.mark.parametrize(("bad", "message"), [
    ("pod_cidr='10.1.0.0/99'", "spec.podCIDRs[0]: '10.1.0.0/99' is not a valid CIDR (e.g. 10.0.0.0/16 or fd00::/108)"),
    ("pod_cidr='10.1.0.0/24, 10.2.0.0/24'", "spec.podCIDRs: must hold one CIDR per IP family"),
    ("effect", "spec.taints[0].effect: 'Sometimes' is not one of NoSchedule, PreferNoSchedule, NoExecute"),
    ("key", "spec.taints[0].key: 'bad key!' is not a valid qualified name"),
])
def test_a_malformed_node_is_one_line_naming_file_document_and_field(
        watched: Watched, bad: str, message: str) -> None:
    text = NODE.format(name="node-1", pod_cidr="10.1.0.0/24")
    if bad == "effect":
        text = text.replace("effect: NoSchedule", "effect: Sometimes")
    elif bad == "key":
        text = text.replace("key: node.kubernetes.io/unschedulable", "key: 'bad key!'")
    else:
        text = NODE.format(name="node-1", pod_cidr=bad.split("=", 1)[1].strip("'"))
    watched.write("node.yaml", service_doc("other", "10.96.0.30"), text)
    (rejection,) = [e for e in watched.poll() if isinstance(e, Rejection)]
    assert rejection.message == f"{watched.directory}/node.yaml: document 2 (Node node-1): {message}"
    assert rejection.kind == "Node" and "\n" not in rejection.message



def test_a_node_manifest_tainted_for_deletion_drains_healthz(watched: Watched) -> None:
    metrics = new_metrics()
    health = ProxyHealth(lambda: True, lambda: None, lambda: 0.0, metrics.healthz_requests, metrics.livez_requests)
    watched.write("node.yaml", NODE.format(name="node-1", pod_cidr="10.1.0.0/24"))
    for event in watched.poll():
        health.observe(event)
    assert health.healthz()[0] == 200
    watched.write("node.yaml", NODE.format(name="node-1", pod_cidr="10.1.0.0/24").replace(
        "taints: [", "taints: [{key: ToBeDeletedByClusterAutoscaler, value: '1700000000', effect: NoSchedule}, "))
    for event in watched.poll():
        health.observe(event)
    assert health.healthz()[0] == 503 and health.livez()[0] == 200
