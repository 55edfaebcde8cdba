"""Re-record tests/golden/recorded/*.save: the compiler's rules as the kernel prints them back.

Each recording is one ruleset loaded with `iptables-restore` into a throwaway network namespace
and read back with `iptables-save` (the backend named in the file name). The canonicalization
tests (tests/test_iptables_text.py) compare every compiled rule with these lines, so run this
after a deliberate change to the compiler's rule text, then review the diff. Needs root:
    python -m tests.record_iptables
"""

from __future__ import annotations

import subprocess

from kproxy_nft.compile.iptables import render_restore
from kproxy_nft.lab.netns import throwaway_netns
from tests.test_iptables_text import RECORDED, RECORDINGS_DIR, recording_inputs


def record(name: str) -> str:
    ruleset, backend = recording_inputs(name)
    tool = "iptables" if ruleset.family == 4 else "ip6tables"
    with throwaway_netns() as ns:
        exec_ns = ["ip", "netns", "exec", ns]
        subprocess.run([*exec_ns, f"{tool}-{backend}-restore"], input=render_restore(ruleset), text=True, check=True)
        return subprocess.run([*exec_ns, f"{tool}-{backend}-save"], capture_output=True, text=True, check=True).stdout


def main() -> None:
    for name in RECORDED:
        (RECORDINGS_DIR / f"{name}.save").write_text(record(name))
        print(f"recorded {name}")


if __name__ == "__main__":
    main()
