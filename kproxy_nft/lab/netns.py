"""One empty, unconnected network namespace `kpn-<random>` for as long as a `with` block lasts.

For kernel tests and benchmarks that need a kernel of their own but no topology (a full `Lab`
is for packets). Deleted on exit, also on failure; never connected to the root namespace.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def throwaway_netns(prefix: str = "kpn") -> Iterator[str]:
    name = f"{prefix}-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)
