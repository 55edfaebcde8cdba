"""`kproxy-nft dump` of the every-type object sets, per backend and family, against reviewed goldens.

Two object sets hold every Service type and policy (node ports, external and LB IPs with source
ranges and an `ipMode: Proxy` ingress, external/internal traffic policy Local with and without
local endpoints, no endpoints, terminating endpoints, affinity, UDP and SCTP, dual-stack):
tests/golden/every-type/ (kube-proxy's node "node-a") and tests/golden/every-type-shop.yaml
(with ServiceCIDR objects). Each is dumped for both backends, so one object set can be read
side by side in kube-proxy's iptables layout and in our nftables layout. Regenerate after an
intended change with `python -m tests.test_golden_dumps` and review the diff.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import GOLDEN

NODE_FLAGS = ["--node-ip", "192.168.100.1", "--cluster-cidr", "10.1.0.0/16"]
SETS = {
    "every-type": [str(GOLDEN / "every-type"), "--hostname-override", "node-a", "--service-cidr", "10.96.0.0/12"],
    "every-type-shop": [str(GOLDEN / "every-type-shop.yaml"), "--hostname-override", "node1"],
}
OUTPUTS = {
    "iptables": ["--proxy-mode", "iptables", "--ip-family", "4"],
    "ip6tables": ["--proxy-mode", "iptables", "--ip-family", "6"],
    "dump.nft": ["--proxy-mode", "nftables"],
}
CASES = [(name, ext) for name in SETS for ext in OUTPUTS]


def dump(name: str, ext: str) -> str:
    path, *flags = SETS[name]
    result = subprocess.run(
        [sys.executable, "-m", "kproxy_nft.cli", "dump", "-f", path, *flags, *NODE_FLAGS, *OUTPUTS[ext]],
        capture_output=True, text=True, check=True,
    )
    return result.stdout


@pytest.mark.parametrize(("name", "ext"), CASES, ids=[f"{n}.{e}" for n, e in CASES])
def test_dump_matches_golden(name: str, ext: str) -> None:
    assert dump(name, ext) == (GOLDEN / f"{name}.{ext}").read_text()


if __name__ == "__main__":
    for name, ext in CASES:
        (GOLDEN / f"{name}.{ext}").write_text(dump(name, ext))
        print(f"wrote {name}.{ext}")
