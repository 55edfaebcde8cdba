"""`convert_node`: a Node's podCIDRs and deletion state (issue 15, item 1), strict for manifests,
lenient for the API's own objects (the API server validated them; a surprise must not stop the agent)."""

from __future__ import annotations

import pytest
from kubernetes.client import V1Node

from kproxy_nft.convert import InvalidObject, convert_node


def node(spec: dict[str, object], **meta: object) -> V1Node:
    return V1Node.model_validate({"metadata": {"name": "node-1", **meta}, "spec": spec})


@pytest.mark.parametrize(("meta", "spec", "deleting"), [
    ({}, {}, False),
    ({"deletionTimestamp": "2024-05-01T10:00:00Z"}, {}, True),
    ({}, {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "value": "1714557600", "effect": "NoSchedule"}]}, True),
    ({}, {"taints": [{"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}, False),  # cordoned
], ids=["plain", "deletionTimestamp", "autoscaler-taint", "cordoned"])
def test_being_deleted(meta: dict[str, object], spec: dict[str, object], deleting: bool) -> None:
    assert convert_node(node(spec, **meta), strict=True).being_deleted is deleting


def test_pod_cidrs_dual_stack_and_the_older_single_field() -> None:
    assert convert_node(node({"podCIDRs": ["10.1.0.0/24", "fd00:1::/64"]})).pod_cidrs == ("10.1.0.0/24", "fd00:1::/64")
    assert convert_node(node({"podCIDR": "10.1.0.0/24"})).pod_cidrs == ("10.1.0.0/24",)


@pytest.mark.parametrize(("spec", "field"), [
    ({"podCIDRs": ["10.1.0.0/33"]}, "spec.podCIDRs[0]"),
    ({"podCIDRs": ["10.1.0.0/24", "10.2.0.0/24"]}, "spec.podCIDRs"),
    ({"podCIDR": "10.3.0.0/24", "podCIDRs": ["10.1.0.0/24"]}, "spec.podCIDR"),
    ({"taints": [{"key": "a/b/c", "effect": "NoSchedule"}]}, "spec.taints[0].key"),
    ({"taints": [{"key": "k", "value": "not a label value", "effect": "NoSchedule"}]}, "spec.taints[0].value"),
    ({"taints": [{"key": "k", "effect": "NoSchedule"}, {"key": "k", "effect": "NoSchedule"}]}, "spec.taints[1]"),
])
def test_strict_refuses_what_the_api_server_would_and_lenient_drops_bad_pod_cidrs(
        spec: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidObject) as caught:
        convert_node(node(spec), strict=True)
    assert caught.value.field == field
    if "podCIDRs" in spec or "podCIDR" in spec:
        assert convert_node(node(spec)).pod_cidrs == ()
