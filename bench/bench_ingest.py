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
  for its peak RSS.

Not a test. Usage:
    python bench/bench_ingest.py [--sizes 1000,10000,30000] [--decoder-sizes 1000,10000] [--endpoints 10]
                                 [--dir /tmp/kproxy-ingest] [--before DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import yaml

from kproxy_nft.lab.synthetic import synthetic_objects
from kproxy_nft.sources import slim

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
        "yaml libyaml events (slim)": slim.lean_yaml_load,
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
    try:
        import yaml_rs  # type: ignore[import-not-found]
        found["yaml-rs (YAML 1.2)"] = yaml_rs.loads
    except ImportError:
        pass
    return found


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,30000")
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--dir", default="/tmp/kproxy-ingest")
    parser.add_argument("--decoder-sizes", default="1000,10000",
                        help="sizes at which decoders are compared (PyYAML's loader takes minutes at 30k)")
    parser.add_argument("--before", metavar="DIR", help="also time the kproxy_nft package in DIR (another version)")
    args = parser.parse_args()
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    for n in (int(s) for s in args.sizes.split(",")):
        json_path, yaml_path = write_cluster(directory, n, args.endpoints)
        print(f"\n## {n} Services × {args.endpoints} endpoints  "
              f"(JSON {json_path.stat().st_size / 2**20:.0f} MiB, YAML {yaml_path.stat().st_size / 2**20:.0f} MiB)")
        if str(n) in args.decoder_sizes.split(","):
            texts = {"json": json_path.read_text(), "yaml": yaml_path.read_text()}
            print(f"{'decoder':<26} {'seconds':>8}")
            for name, decode in decoders().items():
                text = texts["json" if "yaml" not in name else "yaml"]
                t0 = time.perf_counter()
                decode(text)
                print(f"{name:<26} {time.perf_counter() - t0:8.2f}")
            del texts
        print(f"{'what':<26} {'file':>5} {'version':>8} {'wall s':>8} {'peak RSS MiB':>13}")
        for path in (json_path, yaml_path):
            fmt = path.suffix[1:]
            for version, tree in [("before", args.before)] * bool(args.before) + [("now", None)]:
                wall, rss, _ = measured([sys.executable, "-c", CLI, "dump", "-f", str(path)], tree)
                print(f"{'kproxy-nft dump':<26} {fmt:>5} {version:>8} {wall:8.2f} {rss:13.0f}")
                _, rss, inner = measured([sys.executable, "-c", INGEST, str(path)], tree)
                print(f"{'ingestion alone':<26} {fmt:>5} {version:>8} {float(inner):8.2f} {rss:13.0f}")


if __name__ == "__main__":
    main()
