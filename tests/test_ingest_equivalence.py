"""The fast reading path (`slim`: msgspec, libyaml events) gives exactly what the old one gave.

The old path decoded with `json.loads` / PyYAML's `CSafeLoader` and validated with the client's
pydantic models; `read_manifests(..., fast=False)` still does. For generated Services,
EndpointSlices, Endpoints and ServiceCIDRs, valid and hostile alike (tests/fuzz_strategies.py),
both paths must accept the same files with the same objects (every attribute the callers read)
and the same models, and refuse the same files with the same one-line message.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import msgspec
import pydantic
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kproxy_nft import validation
from kproxy_nft.convert import InvalidObject, convert_node
from kproxy_nft.sources import slim
from kproxy_nft.sources.manifests import ManifestError, Manifests, read_manifests
from tests.fuzz_strategies import (
    NON_CANONICAL_IPS,
    SPECIAL_IPS,
    ManifestFile,
    affixed_files,
    attacked_files,
    corrupted,
    mutated_files,
    raw_injected_files,
    valid_files,
)
from tests.test_fuzz_manifests import default_recursion_limit


def equivalence(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, report_multiple_bugs=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


def attributes(obj: Any) -> Any:
    """An object tree as the callers see it: attribute names → values, whatever the classes."""
    if isinstance(obj, pydantic.BaseModel):
        return {name: attributes(getattr(obj, name)) for name in type(obj).model_fields}
    if isinstance(obj, msgspec.Struct):
        return {name: attributes(getattr(obj, name)) for name in obj.__struct_fields__}
    if isinstance(obj, list):
        return [attributes(item) for item in obj]
    if isinstance(obj, dict):
        return {key: attributes(value) for key, value in obj.items()}
    return obj


def what_is_read(manifests: Manifests) -> tuple[Any, ...]:
    """Everything a caller of `read_manifests` can get from its result."""
    warnings: list[str] = []
    state = manifests.cluster_state(warnings.append)
    return (
        state, warnings, manifests.notices, manifests.service_cidrs,
        manifests.service_infos(), manifests.slice_endpoints(),
        [attributes(s) for s in manifests.services], [attributes(s) for s in manifests.endpoint_slices],
        [(attributes(n), convert_node(n)) for n in manifests.nodes],
    )


def read_both_ways(path: Path) -> tuple[Any, Any]:
    results = []
    for fast in (False, True):
        with default_recursion_limit():
            try:
                results.append(what_is_read(read_manifests([str(path)], fast=fast)))
            except ManifestError as e:
                results.append(("refused", str(e), e.source, e.kind))
            errors: list[ManifestError] = []  # the agent's --manifests: bad documents skipped
            kept = what_is_read(read_manifests([str(path)], on_error=errors.append, fast=fast))
            results[-1] = (results[-1], kept, [(str(e), e.source, e.kind) for e in errors])
    return results[0], results[1]


def read_models_only(path: Path) -> Any:
    """The fast path as `dump` and `apply` read (`keep_objects=False`): all but the objects."""
    try:
        with default_recursion_limit():
            manifests = read_manifests([str(path)], keep_objects=False)
    except ManifestError as e:
        return ("refused", str(e), e.source, e.kind)
    assert manifests.services == () and manifests.endpoint_slices == ()
    return without_objects(what_is_read(manifests))


def without_objects(read: Any) -> Any:
    """`what_is_read`'s figures but the Service and EndpointSlice objects (a refusal as it is)."""
    return read if read[0] == "refused" else (*read[:6], read[8])


def assert_same(file: ManifestFile, directory: Path) -> None:
    path = file.write(directory)
    old, new = read_both_ways(path)
    assert new == old
    assert read_models_only(path) == without_objects(new[0])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("equivalence")


# Each kind of generated file, and how many examples of it (the fuzz tests' proportions).
GENERATED = {
    "valid": (valid_files(), 150),
    "mutated": (mutated_files(), 300),
    "hostile values": (attacked_files(), 300),
    "affixed strings": (affixed_files(), 150),
    "odd syntax": (raw_injected_files(), 150),
    "corrupted bytes": (corrupted(mutated_files(max_mutations=1)), 100),
}


@pytest.mark.parametrize("kind", GENERATED)
def test_generated_files_read_alike(workdir: Path, kind: str) -> None:
    files, examples = GENERATED[kind]

    @equivalence(examples)
    @given(files)
    def read_alike(file: ManifestFile) -> None:
        assert_same(file, workdir)

    read_alike()


@equivalence(150)
@given(valid_files())
def test_valid_files_take_the_fast_path(workdir: Path, monkeypatch: pytest.MonkeyPatch, file: ManifestFile) -> None:
    """No document of a valid file needs the old path (else the fast path would be for show)."""

    def fail(*args: object) -> None:
        raise AssertionError("the fast path fell back to the client's models")

    monkeypatch.setattr("kproxy_nft.sources.manifests._client_model", fail)
    with default_recursion_limit():
        read_manifests([str(file.write(workdir))])


# ---------------------------------------------------------------------------------------------
# corners the generators rarely reach: where msgspec is stricter than pydantic, the old path decides
# ---------------------------------------------------------------------------------------------

SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
           "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}
NODE = {"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node1", "labels": {"topology.kubernetes.io/zone": "a"}},
        "spec": {"podCIDRs": ["10.1.0.0/24"], "taints": [{"key": "k", "effect": "NoSchedule"}]},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]}}


def _with(document: dict[str, Any], *path_and_value: Any) -> dict[str, Any]:
    out: Any = msgspec.json.decode(msgspec.json.encode(document))
    *path, key, value = path_and_value
    node = out
    for part in path:
        node = node[part]
    node[key] = value
    return dict(out)


CORNERS = [
    SERVICE,
    NODE,
    _with(SERVICE, "metadata", "creationTimestamp", "2026-01-01T00:00:00Z"),
    _with(SERVICE, "metadata", "creationTimestamp", "2026-01-01"),  # pydantic takes a date; msgspec does not
    _with(SERVICE, "metadata", "creationTimestamp", 1700000000),  # pydantic takes a Unix time
    _with(SERVICE, "metadata", "creationTimestamp", "2026-02-30T00:00:00Z"),
    _with(SERVICE, "spec", "cluster_ip", "10.96.0.1"),  # the client takes snake_case names too
    _with(SERVICE, "spec", "ports", 0, "target_port", 8080),
    _with(SERVICE, "spec", "ports", 0, "port", 10**30),
    _with(SERVICE, "spec", "ports", 0, "port", True),
    _with(SERVICE, "spec", "ports", 0, "port", 80.0),
    _with(SERVICE, "spec", "unknownField", 1),
    _with(SERVICE, "metadata", "labels", {"a": 1}),
    _with(NODE, "metadata", "deletionTimestamp", "2026-01-01T00:00:00+02:00"),
    _with(NODE, "spec", "taints", 0, "timeAdded", "garbage"),
]


@pytest.mark.parametrize("fmt", ["json", "yaml"])
@pytest.mark.parametrize("document", CORNERS, ids=range(len(CORNERS)))
def test_corners_read_alike(tmp_path: Path, document: dict[str, Any], fmt: str) -> None:
    text = msgspec.json.encode(document).decode() if fmt == "json" else yaml.safe_dump(document)
    assert_same(ManifestFile(f".{fmt}", text.encode()), tmp_path)


def test_a_yaml_timestamp_is_a_time_on_both_paths(tmp_path: Path) -> None:
    path = tmp_path / "svc.yaml"
    path.write_text(yaml.safe_dump(SERVICE) + "\n".join(["", "---", yaml.safe_dump(NODE).replace(
        "metadata:\n", "metadata:\n  deletionTimestamp: 2026-01-01 10:00:00\n")]))
    old, new = read_both_ways(path)
    assert new == old
    node = read_manifests([str(path)]).nodes[0]
    assert node.metadata.deletion_timestamp == datetime.datetime(2026, 1, 1, 10)
    assert convert_node(node).being_deleted


def test_the_slim_objects_are_structs(tmp_path: Path) -> None:
    """The fast path really is taken for plain input: no pydantic model is made."""
    path = tmp_path / "svc.json"
    path.write_bytes(msgspec.json.encode({"apiVersion": "v1", "kind": "List", "items": [SERVICE, NODE]}))
    manifests = read_manifests([str(path)])
    assert all(isinstance(obj, msgspec.Struct) for obj in (*manifests.services, *manifests.nodes))
    assert slim.STRUCTS  # generated from the client's models at import


# ---------------------------------------------------------------------------------------------
# validation's shortcuts (both paths take them, so the properties above cannot see them)
# ---------------------------------------------------------------------------------------------

ADDRESS_TEXTS = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.from_regex(r"[0-9]{1,4}\.[0-9]{1,4}\.[0-9]{1,4}\.[0-9]{1,4}", fullmatch=True),
    st.sampled_from([*SPECIAL_IPS, *NON_CANONICAL_IPS, "1.2.3.4 ", "1.2.3.4\n", "١.2.3.4", "+1.2.3.4", ""]),
)


def _verdict(check: Any, value: str) -> str:
    try:
        return f"ok {check(value, 'spec.field')}"
    except InvalidObject as e:
        return f"refused {e}"


@settings(max_examples=2000, deadline=None)
@given(ADDRESS_TEXTS)
def test_the_ipv4_shortcut_and_the_cache_decide_as_ipaddress_does(value: str) -> None:
    fast = [_verdict(check, value) for check in (validation.non_special_ip, validation.service_ip)]
    with pytest.MonkeyPatch.context() as patch:  # the whole way, through `ipaddress`, every time
        patch.setattr(validation, "_plain_ipv4", lambda value: False)
        patch.setattr(validation, "_non_special_ip_text", lambda value: validation._non_special_ip(value, ""))
        slow = [_verdict(check, value) for check in (validation.non_special_ip, validation.service_ip)]
    assert fast == slow


def test_a_timestamp_with_a_lone_surrogate_reads_alike(tmp_path: Path) -> None:
    """JSON's `\\ud800` escape gives a string msgspec cannot parse a time from (no UTF-8): the
    client's model decides, as on the old path (found by the fuzzed files above)."""
    text = json.dumps(_with(SERVICE, "metadata", "creationTimestamp", "\ud800"))
    assert_same(ManifestFile(".json", text.encode()), tmp_path)
