"""`kproxy-nft run` as a child process of a kernel test: its command line, its log, a clean stop."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

Start = Callable[..., subprocess.Popen[Any]]


def run_argv(manifests: Path, mode: str, *options: str) -> list[str]:
    """`kproxy-nft run` on a manifest directory as node1 of cluster 10.1.0.0/16, syncing every 0.1 s at most."""
    cli = [sys.executable, "-c", "from kproxy_nft.cli import main; main()"]
    node = ["--hostname-override", "node1", "--cluster-cidr", "10.1.0.0/16", "--min-sync-period", "0.1"]
    return [*cli, "run", "--manifests", str(manifests), "--proxy-mode", mode, "--iptables-backend", "nft",
            *node, *options]  # fmt: skip


def write(path: Path, text: str) -> None:
    """Replace atomically, so the agent's manifest poller never reads half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.rename(path)


class Agent:
    """A running agent and the file that takes its stdout and stderr."""

    def __init__(self, process: subprocess.Popen[Any], log: IO[str]) -> None:
        self.process = process
        self._log = log

    def log(self) -> str:
        """All the agent wrote so far."""
        self._log.seek(0)
        return self._log.read()


@contextmanager
def running_agent(start: Start, argv: list[str], log_path: Path) -> Iterator[Agent]:
    """`start(argv, stdout=…, stderr=…)` (`subprocess.Popen`, or `Lab.spawn` bound to a namespace).

    On leaving the block the agent gets SIGINT and must be gone within 10 s (else it is killed and
    the test fails); when the block went through, it must also have exited with status 0.
    """
    with log_path.open("w+") as log:
        process = start(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield Agent(process, log)
        finally:
            process.send_signal(signal.SIGINT)
            try:
                code = process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise
    assert code == 0
