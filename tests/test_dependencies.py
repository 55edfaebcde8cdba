"""Every third-party module the package imports is a declared, pinned dependency (issue 15, item 8:
`pydantic` was imported by sources/manifests.py but installed only as kubernetes' dependency)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib

from tests.helpers import ROOT


def imported_top_level_modules() -> set[str]:
    modules: set[str] = set()
    for path in (ROOT / "kproxy_nft").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"kproxy_nft"}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_distribution_is_declared_and_pinned() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {normalized(spec.split("==")[0]) for spec in declared if "==" in spec}
    distributions = importlib.metadata.packages_distributions()
    for module in sorted(imported_top_level_modules()):
        owners = {normalized(d) for d in distributions.get(module, [])}
        assert owners & pinned, f"kproxy_nft imports {module} ({', '.join(owners) or 'not installed'}): " \
                                "declare and pin it in pyproject.toml"


def test_one_shot_commands_do_not_run_the_kubernetes_package_init_and_the_agent_still_finds_its_modules() -> None:
    """`kproxy_nft` registers `kubernetes` without running its `__init__` (0.12 s of eager imports
    `dump` never uses, issue 14); every submodule the agent imports must still load on use."""
    import subprocess

    probe = (
        "import sys, kproxy_nft.cli\n"
        "eager = sorted(m for m in ('kubernetes.config', 'kubernetes.dynamic', 'kubernetes.watch', "
        "'kubernetes.stream', 'kubernetes.leaderelection') if m in sys.modules)\n"
        "print('eager:', eager)\n"
        "import kproxy_nft.sources.kube\n"
        "from kubernetes import client, config, watch\n"
        "print('agent:', callable(config.load_kube_config), callable(watch.Watch), client.V1Service.__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == ["eager: []", "agent: True True V1Service"]
