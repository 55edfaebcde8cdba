"""deploy/ manifests are valid Kubernetes objects (strict schema) and least-privilege."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from tests.helpers import ROOT

DEPLOY = ROOT / "deploy"
DOCS = [(path.name, i, doc) for path in sorted(DEPLOY.glob("*.yaml"))
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())) if doc]


@pytest.mark.parametrize(("name", "index", "doc"), DOCS, ids=[f"{n}#{i}" for n, i, _ in DOCS])
def test_manifest_validates_against_the_kubernetes_schema(name: str, index: int, doc: dict) -> None:  # type: ignore[type-arg]
    kubernetes_validate.validate(doc, "1.33.0", strict=True)


def test_cluster_role_only_reads() -> None:
    (role,) = [d for _, _, d in DOCS if d["kind"] == "ClusterRole"]
    assert {v for rule in role["rules"] for v in rule["verbs"]} == {"get", "list", "watch"}
    resources = sorted(r for rule in role["rules"] for r in rule["resources"])
    assert resources == ["endpointslices", "nodes", "servicecidrs", "services"]


def test_daemonset_has_what_the_agent_needs() -> None:
    (ds,) = [d for _, _, d in DOCS if d["kind"] == "DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["hostNetwork"] is True
    assert pod["hostPID"] is True  # own nf_tables commits are told by host pid (kernel/nft_monitor.py)
    assert set(container["securityContext"]["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "/run/xtables.lock" in mounts and mounts["/lib/modules"]["readOnly"] is True


def test_the_schema_check_can_fail() -> None:
    (ds,) = [d for _, _, d in DOCS if d["kind"] == "DaemonSet"]
    broken = yaml.safe_load(yaml.safe_dump(ds))
    broken["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.33.0", strict=True)
