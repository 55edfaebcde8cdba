"""The API server's rules, and the bad-input probe's cases as regression tests.

Each case is a small edit of a valid manifest; every one must end in one `ManifestError` line
naming the file, the document and the field, with what came from the input quoted and cut.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kproxy_nft import validation as v
from kproxy_nft.sources.manifests import ManifestError, read_manifests
from tests.test_manifests import SERVICE, SLICE

INJECTION = 'fe80::1%lo -j RETURN\n-A KUBE-SERVICES -j DNAT --to-destination [fd00::666]:1'


def external_ips(*ips: str) -> str:
    return SERVICE.replace("  ports:\n", f"  externalIPs: [{', '.join(json.dumps(ip) for ip in ips)}]\n  ports:\n")


# (case, manifest text, what the message must contain)
CASES = [
    ("zone in externalIP (injection)", external_ips(INJECTION), "spec.externalIPs[0]: 'fe80::1%lo -j RETURN\\n"),
    ("zone in clusterIP", SERVICE.replace("10.96.0.10", '"fd00::10%eth0"'), "spec.clusterIP: 'fd00::10%eth0' must not"),
    ("zone in endpoint", SERVICE + "---\n" + SLICE.replace("addressType: IPv4", "addressType: IPv6")
     .replace("[10.1.0.5]", '["fd00::5%eth0"]'), "endpoints[0].addresses[0]: 'fd00::5%eth0' must not have"),
    ("zone in LB ingress", SERVICE.replace("spec:\n", "spec:\n  type: LoadBalancer\n")
     + 'status: {loadBalancer: {ingress: [{ip: "fd00::7%x"}]}}\n', "status.loadBalancer.ingress[0].ip"),
    ("name ending in a newline", SERVICE.replace("name: web,", 'name: "web\\n",'), "metadata.name: 'web\\n' is not"),
    ("namespace ending in a newline", SERVICE.replace("namespace: shop}", 'namespace: "shop\\n"}'),
     "metadata.namespace: 'shop\\n'"),
    ("port name ending in a newline", SERVICE.replace("name: http,", 'name: "http\\n",'), "spec.ports[0].name"),
    ("slice service label with a newline", SERVICE + "---\n" + SLICE.replace("service-name: web}",
                                                                              'service-name: "web\\n"}'),
     "metadata.labels[kubernetes.io/service-name]: 'web\\n'"),
    ("duplicate port and protocol", SERVICE + "  - {name: other, port: 80}\n",
     "spec.ports[1]: duplicate port/protocol"),
    ("duplicate nodePort", SERVICE.replace("spec:\n", "spec:\n  type: NodePort\n").replace(
        "targetPort: 8080}", "nodePort: 30080}") + "  - {name: b, port: 81, nodePort: 30080}\n",
     "spec.ports[1].nodePort: duplicate nodePort/protocol"),
    ("nodePort on a ClusterIP", SERVICE.replace("targetPort: 8080}", "nodePort: 30080}"), "spec.ports[0].nodePort"),
    ("loopback externalIP", external_ips("127.0.0.1"), "may not be in the loopback range"),
    ("unspecified externalIP", external_ips("0.0.0.0"), "may not be unspecified"),
    ("link-local multicast externalIP", external_ips("224.0.0.1"), "link-local multicast"),
    ("link-local endpoint", SERVICE + "---\n" + SLICE.replace("10.1.0.5", "169.254.169.254"), "link-local range"),
    ("loopback endpoint", SERVICE + "---\n" + SLICE.replace("10.1.0.5", "127.0.0.1"), "loopback range"),
    ("loopback clusterIP", SERVICE.replace("10.96.0.10", "127.0.0.1"), "spec.clusterIP: may not be in the loopback"),
    ("unspecified clusterIP", SERVICE.replace("10.96.0.10", "0.0.0.0"), "spec.clusterIP: may not be unspecified"),
    ("broadcast clusterIP", SERVICE.replace("10.96.0.10", "255.255.255.255"), "may not be the broadcast address"),
    ("multicast clusterIP", SERVICE.replace("10.96.0.10", "239.1.1.1"), "may not be a multicast address"),
    ("IPv4-mapped IPv6", SERVICE.replace("10.96.0.10", '"::ffff:10.96.0.10"'), "IPv4-mapped"),
    ("non-canonical IPv6", SERVICE.replace("10.96.0.10", '"FD00::10"'), "must be written canonically"),
    ("port of 5,000 digits", SERVICE.replace("port: 80,", f"port: {'9' * 5000},"), "malformed YAML"),
    ("targetPort of 5,000 digits", SERVICE.replace("targetPort: 8080", f"targetPort: '{'9' * 5000}'"),
     "spec.ports[0].targetPort"),
    ("targetPort name without a letter", SERVICE.replace("targetPort: 8080", "targetPort: 80-80"), "IANA"),
    ("source range with a zone", SERVICE.replace("spec:\n", "spec:\n  type: LoadBalancer\n"
                                                 '  loadBalancerSourceRanges: ["fd00::/8%x"]\n'),
     "spec.loadBalancerSourceRanges[0]"),
    ("source ranges on a ClusterIP", SERVICE.replace("spec:\n", "spec:\n  loadBalancerSourceRanges: [10.0.0.0/8]\n"),
     "may only be used when `type` is 'LoadBalancer'"),
    ("trafficDistribution", SERVICE.replace("spec:\n", "spec:\n  trafficDistribution: Nearest\n"),
     "spec.trafficDistribution: unsupported value 'Nearest'"),
    ("ipMode", SERVICE.replace("spec:\n", "spec:\n  type: LoadBalancer\n")
     + "status: {loadBalancer: {ingress: [{ip: 192.0.2.1, ipMode: Direct}]}}\n", "ipMode: unsupported value"),
    ("slice nodeName", SERVICE + "---\n" + SLICE + "  nodeName: Node_1\n", "endpoints[1].nodeName: 'Node_1'"),
    ("slice zone", SERVICE + "---\n" + SLICE + '  zone: "a zone"\n', "endpoints[1].zone: 'a zone'"),
    ("slice hints", SERVICE + "---\n" + SLICE + "  hints: {forZones: [" + ", ".join(
        f"{{name: z{i}}}" for i in range(9)) + "]}\n", "endpoints[1].hints.forZones: must have at most 8"),
    ("slice port 0", SERVICE + "---\n" + SLICE.replace("port: 8080,", "port: 0,"), "ports[0].port: must be between"),
    ("slice duplicate port names", SERVICE + "---\n" + SLICE.replace(
        "protocol: TCP}]", "protocol: TCP}, {name: http, port: 53, protocol: UDP}]"), "ports[1].name: duplicate"),
    ("Endpoints with a zone", SERVICE + "---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: web, namespace: shop}\n"
     'subsets: [{addresses: [{ip: "fe80::1%eth0"}], ports: [{port: 80}]}]\n', "subsets[0].addresses[0].ip"),
    ("ServiceCIDR with host bits", "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: x}\n"
     "spec: {cidrs: [10.96.0.1/12]}\n", "spec.cidrs[0]: '10.96.0.1/12' must be written canonically as '10.96.0.0/12'"),
    ("ServiceCIDR of one family twice", "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata: {name: x}\n"
     "spec: {cidrs: [10.96.0.0/12, 10.128.0.0/12]}\n", "one CIDR per IP family"),
]


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in CASES], ids=[c[0] for c in CASES])
def test_refused_with_one_line_naming_file_document_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ManifestError) as err:
        read_manifests([str(path)])
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message and len(message) < 600, message
    assert expected in message, message


MESSAGE_CASES = [
    ("control character", SERVICE.replace("web", "w\x07eb"), "bad.yaml: position 48: malformed YAML: control "
     "characters are not allowed (character #x0007)"),
    ("empty JSON", "", "bad.json: line 1 column 1: malformed JSON: Expecting value"),
    ("JSON nested 1,000 deep", "[" * 1000 + "]" * 1000, "bad.json: malformed JSON: nested too deeply"),
    ("name with a newline in the document's description",
     json.dumps({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web\n-A X", "namespace": "shop"},
                 "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}}),
     "bad.json: document 1 (Service shop/'web\\n-A X'): metadata.name"),
]


@pytest.mark.parametrize(("text", "expected"), [(t, e) for _, t, e in MESSAGE_CASES], ids=[c[0] for c in MESSAGE_CASES])
def test_syntax_errors_are_one_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / ("bad.yaml" if expected.startswith("bad.yaml") else "bad.json")
    path.write_text(text)
    with pytest.raises(ManifestError) as err:
        read_manifests([str(path)])
    message = str(err.value)
    assert "\n" not in message and message.endswith(expected) or expected in message, message
    assert "::" not in message


def test_a_huge_name_is_shown_cut(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(SERVICE.replace("name: web,", f"name: {'a' * 1_000_000},"))
    with pytest.raises(ManifestError) as err:
        read_manifests([str(path)])
    assert len(str(err.value)) < 400 and "(1000000 characters)" in str(err.value)


def test_lenient_reading_skips_only_the_bad_documents(tmp_path: Path) -> None:
    (tmp_path / "good.yaml").write_text(SERVICE + "---\n" + SLICE)
    (tmp_path / "bad.yaml").write_text(external_ips("fe80::1%eth0").replace("name: web,", "name: other,"))
    (tmp_path / "broken.yaml").write_text("kind: [\n")
    errors: list[ManifestError] = []
    manifests = read_manifests([str(tmp_path)], on_error=errors.append)
    assert [s.metadata.name for s in manifests.services] == ["web"]
    assert len(manifests.endpoint_slices) == 1
    assert sorted((Path(e.source).name, e.kind) for e in errors) == [("bad.yaml", "Service"), ("broken.yaml", "")]


@pytest.mark.parametrize("good", ["10.0.0.1", "fd00::1", "2001:db8::10", "64:ff9b::c000:201"])
def test_plain_addresses_pass(good: str) -> None:
    assert v.non_special_ip(good, "f") == good


@pytest.mark.parametrize("bad", ["fe80::1%eth0", "10.0.0.1%x", "010.0.0.1", "10.0.0.1 ", " 10.0.0.1", "10.0.0.1\n",
                                 "fd00::1/64", "", "ff02::1", "::", "::1", 10, None])
def test_odd_addresses_fail(bad: object) -> None:
    with pytest.raises(v.InvalidObject):
        v.non_special_ip(bad, "f")


def test_names_are_matched_whole() -> None:
    for bad in ("web\n", "web\n-A", "-web", "web-", "Web", "w" * 64):
        with pytest.raises(v.InvalidObject):
            v.name(bad, "f", v.DNS1035_LABEL, "name", 63)
    assert v.name("web-1", "f", v.DNS1035_LABEL, "name", 63) == "web-1"


def test_source_ranges_are_spelled_canonically_with_host_bits_kept() -> None:
    assert v.cidr("FD00::1/8", "f") == "fd00::1/8"
    assert v.cidr("10.1.2.3/8", "f") == "10.1.2.3/8"


def test_dump_warns_once_per_conflict_and_keeps_going(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from kproxy_nft.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(SERVICE.replace("name: web,", "name: a,") + "---\n" + external_ips("10.96.0.10").replace(
        "name: web,", "name: b,").replace("10.96.0.10\n", "10.96.0.11\n"))
    result = CliRunner().invoke(main, ["dump", "-f", str(path)])
    assert result.exit_code == 0
    assert result.stderr == ("kproxy-nft: warning: 10.96.0.10:80/TCP is claimed twice: cluster IP of shop/a:http keeps "
                             "it; externalIP of shop/b:http is not programmed there (allocated addresses win over "
                             "externalIPs, then name order)\n")
    # Neither has endpoints: one REJECT for a's cluster IP, none for b's lost externalIP.
    assert result.stdout.count("-d 10.96.0.10 ") == 1 and "shop/b:http has no endpoints" in result.stdout
