"""Fixtures for kernel tests: a throwaway, unconnected network namespace per test."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from kproxy_nft.lab.netns import throwaway_netns

BACKENDS = ("nft", "legacy")


@pytest.fixture
def netns() -> Iterator[str]:
    """An empty network namespace `kpn-<random>`, deleted after the test even if it fails."""
    with throwaway_netns() as name:
        yield name


def run_in(ns: str, argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command inside a namespace (argument list, never a shell string)."""
    return subprocess.run(["ip", "netns", "exec", ns, *argv], input=stdin, capture_output=True, text=True)
