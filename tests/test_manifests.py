"""The manifest reader: the shapes people have, and one clear line for every bad input."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kproxy_nft.model import Protocol, ServicePortName
from kproxy_nft.sources.manifests import ManifestError, read_file, read_manifests
from tests.helpers import EXAMPLES

SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: 8080}
"""
SLICE = """\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.1.0.5]
- addresses: [10.1.0.6]
  conditions: {ready: false}
"""
WEB = ServicePortName("shop", "web", "http", Protocol.TCP)


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_seed_examples_give_three_service_ports_with_three_endpoints() -> None:
    state = read_manifests([str(EXAMPLES)]).cluster_state()
    assert sorted(str(n) for n in state.services) == [
        "default/sample-clusterip-multi:http-port",
        "default/sample-clusterip-multi:https-port",
        "default/sample-clusterip:http-port",
    ]
    https = ServicePortName("default", "sample-clusterip-multi", "https-port", Protocol.TCP)
    assert [ep.address for ep in state.endpoints_of(https)] == ["10.1.0.47:443", "10.1.0.48:443", "10.1.0.49:443"]


def test_multi_document_yaml_and_missing_ready_counts_as_ready(tmp_path: Path) -> None:
    path = write(tmp_path, "all.yaml", SERVICE + "---\n" + SLICE)
    state = read_manifests([path]).cluster_state()
    assert [(ep.ip, ep.ready) for ep in state.endpoints_of(WEB)] == [("10.1.0.5", True), ("10.1.0.6", False)]
    assert state.services[WEB].target_port == 8080


def test_kind_list_as_kubectl_prints_it(tmp_path: Path) -> None:
    import yaml

    items = [yaml.safe_load(SERVICE), yaml.safe_load(SLICE)]
    path = write(tmp_path, "list.yaml", yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items}))
    assert WEB in read_manifests([path]).cluster_state().services


def test_directories_are_searched_recursively_and_json_is_read(tmp_path: Path) -> None:
    import yaml

    write(tmp_path, "a/svc.yml", SERVICE)
    write(tmp_path, "a/b/slice.json", json.dumps(yaml.safe_load(SLICE)))
    write(tmp_path, "a/b/notes.txt", "not a manifest")
    state = read_manifests([str(tmp_path)]).cluster_state()
    assert len(state.endpoints_of(WEB)) == 2


def test_stdin(tmp_path: Path) -> None:
    state = read_manifests(["-"], stdin=io.StringIO(SERVICE + "---\n" + SLICE)).cluster_state()
    assert WEB in state.services


def test_other_kinds_are_skipped_with_a_notice(tmp_path: Path) -> None:
    path = write(tmp_path, "x.yaml", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\n" + SERVICE)
    manifests = read_manifests([path])
    assert len(manifests.services) == 1
    assert len(manifests.notices) == 1 and "document 1 (Deployment default/d): skipped" in manifests.notices[0]


def test_headless_externalname_and_other_proxy_services_get_no_rules(tmp_path: Path) -> None:
    headless = SERVICE.replace("clusterIP: 10.96.0.10", "clusterIP: None")
    external = "apiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec: {type: ExternalName, externalName: a.b}\n"
    label = "labels: {service.kubernetes.io/service-proxy-name: x}"
    other = SERVICE.replace("namespace: shop}", f"namespace: shop, {label}}}")
    for text in (headless, external, other):
        assert read_manifests([write(tmp_path, "s.yaml", text)]).cluster_state().services == {}


def test_legacy_endpoints_become_a_slice(tmp_path: Path) -> None:
    endpoints = """\
apiVersion: v1
kind: Endpoints
metadata: {name: web, namespace: shop}
subsets:
- addresses: [{ip: 10.1.0.7, nodeName: n1}]
  notReadyAddresses: [{ip: 10.1.0.8}]
  ports: [{name: http, port: 8080}]
"""
    state = read_manifests([write(tmp_path, "e.yaml", SERVICE + "---\n" + endpoints)]).cluster_state()
    assert [(ep.address, ep.ready, ep.node_name) for ep in state.endpoints_of(WEB)] == [
        ("10.1.0.7:8080", True, "n1"),
        ("10.1.0.8:8080", False, None),
    ]


BAD = [
    ("malformed YAML", "apiVersion: v1\nkind: Service\nmetadata: {name: web\n", "line 4 column 1: malformed YAML"),
    ("wrong type", SERVICE.replace("port: 80,", "port: eighty,"), "document 1 (Service shop/web): spec.ports[0].port"),
    ("invalid IP", SERVICE.replace("10.96.0.10", "10.96.0.300"), "spec.clusterIP: '10.96.0.300' is not a valid IP"),
    ("port 0", SERVICE.replace("port: 80,", "port: 0,"), "spec.ports[0].port: must be between 1 and 65535"),
    ("port 70000", SERVICE.replace("port: 80,", "port: 70000,"), "spec.ports[0].port: must be between 1 and 65535"),
    ("protocol", SERVICE.replace("port: 80,", "port: 80, protocol: ICMP,"), "spec.ports[0].protocol: unsupported"),
    ("no label", SERVICE + "---\n" + SLICE.replace("  labels: {kubernetes.io/service-name: web}\n", ""),
     "document 2 (EndpointSlice shop/web-abc): metadata.labels[kubernetes.io/service-name]: required"),
    ("duplicate port names", SERVICE + "  - {name: http, port: 81}\n", "spec.ports[1].name: duplicate port name"),
    ("health check port without LB+Local", SERVICE.replace("spec:\n", "spec:\n  healthCheckNodePort: 32000\n", 1),
     "spec.healthCheckNodePort: may only be set when type is 'LoadBalancer'"),
    ("bad name", SERVICE.replace("name: web,", "name: Web_1,"), "metadata.name: 'Web_1' is not a valid Service name"),
    ("slice IP", SERVICE + "---\n" + SLICE.replace("10.1.0.5", "fd00::1"),
     "endpoints[0].addresses[0]: must be an IPv4"),
]


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in BAD], ids=[b[0] for b in BAD])
def test_bad_input_names_file_document_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(ManifestError) as err:
        read_manifests([path])
    message = str(err.value)
    assert message.startswith(path) and expected in message and "\n" not in message


def test_cli_bad_input_exits_2_with_nothing_on_stdout(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", BAD[4][1])
    result = subprocess.run([sys.executable, "-m", "kproxy_nft.cli", "dump", "-f", path],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "spec.ports[0].port" in result.stderr


def test_cli_missing_file_exits_2(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "kproxy_nft.cli", "dump", "-f", str(tmp_path / "nope.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == "" and "cannot read" in result.stderr


def test_unset_serving_counts_as_serving_like_kube_proxy(tmp_path: Path) -> None:
    """A terminating endpoint that never reported `serving` still takes the fallback traffic."""
    terminating = SLICE.replace("  conditions: {ready: false}", "  conditions: {ready: false, terminating: true}")
    terminating = terminating.replace("- addresses: [10.1.0.5]\n", "")
    state = read_manifests([write(tmp_path, "t.yaml", SERVICE + "---\n" + terminating)]).cluster_state()
    (ep,) = state.endpoints_of(WEB)
    assert (ep.ready, ep.serving, ep.terminating) == (False, True, True)


def test_duplicate_address_across_slices_prefers_the_non_terminating_copy(tmp_path: Path) -> None:
    second = SLICE.replace("name: web-abc", "name: web-def").replace(
        "- addresses: [10.1.0.5]\n", "- addresses: [10.1.0.5]\n  conditions: {ready: false, terminating: true}\n")
    path = write(tmp_path, "d.yaml", SERVICE + "---\n" + second + "---\n" + SLICE)
    eps = read_manifests([path]).cluster_state().endpoints_of(WEB)
    assert [(ep.ip, ep.terminating) for ep in eps] == [("10.1.0.5", False), ("10.1.0.6", False)]


def test_slice_port_without_a_name_is_ignored_with_a_notice(tmp_path: Path) -> None:
    unnamed = SLICE.replace("ports: [{name: http, port: 8080, protocol: TCP}]", "ports: [{port: 8080}]")
    manifests = read_manifests([write(tmp_path, "u.yaml", SERVICE + "---\n" + unnamed)])
    assert manifests.cluster_state().endpoints_of(WEB) == ()
    assert any("ports[0]: ignored: no name" in n for n in manifests.notices)


def test_external_policy_local_is_honoured_only_for_externally_accessible_services(tmp_path: Path) -> None:
    from kproxy_nft.model import TrafficPolicy

    local = SERVICE.replace("  clusterIP: 10.96.0.10\n", "  clusterIP: 10.96.0.10\n  externalTrafficPolicy: Local\n")
    with_external_ip = local.replace("  ports:\n", "  externalIPs: [192.0.2.10]\n  ports:\n")
    policy = {
        text: read_manifests([write(tmp_path, "p.yaml", text)]).cluster_state().services[WEB].external_traffic_policy
        for text in (local, with_external_ip)
    }
    assert policy == {local: TrafficPolicy.CLUSTER, with_external_ip: TrafficPolicy.LOCAL}


def _kubectl_json(items: list[dict[str, object]], newline: str = "\n") -> str:
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items}, indent=4).replace("\n", newline)


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
@pytest.mark.parametrize("note", ["ascii", "ünïcödé ✓"])
def test_a_json_file_reads_as_its_text_does_whatever_its_characters_and_line_breaks(
    tmp_path: Path, newline: str, note: str
) -> None:
    """Plain ASCII JSON files are read as bytes (issue 14); any other file is decoded to text
    first, as before. Either way the result is what the same text gives through stdin."""
    import yaml

    service = yaml.safe_load(SERVICE)
    service["metadata"]["annotations"] = {"note": note}
    text = _kubectl_json([service, yaml.safe_load(SLICE)], newline)
    path = tmp_path / "cluster.json"
    path.write_bytes(text.encode())
    from_file = read_manifests([str(path)])
    from_stdin = read_manifests(["-"], stdin=io.StringIO(text.replace("\r\n", "\n").replace("\r", "\n")))
    assert from_file.cluster_state() == from_stdin.cluster_state()
    assert len(from_file.cluster_state().endpoints_of(WEB)) == 2


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_an_ascii_json_file_with_a_bad_object_names_the_same_line_as_its_text_does(
    tmp_path: Path, newline: str
) -> None:
    import yaml

    text = _kubectl_json([yaml.safe_load(SERVICE), yaml.safe_load(SLICE)], newline)
    broken = text.replace('"port": 80,', '"port": 80,,')  # a syntax error: the whole text is decoded again
    path = tmp_path / "cluster.json"
    path.write_bytes(broken.encode())
    with pytest.raises(ManifestError) as from_file:
        read_manifests([str(path)])
    with pytest.raises(ManifestError) as from_text:  # the same file's text, as text mode reads it
        read_file(broken.replace("\r\n", "\n").replace("\r", "\n"), str(path))
    assert str(from_file.value) == str(from_text.value)
    assert str(from_file.value).endswith("cluster.json: line 17 column 36: malformed JSON: Expecting property name "
                                         "enclosed in double quotes")


def test_a_json_file_that_is_not_utf8_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    path.write_bytes(_kubectl_json([]).encode().replace(b'"List"', b'"L\xffst"'))
    with pytest.raises(ManifestError, match=r"cluster.json: not UTF-8 text"):
        read_manifests([str(path)])
