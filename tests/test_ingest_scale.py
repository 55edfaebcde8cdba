"""Bad input at cluster scale (issue 14): one bad object among 10,000, and objects too big to exist.

The promise of the manifest reader holds at any size: a malformed object among 10,000 gets the
one-line error naming the file, the document, the object and the field, and `dump` exits 2; an
object bigger than the API server could store, or a slice with more endpoints than it admits,
is refused with a message saying so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from kproxy_nft.cli import main
from kproxy_nft.convert import MAX_SLICE_ENDPOINTS
from kproxy_nft.lab.synthetic import synthetic_objects
from kproxy_nft.sources.manifests import MAX_OBJECT_BYTES, ManifestError, read_manifests

SERVICES = 10_000


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return synthetic_objects(SERVICES, 1)


def _dump(path: Path) -> Any:
    return CliRunner().invoke(main, ["dump", "-f", str(path)])


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_one_bad_port_among_ten_thousand_services(tmp_path: Path, cluster: dict[str, Any], fmt: str) -> None:
    bad = json.loads(json.dumps(cluster))
    bad["items"][7777]["spec"]["ports"][0]["port"] = 70000
    path = tmp_path / f"cluster.{fmt}"
    path.write_text(json.dumps(bad, indent=1))  # JSON is YAML too: PyYAML's dumper would take 12 s here
    result = _dump(path)
    assert result.exit_code == 2
    assert result.stderr == (f"kproxy-nft: error: {path}: document 1 (Service ns77/svc7777): spec.ports[0].port: "
                             "must be between 1 and 65535, inclusive, got 70000\n")


def test_one_wrongly_typed_field_among_ten_thousand_slices(tmp_path: Path, cluster: dict[str, Any]) -> None:
    """msgspec refuses the type; the client's model, asked about that object alone, names the field."""
    bad = json.loads(json.dumps(cluster))
    bad["items"][SERVICES + 4242]["endpoints"][0]["conditions"]["ready"] = "yes"
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(bad))
    result = _dump(path)
    assert result.exit_code == 2
    assert result.stderr == (f"kproxy-nft: error: {path}: document 1 (EndpointSlice ns42/svc4242-abcde): "
                             "endpoints[0].conditions.ready: Input should be a valid boolean\n")


def test_an_object_above_the_api_servers_size_limit_is_refused(tmp_path: Path) -> None:
    svc = synthetic_objects(1, 1)["items"][0]
    svc["metadata"]["annotations"] = {"example.com/blob": "x" * MAX_OBJECT_BYTES}
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(svc))
    with pytest.raises(ManifestError) as caught:
        read_manifests([str(path)])
    assert str(caught.value) == (f"{path}: document 1 (Service ns0/svc0): 1.5 MiB as JSON, above the 1.5 MiB the "
                                 "API server can store (etcd's --max-request-bytes): refused")


def test_a_slice_above_the_endpoint_limit_is_refused(tmp_path: Path) -> None:
    eps = synthetic_objects(1, MAX_SLICE_ENDPOINTS + 1)["items"][1]
    path = tmp_path / "slice.json"
    path.write_text(json.dumps(eps))
    with pytest.raises(ManifestError) as caught:
        read_manifests([str(path)])
    assert str(caught.value) == (f"{path}: document 1 (EndpointSlice ns0/svc0-abcde): endpoints: must have at most "
                                 f"{MAX_SLICE_ENDPOINTS} items")
