"""`kproxy-nft run --manifests DIR` with one invalid object among good ones, real packets, both modes.

The agent runs inside the lab's node namespace (so its /healthz and /metrics listen there,
not in the root namespace). Three Services, each backed by its own pod; one EndpointSlice is
invalid from the first read. The good Services must be served, the bad one not (its slice is
skipped: no endpoints), /healthz must answer 200 and the invalid object must be counted once.
Then an invalid edit of a served slice must keep it served as before, and fixing the bad file
must get its Service served too.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import pytest

from kproxy_nft.lab import ClientSpec, Lab, PodSpec
from tests.helpers import wait_for
from tests.kernel.agentproc import run_argv, running_agent, write

pytestmark = pytest.mark.kernel

HEALTHZ = "127.0.0.1:10256"  # inside the node namespace
METRICS = "127.0.0.1:10249"

# Run inside the node namespace: one GET, printed as JSON [status, body]; status 0: no answer.
GET = """
import json, sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
        out = [r.status, r.read().decode()]
except urllib.error.HTTPError as e:
    out = [e.code, e.read().decode()]
except OSError as e:
    out = [0, repr(e)]
print(json.dumps(out))
"""


def http_get(lab: Lab, url: str) -> tuple[int, str]:
    """One GET from inside the lab's node namespace: (status, body); status 0: no answer."""
    status, body = json.loads(lab.run_in("node", [sys.executable, "-I", "-S", "-c", GET, url]).stdout)
    return status, body


SERVICES = {"web": ("10.96.0.10", "pod1", "10.1.0.47"),
            "api": ("10.96.0.11", "pod2", "10.1.0.48"),
            "db": ("10.96.0.12", "pod3", "10.1.0.49")}


def service(name: str) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": SERVICES[name][0], "ports": [{"name": "http", "port": 80, "targetPort": 80}]},
    })


def endpoint_slice(service: str, address: str, port: int = 80, address_type: str = "IPv4") -> str:
    return json.dumps({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{service}-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": address_type,
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
    })


BAD_SLICES = [
    pytest.param(endpoint_slice("db", "not-an-ip"), id="not-an-ip"),
    pytest.param(endpoint_slice("db", "fe80::1%eth0", address_type="IPv6"), id="ipv6-zone-id"),
]


@pytest.mark.parametrize("bad_slice", BAD_SLICES)
@pytest.mark.parametrize("mode", ["iptables", "nftables"])
def test_one_invalid_object_does_not_hold_back_the_good_ones(mode: str, bad_slice: str, tmp_path: Path) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    for name, (_, _, pod_ip) in SERVICES.items():
        write(manifests / f"{name}.json", service(name))
        write(manifests / f"{name}-slice.json", bad_slice if name == "db" else endpoint_slice(name, pod_ip))
    pods = [PodSpec(pod, ip) for _, pod, ip in SERVICES.values()]
    with Lab(pods, [ClientSpec("testpod", "10.1.0.50")]) as lab:
        lab.start_servers()

        def invalid_count(kind: str) -> float:
            status, body = http_get(lab, f"http://{METRICS}/metrics")
            assert status == 200, body
            for line in body.splitlines():
                if line.startswith(f'kproxy_nft_invalid_objects_total{{kind="{kind}"}} '):
                    return float(line.split()[-1])
            return 0.0

        def answers(name: str) -> dict[str, int]:
            return lab.probe("testpod", SERVICES[name][0], 80, count=3, timeout=0.5).counts()

        argv = run_argv(manifests, mode, "--metrics-bind-address", METRICS, "--healthz-bind-address", HEALTHZ)
        with running_agent(functools.partial(lab.spawn, "node"), argv, tmp_path / "agent.log") as agent:
            wait_for(lambda: answers("web") == {"pod1": 3}, timeout=20)
            assert answers("api") == {"pod2": 3}, agent.log()
            assert answers("db") == {}  # its slice was skipped: no endpoints, nothing else changed
            status, body = http_get(lab, f"http://{HEALTHZ}/healthz")
            assert status == 200, (body, agent.log())
            assert invalid_count("EndpointSlice") == 1, agent.log()
            assert sum("invalid EndpointSlice" in line for line in agent.log().splitlines()) == 1, agent.log()

            # An invalid edit of a served slice: what was programmed stays.
            write(manifests / "api-slice.json", endpoint_slice("api", "10.1.0.99", port=70000))
            wait_for(lambda: invalid_count("EndpointSlice") == 2, timeout=10)
            assert answers("api") == {"pod2": 3}, agent.log()
            assert http_get(lab, f"http://{HEALTHZ}/healthz")[0] == 200

            # The bad file fixed: its Service is served too, and nothing more is counted.
            write(manifests / "db-slice.json", endpoint_slice("db", SERVICES["db"][2]))
            wait_for(lambda: answers("db") == {"pod3": 3}, timeout=10)
            assert answers("web") == {"pod1": 3} and answers("api") == {"pod2": 3}
            assert invalid_count("EndpointSlice") == 2
            assert http_get(lab, f"http://{HEALTHZ}/healthz")[0] == 200
