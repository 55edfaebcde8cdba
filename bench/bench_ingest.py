"""Benchmark: the cold path of `dump` at cluster scale, N Services × 10 endpoints (issue 14).

Builds what `kubectl get svc,endpointslices -A -o json` (and `-o yaml`) prints for a synthetic
cluster (`lab.synthetic.synthetic_objects`), then prints:

* decoders: the file's text → Python objects, per decoder (JSON: json, orjson, msgspec, and
  each with the schema check: pydantic models vs msgspec Structs; YAML: PyYAML's C loader with
  its default constructor, without timestamps, libyaml's events built directly (`slim`), and
  yaml-rs (YAML 1.2, for comparison only) when installed);
* `kproxy-nft dump -f cluster.json|yaml`: wall time and peak RSS of the CLI run as a subprocess
  (its VmHWM from /proc/self/status, printed as it exits);
* ingestion alone (`read_manifests` + `cluster_state`, no compile), in a subprocess of its own
  for its peak RSS;
* the agent (`kproxy-nft run`, in each of `--agent-modes`, in a throwaway `kpn-` namespace) fed
  by the test API server (tests/fake_apiserver.py) over HTTP: its first sync, timed from the
  process's start and from its first list request (list → kernel) to the sync its log reports,
  and its resident memory read from /proc/<pid>/status, steady (VmRSS, `--settle` seconds after
  the first sync) and peak (VmHWM, the initial list included).

Then it writes a PNG chart of time and memory against cluster size (`--chart`). Not a test;
the agent rows need root. Usage:
    python bench/bench_ingest.py [--sizes 1000,10000,30000] [--decoder-sizes 1000,10000] [--endpoints 10]
                                 [--dir /tmp/kproxy-ingest] [--before DIR] [--agent-sizes 1000,10000,30000]
                                 [--agent-modes nftables,iptables] [--settle 10] [--chart bench/ingest.png]
                                 [--repeat 3]
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import yaml
from _common import exit_on_sigterm

import kproxy_nft
from kproxy_nft.lab.netns import throwaway_netns
from kproxy_nft.lab.synthetic import synthetic_objects
from kproxy_nft.sources import slim

# The test API server lives with the tests; the benches run as `python bench/<name>.py`, which
# puts bench/ on sys.path but not the repository's root.
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from tests.fake_apiserver import FakeAPIServer  # noqa: E402 (needs the root on sys.path first)

# Each child reports its own peak RSS (VmHWM, reset by exec) on stderr as it exits: a child's
# ru_maxrss would count the bench's own memory, which the child had until its exec.
PEAK = ("import atexit, sys; atexit.register(lambda: print('VmHWM', [line.split()[1] for line in "
        "open('/proc/self/status') if line.startswith('VmHWM')][0], file=sys.stderr)); ")
CLI = PEAK + "from kproxy_nft.cli import main; sys.argv[0] = 'kproxy-nft'; main()"
INGEST = (PEAK + "import time; t0 = time.perf_counter(); from kproxy_nft.sources.manifests import read_manifests; "
          "read_manifests([sys.argv[1]]).cluster_state(); print(time.perf_counter() - t0)")


def write_cluster(directory: Path, services: int, endpoints: int) -> tuple[Path, Path]:
    """cluster-N.json and cluster-N.yaml, as kubectl prints a `List` (written once, then reused)."""
    json_path, yaml_path = directory / f"cluster-{services}.json", directory / f"cluster-{services}.yaml"
    if not (json_path.exists() and yaml_path.exists()):
        document = synthetic_objects(services, endpoints)
        json_path.write_text(json.dumps(document, indent=4))
        yaml_path.write_text(yaml.dump(document, Dumper=yaml.CSafeDumper, sort_keys=True))
    return json_path, yaml_path


class NoTimestampLoader(yaml.CSafeLoader):
    """CSafeLoader with a leaner constructor: timestamps stay text (not used: no faster, see the note)."""


NoTimestampLoader.add_constructor("tag:yaml.org,2002:timestamp", yaml.CSafeLoader.construct_yaml_str)


def typed(text: str) -> list[Any]:
    """What `read_manifests` does before converting: msgspec's decoder, then each item to its Struct."""
    return [slim.to_struct((item["apiVersion"], item["kind"]), item) for item in msgspec.json.decode(text)["items"]]


def decoders() -> dict[str, Callable[[str], Any]]:
    """text → objects, per decoder available here."""
    found: dict[str, Callable[[str], Any]] = {
        "json (stdlib)": json.loads,
        "yaml CSafeLoader": lambda text: yaml.load(text, Loader=yaml.CSafeLoader),  # noqa: S506 (safe loader)
        "yaml CSafeLoader no-time": lambda text: yaml.load(text, Loader=NoTimestampLoader),  # noqa: S506 (safe)
        "yaml libyaml events (slim)": lambda text: list(slim._lean_documents(text)),
        "yaml lean_yaml_load (slim)": slim.lean_yaml_load,
        "msgspec + Structs (slim)": typed,
        "json + pydantic models": lambda text: [
            slim.KINDS[(item["apiVersion"], item["kind"])].model_validate(item) for item in json.loads(text)["items"]],
        "msgspec.yaml (PyYAML)": msgspec.yaml.decode,
    }
    try:
        import orjson
        found["orjson"] = orjson.loads
    except ImportError:
        pass
    found["msgspec"] = msgspec.json.decode
    import oryaml  # a dependency; imported here, as the optional ones are

    from kproxy_nft.sources import yaml_fast
    found["oryaml (YAML 1.2)"] = oryaml.loads
    found["yaml_fast (risky scan + oryaml)"] = yaml_fast.load
    try:
        import yaml_rs  # type: ignore[import-not-found]
        found["yaml-rs (YAML 1.2)"] = yaml_rs.loads
    except ImportError:
        pass
    return found


def byte_compiled(package: Path) -> None:
    """Write the package's bytecode, as `pip install` does, so that the runs timed load it.

    Without it a source tree's runs compile every module again when bytecode is not written
    (PYTHONDONTWRITEBYTECODE, set on this machine): 0.1 s more per `dump`, not what a user sees.
    """
    if not compileall.compile_dir(str(package), quiet=1, force=False, legacy=False):
        raise SystemExit(f"{package}: does not compile")


def measured(argv: list[str], tree: str | None) -> tuple[float, float, str]:
    """Run argv (a `PEAK` program) as a child; (wall seconds, its peak RSS in MiB, its stdout's last line).

    `tree`: run the kproxy_nft package found there (e.g. `git archive HEAD kproxy_nft | tar -x
    -C /tmp/before`, for the "before" rows).
    """
    env = {**os.environ, "PYTHONPATH": tree} if tree else None  # and cwd: `-c` puts the cwd first on sys.path
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tree, check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr[-500:]}")
    peak_kib = int(proc.stderr.rsplit("VmHWM ", 1)[1].split()[0])
    last = proc.stdout.strip().rsplit("\n", 1)[-1] if proc.stdout.strip() else ""
    return elapsed, peak_kib / 1024, last


RESOURCES = {"Service": "services", "EndpointSlice": "endpointslices"}
KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: fake, cluster: {server: "%s"}}]
users: [{name: bench, user: {token: bench}}]
contexts: [{name: fake, context: {cluster: fake, user: bench}}]
current-context: fake
"""
SYNCED = "result=ok"  # the agent's log line of a finished sync (agent/main.py)


def status_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of process `pid`, in MiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def agent_command(kubeconfig: Path, netns: str, mode: str = "nftables") -> list[str]:
    """`kproxy-nft run` as an operator would start it, programming `netns`; the node's conntrack
    settings left alone (0) and its listeners on free loopback ports."""
    return [sys.executable, "-c", "from kproxy_nft.cli import main; main()", "run", "--kubeconfig", str(kubeconfig),
            "--netns", netns, "--proxy-mode", mode, "--hostname-override", "node0",
            "--cluster-cidr", "10.128.0.0/9", "--conntrack-max-per-core", "0",
            "--conntrack-tcp-timeout-established", "0", "--conntrack-tcp-timeout-close-wait", "0",
            "--metrics-bind-address", "127.0.0.1:0", "--healthz-bind-address", "127.0.0.1:0"]


def agent_figures(services: int, endpoints: int, settle: float, mode: str = "nftables") -> dict[str, float]:
    """The agent fed `services` × `endpoints` over HTTP: first sync s (from its start, and from its first
    list request), steady VmRSS and peak VmHWM MiB.

    The agent is a process of its own so that its /proc status is its memory alone (not the
    test server's, which holds the cluster as dicts and its JSON). It is stopped before its
    namespace is deleted; both also on failure.
    """
    document = synthetic_objects(services, endpoints)
    with FakeAPIServer() as api, throwaway_netns() as netns, tempfile.TemporaryDirectory() as tmp:
        for item in document.pop("items"):
            api.apply(RESOURCES[item["kind"]], item)
        kubeconfig, log = Path(tmp) / "kubeconfig", Path(tmp) / "agent.log"
        kubeconfig.write_text(KUBECONFIG % api.url)
        with log.open("w") as out:
            t0 = time.perf_counter()
            agent = subprocess.Popen(agent_command(kubeconfig, netns, mode), stdout=out, stderr=subprocess.STDOUT)
        try:
            while SYNCED not in log.read_text():
                if agent.poll() is not None or time.perf_counter() - t0 > 600:
                    raise SystemExit(f"agent at {services}: no first sync: {log.read_text()[-1000:]}")
                time.sleep(0.05)
            synced = time.perf_counter()
            first_sync, listed_at = synced - t0, api.first_request_at or t0
            time.sleep(settle)  # the steady state: the list's garbage gone, the watches open
            memory = status_mib(agent.pid)
        finally:
            agent.terminate()  # it exits within 2 s of SIGTERM (tests/kernel/test_stop.py); else killed
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.wait(timeout=10)
            agent.kill()  # nothing, once it has exited
            agent.wait()
    return {"first sync s": first_sync, "list → kernel s": synced - listed_at,
            "steady MiB": memory["VmRSS"], "peak MiB": memory["VmHWM"]}


def chart(results: dict[int, dict[str, float]], path: str) -> None:
    """Time and memory against cluster size, one line per measure found at every size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(results)
    measures = [key for key in results[sizes[0]] if all(key in results[n] for n in sizes)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, unit, title in ((axes[0], " s", "time (s)"), (axes[1], " MiB", "memory (MiB)")):
        for key in (key for key in measures if key.endswith(unit)):
            ax.plot(sizes, [results[n][key] for n in sizes], marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("Services (× 10 endpoints each)")
        ax.set_xscale("log")
        if unit == " s":  # iptables' first sync is 10-100x the rest: on a linear axis they lie flat
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("kproxy-nft cold path: dump and agent against cluster size")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def compare_decoders(json_path: Path, yaml_path: Path) -> None:
    """Print the seconds each decoder takes for the file's text."""
    texts = {"json": json_path.read_text(), "yaml": yaml_path.read_text()}
    print(f"{'decoder':<26} {'seconds':>8}")
    for name, decode in decoders().items():
        text = texts["json" if "yaml" not in name else "yaml"]
        t0 = time.perf_counter()
        decode(text)
        print(f"{name:<26} {time.perf_counter() - t0:8.2f}")


def median_of(runs: int, measure: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Each figure of `measure()` as the median of `runs` runs: this 2-core VM's timings vary by
    ±20% from one run to the next, and one run can land on a slow moment."""
    results = [measure() for _ in range(runs)]
    return {key: statistics.median(r[key] for r in results) for key in results[0]}


def dump_once(path: Path, tree: str | None) -> dict[str, float]:
    """One `dump` of `path` and one ingestion alone: wall s (inner s for ingestion) and peak MiB."""
    fmt = path.suffix[1:]
    wall, dump_rss, _ = measured([sys.executable, "-c", CLI, "dump", "-f", str(path)], tree)
    _, rss, inner = measured([sys.executable, "-c", INGEST, str(path)], tree)
    return {f"dump {fmt} s": wall, f"dump {fmt} peak MiB": dump_rss, f"ingest {fmt} s": float(inner),
            f"ingest {fmt} peak MiB": rss}


def dump_figures(paths: tuple[Path, Path], before: str | None, runs: int) -> dict[str, float]:
    """Print `dump` and ingestion alone per file (and per version); return the current version's."""
    figures: dict[str, float] = {}
    print(f"{'what':<26} {'file':>5} {'version':>8} {'wall s':>8} {'peak RSS MiB':>13}   (median of {runs})")
    for path in paths:
        fmt = path.suffix[1:]
        for version, tree in [("before", before)] * bool(before) + [("now", None)]:
            run = median_of(runs, functools.partial(dump_once, path, tree))
            for what, key in (("kproxy-nft dump", "dump"), ("ingestion alone", "ingest")):
                print(f"{what:<26} {fmt:>5} {version:>8} {run[f'{key} {fmt} s']:8.2f} "
                      f"{run[f'{key} {fmt} peak MiB']:13.0f}")
        del run[f"ingest {fmt} peak MiB"]
        figures |= run
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,30000")
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--dir", default="/tmp/kproxy-ingest")
    parser.add_argument("--decoder-sizes", default="1000,10000",
                        help="sizes at which decoders are compared (PyYAML's loader takes minutes at 30k)")
    parser.add_argument("--before", metavar="DIR", help="also time the kproxy_nft package in DIR (another version)")
    parser.add_argument("--agent-sizes", default=None, help="sizes to run the agent at (default: --sizes; '' none)")
    parser.add_argument("--agent-modes", default="nftables,iptables", help="proxy modes to run the agent in")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds after the first sync to read VmRSS")
    parser.add_argument("--chart", default="bench/ingest.png")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; each printed is their median")
    args = parser.parse_args()
    exit_on_sigterm()  # `timeout`/`kill` still stops the agent and deletes its namespace
    for tree in (Path(kproxy_nft.__file__).parent, *([Path(args.before) / "kproxy_nft"] if args.before else [])):
        byte_compiled(tree)
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    agent_sizes = (args.sizes if args.agent_sizes is None else args.agent_sizes).split(",")
    results: dict[int, dict[str, float]] = {}
    for n in (int(s) for s in args.sizes.split(",")):
        json_path, yaml_path = write_cluster(directory, n, args.endpoints)
        print(f"\n## {n} Services × {args.endpoints} endpoints  "
              f"(JSON {json_path.stat().st_size / 2**20:.0f} MiB, YAML {yaml_path.stat().st_size / 2**20:.0f} MiB)")
        if str(n) in args.decoder_sizes.split(","):
            compare_decoders(json_path, yaml_path)
        results[n] = dump_figures((json_path, yaml_path), args.before, args.repeat)
        for mode in args.agent_modes.split(",") if str(n) in agent_sizes else ():
            agent = median_of(args.repeat, functools.partial(agent_figures, n, args.endpoints, args.settle, mode))
            print(" ".join(f"agent {mode} {key}: {value:.2f}" for key, value in agent.items()), flush=True)
            results[n] |= {f"agent {mode} {key}": value for key, value in agent.items()}
        print(flush=True)
    columns = list(dict.fromkeys(key for figures in results.values() for key in figures))
    print("\n" + " | ".join(["services", *columns]))
    for n, figures in results.items():
        print(" | ".join([str(n), *(f"{figures[key]:.2f}" if key in figures else "-" for key in columns)]))
    chart(results, args.chart)
    print(f"chart: {args.chart}")


if __name__ == "__main__":
    main()
