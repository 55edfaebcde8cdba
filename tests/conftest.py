"""pytest hooks: kernel tests skip (with the reason) where they cannot run, and fail in CI."""

from __future__ import annotations

import os
import shutil

import pytest


def kernel_ready() -> str | None:
    """Why kernel tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables)"
    for tool in ("ip", "iptables-nft-restore", "iptables-legacy-restore", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 iptables nftables)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = kernel_ready()
    if reason is None:
        return
    if os.environ.get("CI") == "true" and any("kernel" in item.keywords for item in items):
        # CI runs as root on a machine .ci/run prepared: a skipped kernel test there is a defect.
        raise pytest.UsageError(f"kernel tests cannot run in CI: {reason}")
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "kernel" in item.keywords:
            item.add_marker(skip)
