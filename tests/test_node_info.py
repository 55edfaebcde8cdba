"""The Node object as the agent reads it: addresses (kube-proxy's GetNodeHostIPs) and zone."""

from __future__ import annotations

from kubernetes.client import V1Node

from kproxy_nft.convert import NodeInfo, convert_node


def node(addresses: list[tuple[str, str]], labels: dict[str, str] | None = None) -> V1Node:
    return V1Node.from_dict({
        "metadata": {"name": "node-a", "labels": labels or {}},
        "status": {"addresses": [{"type": t, "address": a} for t, a in addresses]},
    })


def test_internal_ip_is_primary_and_the_other_family_is_added() -> None:
    info = convert_node(node([("Hostname", "node-a"), ("ExternalIP", "203.0.113.5"), ("InternalIP", "10.0.0.5"),
                              ("InternalIP", "10.0.0.6"), ("ExternalIP", "2001:db8::5")],
                             {"topology.kubernetes.io/zone": "zone-a"}))
    assert info == NodeInfo(("10.0.0.5", "2001:db8::5"), "zone-a")


def test_external_ip_when_no_internal_and_malformed_addresses_are_skipped() -> None:
    assert convert_node(node([("InternalIP", "not-an-ip"), ("ExternalIP", "203.0.113.5")])) == NodeInfo(
        ("203.0.113.5",), None
    )


def test_no_status_no_labels() -> None:
    assert convert_node(V1Node.from_dict({"metadata": {"name": "n"}})) == NodeInfo((), None)
