"""Invalid objects among good ones: the agent programs every valid one, logs and counts the rest.

From manifests (`ManifestSource`) and from the API (the change tracker): a bad object is
skipped with one log line and `kproxy_nft_invalid_objects_total{kind}`; an invalid update, or a
file that no longer parses, keeps what was valid before; /healthz stays healthy.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import yaml
from kubernetes.client import V1Service

from kproxy_nft.agent.main import Agent
from kproxy_nft.agent.metrics import new_metrics
from kproxy_nft.model import ClusterState
from kproxy_nft.sources.kube import Change, Replace
from kproxy_nft.sources.manifest_watch import ManifestSource
from tests.fake_proxier import FakeProxier


class RecordingBackend(FakeProxier):
    def __init__(self) -> None:
        super().__init__()
        self.states: list[ClusterState] = []

    def sync(self, state: ClusterState, full: bool, changed: object = None) -> str:
        self.states.append(state)
        return "ok"


def service_doc(name: str, ip: str) -> str:
    return f"""\
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec: {{clusterIP: {ip}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}
"""


def slice_doc(name: str, service: str, address: str, port: int = 8080) -> str:
    return f"""\
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}
addressType: IPv4
ports: [{{name: http, port: {port}}}]
endpoints: [{{addresses: ["{address}"]}}]
"""


class Setup:
    """An agent with a recording backend, fed by a `ManifestSource` over `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.backend = RecordingBackend()
        self.agent = Agent(self.backend, new_metrics(), min_sync_period=0.0, sync_period=30.0)
        self.source = ManifestSource([str(directory)], self.agent.events.put, threading.Event())

    def write(self, name: str, *docs: str) -> None:
        (self.directory / name).write_text("---\n".join(docs))

    def step(self) -> ClusterState:
        """One poll of the files, one loop step of the agent, one sync if anything changed (a
        file that no longer parses changes nothing); the state the node now holds."""
        self.source.poll()
        self.agent._drain(0)  # noqa: SLF001 - one loop step, without the thread
        assert self.agent.ready()
        outcome = self.agent.scheduler.run_due()
        assert outcome is None or outcome.ok
        return self.backend.states[-1]

    def invalid(self, kind: str) -> float:
        value = self.agent.metrics.registry.get_sample_value("kproxy_nft_invalid_objects_total", {"kind": kind})
        return value or 0.0


def served(state: ClusterState) -> dict[str, list[str]]:
    """Service name → its endpoints' ip:port."""
    return {name.name: [f"{ep.ip}:{ep.port}" for ep in state.endpoints_of(name)] for name in state.services}


def invalid_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kproxy_nft.agent" and "invalid" in r.getMessage()]


@pytest.fixture
def setup(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Setup:
    caplog.set_level(logging.INFO, logger="kproxy_nft.agent")
    return Setup(tmp_path)


def test_good_and_bad_documents_program_the_good_ones_and_count_the_bad_one_once(
        setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    setup.write("web.yaml", service_doc("web", "10.96.0.10"), slice_doc("web-1", "web", "10.1.0.1"))
    # One file holding a good Service and a bad EndpointSlice (a port out of range).
    setup.write("api.yaml", service_doc("api", "10.96.0.11"), slice_doc("api-1", "api", "10.1.0.2", port=70000))
    setup.write("db.yaml", service_doc("db", "10.96.0.12"), slice_doc("db-1", "db", "not-an-ip"))
    state = setup.step()
    assert served(state) == {"web": ["10.1.0.1:8080"], "api": [], "db": []}
    assert setup.invalid("EndpointSlice") == 2
    lines = invalid_lines(caplog)
    assert len(lines) == 2 and any("api.yaml: document 2 (EndpointSlice default/api-1)" in line for line in lines)
    assert setup.agent.scheduler.healthy(setup.agent.scheduler.last_success or 0.0)
    # Another file changes: everything is read again, the same problems are no news.
    setup.write("other.yaml", service_doc("other", "10.96.0.13"))
    assert served(setup.step())["other"] == []
    assert setup.invalid("EndpointSlice") == 2 and len(invalid_lines(caplog)) == 2
    # Fixed: served, and nothing more counted.
    setup.write("api.yaml", service_doc("api", "10.96.0.11"), slice_doc("api-1", "api", "10.1.0.2"))
    assert served(setup.step())["api"] == ["10.1.0.2:8080"]
    assert setup.invalid("EndpointSlice") == 2 and len(invalid_lines(caplog)) == 2
    # Broken again: a new problem, counted again.
    setup.write("api.yaml", service_doc("api", "10.96.0.11"), slice_doc("api-1", "api", "10.1.0.2", port=0))
    setup.step()
    assert setup.invalid("EndpointSlice") == 3


def test_an_invalid_update_in_a_file_keeps_its_last_valid_version(
        setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    setup.write("web.yaml", service_doc("web", "10.96.0.10"), slice_doc("web-1", "web", "10.1.0.1"))
    setup.write("api.yaml", service_doc("api", "10.96.0.11"), slice_doc("api-1", "api", "10.1.0.2"))
    setup.step()
    setup.write("api.yaml", service_doc("api", "10.96.0.11"), slice_doc("api-1", "api", "10.1.0.3", port=70000))
    assert served(setup.step()) == {"web": ["10.1.0.1:8080"], "api": ["10.1.0.2:8080"]}
    assert setup.invalid("EndpointSlice") == 1
    (line,) = invalid_lines(caplog)
    assert "ports[0].port" in line and "last valid version stay" in line
    # A valid edit of another object of the same file still applies meanwhile.
    setup.write("api.yaml", service_doc("api", "10.96.0.21"), slice_doc("api-1", "api", "10.1.0.3", port=70000))
    state = setup.step()
    (api,) = [name for name in state.services if name.name == "api"]
    assert state.services[api].cluster_ips == ("10.96.0.21",)
    assert served(state)["api"] == ["10.1.0.2:8080"]
    setup.write("api.yaml", service_doc("api", "10.96.0.21"), slice_doc("api-1", "api", "10.1.0.3"))
    assert served(setup.step())["api"] == ["10.1.0.3:8080"]


def test_a_file_that_does_not_parse_keeps_its_last_good_objects(setup: Setup) -> None:
    setup.write("web.yaml", service_doc("web", "10.96.0.10"), slice_doc("web-1", "web", "10.1.0.1"))
    setup.write("api.yaml", service_doc("api", "10.96.0.11"))
    setup.step()
    (setup.directory / "web.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: {name: web")  # half saved
    assert served(setup.step()) == {"web": ["10.1.0.1:8080"], "api": []}
    assert setup.invalid("unknown") == 1
    # Deleting the file removes its objects: that is not a bad edit.
    (setup.directory / "web.yaml").unlink()
    assert served(setup.step()) == {"api": []}


def test_a_bad_file_on_the_first_read_does_not_hold_back_the_others(setup: Setup) -> None:
    setup.write("web.yaml", service_doc("web", "10.96.0.10"), slice_doc("web-1", "web", "10.1.0.1"))
    (setup.directory / "broken.yaml").write_text("kind: Service\nmetadata: {name: [broken")
    assert served(setup.step()) == {"web": ["10.1.0.1:8080"]}
    assert setup.invalid("unknown") == 1


def test_invalid_objects_from_the_api_are_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kproxy_nft.agent")
    backend = RecordingBackend()
    agent = Agent(backend, new_metrics(), min_sync_period=0.0, sync_period=30.0)

    def svc(name: str, ip: str, port: int = 80) -> V1Service:
        return V1Service.model_validate(yaml.safe_load(service_doc(name, ip).replace("port: 80", f"port: {port}")))

    agent.events.put(Replace("services", (svc("web", "10.96.0.10"), svc("other", "10.96.0.11"))))
    agent.events.put(Replace("endpointslices", ()))
    agent._drain(0)  # noqa: SLF001
    agent.scheduler.run_due()
    assert sorted(n.name for n in backend.states[-1].services) == ["other", "web"]
    # An invalid update of a programmed Service: kept as it was, one line, one count.
    agent.events.put(Change("services", "MODIFIED", svc("web", "10.96.0.99", port=70000)))
    agent._drain(0)  # noqa: SLF001
    # A relist repeats it (no news) and no longer has "other" (deleted as usual).
    agent.events.put(Replace("services", (svc("web", "10.96.0.99", port=70000),)))
    agent._drain(0)  # noqa: SLF001
    agent.scheduler.run_due()
    state = backend.states[-1]
    assert [(n.name, p.cluster_ips) for n, p in state.services.items()] == [("web", ("10.96.0.10",))]
    assert agent.metrics.registry.get_sample_value("kproxy_nft_invalid_objects_total", {"kind": "Service"}) == 1
    (line,) = invalid_lines(caplog)
    assert "Service default/web: spec.ports[0].port" in line and "kept its previous version" in line
    assert agent.scheduler.healthy(agent.scheduler.last_success or 0.0)


def test_an_invalid_servicecidr_is_counted_once_and_an_invalid_update_keeps_the_old_ranges() -> None:
    from kubernetes.client import V1ServiceCIDR

    def cidr(name: str, *cidrs: str) -> V1ServiceCIDR:
        return V1ServiceCIDR.model_validate({"metadata": {"name": name}, "spec": {"cidrs": list(cidrs)}})

    agent = Agent(RecordingBackend(), new_metrics(), min_sync_period=0.0, sync_period=30.0)
    agent.events.put(Replace("servicecidrs", (cidr("kubernetes", "10.96.0.0/16"), cidr("bad", "nope"))))
    agent.events.put(Replace("servicecidrs", (cidr("kubernetes", "10.96.0.0/16"), cidr("bad", "nope"))))  # relist
    agent.events.put(Change("servicecidrs", "MODIFIED", cidr("kubernetes", "10.96.0.0/99")))
    agent._drain(0)  # noqa: SLF001
    assert agent.proxier.node.service_cidrs == ("10.96.0.0/16",)
    assert agent.metrics.registry.get_sample_value("kproxy_nft_invalid_objects_total", {"kind": "ServiceCIDR"}) == 2
