"""The node's interface addresses, read with pyroute2 (netlink), for `--nodeport-addresses CIDR`.

kube-proxy serves NodePorts on every interface address inside the given CIDRs, not only on the
node IPs; the agent and `apply` read them here (in the node's network namespace), while `dump`,
which reads no kernel, knows only `--node-ip`.
"""

from __future__ import annotations

import ipaddress

from kproxy_nft.kernel.netns import entered


def local_addresses(netns: str | None = None) -> tuple[str, ...]:
    """Every address on the interfaces of `netns` (the caller's namespace when None), sorted."""
    from pyroute2 import IPRoute  # here: ~0.1 s to import, which `dump` and the other commands never need
    with entered(netns), IPRoute() as ipr:
        found = {str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr() if a.get_attr("IFA_ADDRESS")}
    return tuple(sorted(found, key=lambda ip: (ipaddress.ip_address(ip).version, ipaddress.ip_address(ip))))
