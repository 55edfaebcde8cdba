"""The change tracker hands each sync exactly the services that changed, and the right state."""

from __future__ import annotations

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from kubernetes.client import V1EndpointSlice, V1Service

from kproxy_nft.agent.changes import ChangeTracker
from kproxy_nft.sources.manifests import read_manifests
from tests.helpers import EXAMPLES


def svc(name: str, ip: str, ns: str = "default") -> V1Service:
    return V1Service.model_validate(yaml.safe_load(f"""
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}}}
spec: {{clusterIP: {ip}, ports: [{{name: http, port: 80}}]}}
"""))


def eps(name: str, service: str, ips: list[str], ns: str = "default") -> V1EndpointSlice:
    endpoints = ", ".join(f"{{addresses: [{ip}]}}" for ip in ips)
    return V1EndpointSlice.model_validate(yaml.safe_load(f"""
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}, namespace: {ns}, labels: {{kubernetes.io/service-name: {service}}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{endpoints}]
"""))


def test_first_snapshot_is_full_then_only_changes() -> None:
    t = ChangeTracker()
    t.service_updated(svc("a", "10.96.0.1"))
    t.service_updated(svc("b", "10.96.0.2"))
    t.slice_updated(eps("a-1", "a", ["10.1.0.1"]))
    first = t.snapshot()
    assert first.full and first.changed == {("default", "a"), ("default", "b")}
    assert len(first.state.services) == 2
    t.slice_updated(eps("a-1", "a", ["10.1.0.1", "10.1.0.2"]))
    second = t.snapshot()
    assert not second.full and second.changed == {("default", "a")}
    (a_port,) = [n for n in second.state.services if n.name == "a"]
    assert second.changed_ports == {a_port}
    assert [ep.ip for ep in second.state.endpoints_of(a_port)] == ["10.1.0.1", "10.1.0.2"]
    # The earlier snapshot is unaffected.
    assert [ep.ip for ep in first.state.endpoints_of(a_port)] == ["10.1.0.1"]
    assert t.snapshot().changed == frozenset()


def test_unchanged_update_is_not_a_change_and_deletes_are() -> None:
    t = ChangeTracker()
    t.service_updated(svc("a", "10.96.0.1"))
    t.snapshot()
    t.service_updated(svc("a", "10.96.0.1"))
    assert t.pending == 0
    t.service_deleted(svc("a", "10.96.0.1"))
    snap = t.snapshot()
    assert snap.changed == {("default", "a")} and not snap.state.services
    assert [n.name for n in snap.changed_ports] == ["a"]  # a deleted port is a changed port too


def test_relist_removes_what_is_gone() -> None:
    t = ChangeTracker()
    t.replace_all([svc("a", "10.96.0.1"), svc("b", "10.96.0.2")], [eps("b-1", "b", ["10.1.0.9"])])
    t.snapshot()
    t.replace_all([svc("a", "10.96.0.1")], [])
    snap = t.snapshot()
    assert snap.changed == {("default", "b")}
    assert [n.name for n in snap.state.services] == ["a"] and not snap.state.endpoints


def bad_svc(name: str, ip: str) -> V1Service:
    obj = svc(name, ip)
    assert obj.spec is not None and obj.spec.ports is not None
    obj.spec.ports[0].port = 70000
    return obj


def bad_eps(name: str, service: str) -> V1EndpointSlice:
    obj = eps(name, service, ["10.1.0.1"])
    assert obj.endpoints
    obj.endpoints[0].addresses = ["not-an-ip"]
    return obj


def test_invalid_new_object_is_skipped_and_reported_once() -> None:
    t = ChangeTracker()
    t.service_updated(svc("b", "10.96.0.2"))
    t.service_updated(bad_svc("a", "10.96.0.1"))
    assert "spec.ports[0].port" in t.rejected[("Service", "default", "a")]
    (rejection,) = t.take_rejections()
    assert rejection.kind == "Service" and rejection.outcome == "skipped"
    assert rejection.message.startswith("Service default/a: spec.ports[0].port")
    snap = t.snapshot()
    assert [n.name for n in snap.state.services] == ["b"] and ("default", "a") not in snap.changed
    # A relist repeating the same invalid object is no news.
    t.replace_services([svc("b", "10.96.0.2"), bad_svc("a", "10.96.0.1")])
    assert t.take_rejections() == [] and t.pending == 0
    # Fixed: it is applied and no longer rejected.
    t.service_updated(svc("a", "10.96.0.1"))
    assert not t.rejected and t.snapshot().changed == {("default", "a")}


def test_invalid_update_keeps_the_previous_valid_version() -> None:
    t = ChangeTracker()
    t.service_updated(svc("a", "10.96.0.1"))
    t.slice_updated(eps("a-1", "a", ["10.1.0.1"]))
    before = t.snapshot().state
    t.service_updated(bad_svc("a", "10.96.0.9"))
    t.slice_updated(bad_eps("a-1", "a"))
    assert [(r.kind, r.outcome) for r in t.take_rejections()] == [
        ("Service", "kept its previous version"), ("EndpointSlice", "kept its previous version")]
    assert t.pending == 0
    snap = t.snapshot()
    assert snap.state == before and not snap.changed
    # The same invalid versions again (a relist): kept, not reported again.
    t.replace_all([bad_svc("a", "10.96.0.9")], [bad_eps("a-1", "a")])
    assert t.take_rejections() == [] and t.snapshot().state == before
    # A delete still deletes, and forgets the rejection.
    t.slice_deleted(bad_eps("a-1", "a"))
    assert ("EndpointSlice", "default", "a-1") not in t.rejected
    assert not t.snapshot().state.endpoints


def test_relist_forgets_rejections_of_objects_that_are_gone() -> None:
    t = ChangeTracker()
    t.replace_all([bad_svc("a", "10.96.0.1")], [bad_eps("a-1", "a")])
    assert len(t.take_rejections()) == 2 and len(t.rejected) == 2
    t.replace_all([], [])
    assert not t.rejected
    t.replace_all([bad_svc("a", "10.96.0.1")], [])  # back again: a new report
    assert [r.kind for r in t.take_rejections()] == ["Service"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["s1", "s2"]),
                          st.lists(st.integers(1, 6), max_size=4, unique=True)), max_size=12))
def test_incremental_snapshots_equal_a_fresh_build(events) -> None:  # type: ignore[no-untyped-def]
    """However events arrive, the tracker's state equals building from the final objects at once."""
    t = ChangeTracker()
    for name in ("a", "b", "c"):
        t.service_updated(svc(name, f"10.96.0.{ord(name)}"))
    final: dict[str, V1EndpointSlice] = {}
    for service, slice_name, hosts in events:
        obj = eps(f"{service}-{slice_name}", service, [f"10.1.0.{h}" for h in hosts])
        t.slice_updated(obj)
        final[f"{service}-{slice_name}"] = obj
        t.snapshot() if hosts and hosts[0] % 2 else None  # snapshot at arbitrary points
    fresh = ChangeTracker()
    fresh.replace_all([svc(n, f"10.96.0.{ord(n)}") for n in ("a", "b", "c")], list(final.values()))
    assert t.snapshot().state == fresh.snapshot().state


def test_seed_examples_through_the_tracker_equal_the_manifest_reader() -> None:
    manifests = read_manifests([str(EXAMPLES)])
    t = ChangeTracker()
    t.replace_all(list(manifests.services), list(manifests.endpoint_slices))
    assert t.snapshot().state == manifests.cluster_state()


def test_identical_slice_update_is_not_a_change() -> None:
    t = ChangeTracker()
    t.service_updated(svc("a", "10.96.0.1"))
    t.slice_updated(eps("a-1", "a", ["10.1.0.1"]))
    t.snapshot()
    t.replace_slices([eps("a-1", "a", ["10.1.0.1"])])
    assert t.pending == 0


def test_an_external_ip_on_another_services_cluster_ip_is_dropped_and_comes_back() -> None:
    """Conflicts are resolved in the snapshot, in O(changed): the loser's destination returns
    to it, as a changed port, when the winner goes."""
    from kubernetes.client import V1Service

    from kproxy_nft.model import ServicePortName

    def service(name: str, cluster_ip: str, external: list[str] | None = None) -> V1Service:
        return V1Service.from_dict({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": cluster_ip, "externalIPs": external, "ports": [{"port": 80}]},
        })

    t = ChangeTracker()
    t.replace_services([service("a", "10.96.0.1", ["10.96.0.2"]), service("b", "10.96.0.2")])
    t.replace_slices([])
    a, b = ServicePortName("default", "a", ""), ServicePortName("default", "b", "")
    state = t.snapshot().state
    assert state.services[a].external_ips == () and state.services[b].cluster_ips == ("10.96.0.2",)
    (warning,) = t.take_conflicts()
    assert "cluster IP of default/b keeps it" in warning
    t.service_deleted(service("b", "10.96.0.2"))
    snap = t.snapshot()
    assert snap.state.services[a].external_ips == ("10.96.0.2",)
    assert snap.changed_ports == {a, b} and t.take_conflicts() == []
