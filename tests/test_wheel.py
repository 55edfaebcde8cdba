"""An installed wheel (not the checkout) carries the seed: `kproxy-nft demo` works after `pip install .`.

The wheel is built from a copy of the sources (so the shared checkout gets no `build/`) and
installed with its dependencies into a fresh venv, with pip configured as on this machine (the
local wheel registry). Each command runs outside the checkout with no PYTHONPATH, and the test
checks that `kproxy_nft` was imported from the venv, not from the sources. About 15 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with the project's wheel installed; yields the venv's `bin/`."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT / "kproxy_nft", source / "kproxy_nft",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", str(source), "-w", str(work / "dist")], check=True,
                   capture_output=True, timeout=120)
    wheel = next((work / "dist").glob("kproxy_nft-*.whl"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=60)
    subprocess.run([str(venv / "bin" / "python"), *pip[1:], "install", str(wheel)], check=True,
                   capture_output=True, timeout=180)
    yield venv / "bin"


def outside_checkout(argv: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["COLUMNS"] = "200"  # rich wraps to the terminal width; keep pod names whole
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# The demo's data loading, as `kproxy-nft demo` without -f does it (cli.demo → lab.demo).
LOAD_SEED = """
import json, kproxy_nft
from kproxy_nft.cli import load_inputs
from kproxy_nft.lab.demo import pods_of, seed_directory, targets_of
seed = seed_directory()
manifests, settings = load_inputs([str(seed)], config_path=str(seed / "kube-proxy-config.yaml"))
print(json.dumps({"module": kproxy_nft.__file__, "seed": str(seed), "mode": settings.mode,
                  "hostname": settings.node.hostname, "pods": [p.name for p in pods_of(manifests)],
                  "targets": [f"{t.ip}:{t.port}" for t in targets_of(manifests)]}))
"""


def test_the_wheel_ships_the_seed_and_the_demo_loads_it(installed: Path, tmp_path: Path) -> None:
    result = outside_checkout([str(installed / "python"), "-c", LOAD_SEED], tmp_path)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    venv = str(installed.parent)
    assert loaded["module"].startswith(venv) and loaded["seed"].startswith(venv)  # not the checkout's
    assert (loaded["mode"], loaded["hostname"]) == ("iptables", "docker-desktop")
    assert loaded["pods"] == ["sample-deployment-6cd85bd5f-svmhh", "sample-deployment-6cd85bd5f-wm7vv",
                              "sample-deployment-6cd85bd5f-jq2wc"]
    assert loaded["targets"] == ["10.101.181.214:8080", "10.102.199.133:8080", "10.102.199.133:8443"]


@pytest.mark.kernel
def test_the_demo_runs_from_the_installed_wheel(installed: Path, tmp_path: Path) -> None:
    """The whole demo (namespaces `kpn-…`, removed by the demo itself, also on failure)."""
    result = outside_checkout([str(installed / "kproxy-nft"), "demo", "-n", "10"], tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failures" in result.stdout
