"""Fuzzed manifests that are accepted load into a real kernel; refused ones fail cleanly in the CLI.

The other half of tests/test_fuzz_manifests.py's promise: an accepted file's `dump` output is
loaded for real, in one throwaway namespace per test, by `iptables-restore --test` and a real
`iptables-restore` (nft and legacy binaries, IPv4 and IPv6) and by `nft -c -f -`. The valid
clusters collide on purpose (one cluster IP, node port or external IP for several services;
overlapping source ranges; multicast and broadcast addresses validation lets through), which is
what the kernel, not our parsers, has to accept.

Then a few bad files through the real command line: `dump` (both modes) and `apply --dry-run`
(both modes, inside a throwaway namespace so that it never reads the root namespace's rules)
must exit 2 with one line on stderr and nothing on stdout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kproxy_nft.model import IPFamily, NodeContext
from kproxy_nft.sources.manifests import ManifestError, read_manifests
from tests.fuzz_strategies import (
    DumpOutput,
    ManifestFile,
    attacked_files,
    dump_outputs,
    mutated_files,
    nodes,
    note,
    render,
    valid_files,
    with_service_cidrs,
)
from tests.kernel.conftest import BACKENDS, run_in

pytestmark = pytest.mark.kernel

CLI = str(Path(sys.executable).with_name("kproxy-nft"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-load")


def restore_tools(family: IPFamily) -> list[str]:
    six = "6" if family is IPFamily.V6 else ""
    return [tool for backend in BACKENDS if shutil.which(tool := f"ip{six}tables-{backend}-restore")]


def assert_loads(ns: str, out: DumpOutput) -> None:
    """Every family's iptables-restore input and the nft script load in namespace `ns`."""
    for family, text in out.iptables.items():
        for tool in restore_tools(family):
            for argv in ([tool, "--test"], [tool]):
                result = run_in(ns, argv, text)
                assert result.returncode == 0, (argv, result.stderr, text)
    result = run_in(ns, ["nft", "-c", "-f", "-"], out.nft)
    assert result.returncode == 0, (result.stderr, out.nft)


def accepted_output(file: ManifestFile, directory: Path, node: NodeContext) -> DumpOutput | None:
    try:
        manifests = read_manifests([str(file.write(directory))])
    except ManifestError:
        note("refused")
        return None
    note("accepted")
    return dump_outputs(manifests.cluster_state(), with_service_cidrs(node, manifests))


KERNEL_FUZZ = settings(max_examples=40, deadline=None,
                       suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                              HealthCheck.data_too_large])


@KERNEL_FUZZ
@given(st.one_of(valid_files(), valid_files(), mutated_files(max_mutations=1), attacked_files()), nodes)
def test_accepted_manifests_load_into_the_kernel(netns: str, workdir: Path, file: ManifestFile,
                                                 node: NodeContext) -> None:
    out = accepted_output(file, workdir, node)
    if out is not None:
        assert_loads(netns, out)


# A bug the property found (nft 1.0.6, Debian 12's): the IPv6 affinity record rule
# `update @affinity-tcp { ct original ip6 saddr . ct original ip6 daddr . ct original proto-dst
# timeout 3h : ip6 daddr . tcp dport }` makes nft abort (netlink_linearize.c: `dreg <
# ctx->reg_low`), in `nft -f` and in-process through libnftables (`apply` died with SIGABRT).
# The ip6 table now leaves IPv6 affinity out (`compile.nftables.ipv6_affinity_skipped`).
IPV6_AFFINITY = [
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
     "spec": {"clusterIP": "fd00:96::1", "sessionAffinity": "ClientIP", "ports": [{"port": 80}]}},
    {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
     "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}}, "addressType": "IPv6",
     "ports": [{"name": "", "port": 80}], "endpoints": [{"addresses": ["fd00:1::5"]}]},
]


def test_an_ipv6_service_with_client_ip_affinity_loads(netns: str, workdir: Path) -> None:
    out = accepted_output(render(IPV6_AFFINITY, "yaml"), workdir, NodeContext(hostname="node1"))
    assert out is not None
    assert_loads(netns, out)


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------

SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
           "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "externalIPs": ["192.0.2.1"],
                    "ports": [{"name": "http", "port": 80, "nodePort": 30080}]},
           "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}}
SLICE = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "web-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
         "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
         "endpoints": [{"addresses": ["10.1.0.5"], "nodeName": "node1"}]}


def edited(obj: dict[str, object], path: str, value: object) -> dict[str, object]:
    """A deep copy of `obj` with the value at `spec.ports.0.port`-like `path` replaced."""
    copy = json.loads(json.dumps(obj))
    *parents, last = path.split(".")
    node = copy
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return copy


def yaml_file(*docs: dict[str, object]) -> ManifestFile:
    return render(list(docs), "yaml")


BAD_FILES = [
    pytest.param(yaml_file(edited(SERVICE, "spec.externalIPs.0",
                                  "fe80::1%lo -j RETURN\n-A KUBE-SERVICES -j DNAT --to-destination [fd00::666]:1")),
                 id="zone-and-rule-in-externalIP"),
    pytest.param(yaml_file(SERVICE, edited(SLICE, "metadata.name", "web-1\n} ; flush ruleset ; {")),
                 id="nft-injection-in-slice-name"),
    pytest.param(ManifestFile(".yaml", yaml_file(SERVICE).data.replace(b"port: 80", b"port: " + b"9" * 5000)),
                 id="port-of-5000-digits"),
    pytest.param(ManifestFile(".yaml", yaml_file(SERVICE).data.replace(b"name: web", b"name: w\xff\xfeeb")),
                 id="invalid-utf8"),
    # read_manifests' message has a line break here (tests/test_fuzz_manifests.py); the CLI's
    # report.one_line escapes it.
    pytest.param(yaml_file(edited(SERVICE, "metadata.labels", {"app\n-A KUBE-SERVICES -j ACCEPT": 1})),
                 id="line-break-in-a-label-key"),
    pytest.param(ManifestFile(".yaml", b"apiVersion: v1\nkind: " + b"[" * 998 + b"]" * 998 + b"\n"),
                 id="kind-nested-998-deep"),
]


def cli_runs(ns: str, path: Path) -> Iterator[tuple[list[str], subprocess.CompletedProcess[str]]]:
    """`dump` and `apply --dry-run` in both modes, run at the same time (apply inside `ns`)."""
    argvs = [[CLI, "dump", "-f", str(path), "--proxy-mode", mode] for mode in ("iptables", "nftables")]
    argvs += [["ip", "netns", "exec", ns, CLI, "apply", "--dry-run", "-f", str(path), "--proxy-mode", mode]
              for mode in ("iptables", "nftables")]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for argv in argvs]
    for argv, proc in zip(argvs, procs, strict=True):
        stdout, stderr = proc.communicate(timeout=120)
        yield argv, subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("file", BAD_FILES)
def test_the_cli_refuses_bad_files_with_one_line(netns: str, workdir: Path, file: ManifestFile) -> None:
    path = file.write(workdir, "bad")
    for argv, result in cli_runs(netns, path):
        what = (argv[-4:], result.returncode, result.stdout[:300], result.stderr[-2000:])
        assert result.returncode == 2 and result.stdout == "", what
        assert len(result.stderr.splitlines()) == 1 and result.stderr.endswith("\n"), what
        assert result.stderr.startswith(f"kproxy-nft: error: {path}"), what
        assert result.stderr.rstrip("\n").isprintable() and len(result.stderr) < 1100, what


def test_the_cli_accepts_a_good_file_and_its_dump_loads(netns: str, workdir: Path) -> None:
    path = yaml_file(SERVICE, SLICE).write(workdir, "good")
    results = dict((argv[-1] if argv[1] == "dump" else f"apply-{argv[-1]}", result)
                   for argv, result in cli_runs(netns, path))
    for mode in ("iptables", "nftables"):
        assert results[mode].returncode == 0 and results[mode].stderr == "", results[mode]
        assert "10.1.0.5" in results[mode].stdout
        # `apply --dry-run` in an empty namespace: changes pending (1), and nothing applied.
        assert results[f"apply-{mode}"].returncode == 1, results[f"apply-{mode}"]
    assert run_in(netns, ["nft", "list", "ruleset"]).stdout == ""
    for tool in restore_tools(IPFamily.V4):
        assert "KUBE-" not in run_in(netns, [tool.replace("-restore", "-save")]).stdout
        result = run_in(netns, [tool, "--test"], results["iptables"].stdout)
        assert result.returncode == 0, result.stderr
    result = run_in(netns, ["nft", "-c", "-f", "-"], results["nftables"].stdout)
    assert result.returncode == 0, result.stderr
