"""Read the per-endpoint connection counters the kernel keeps; `kproxy_nft.top` makes sense of them.

Thin on purpose: each function runs the listings and returns their text, unparsed.

* nftables mode: `nft list map <family> kproxy-nft backends-<proto>`, one listing per map (the
  maps are declared with `counter`, so each element, one endpoint of one cluster IP and port,
  carries its own counter). A map or table that is not there is skipped. nft takes about 10 s
  to list 300,000 elements (30,000 services of 10 endpoints), JSON or text alike.
* iptables mode: `iptables-save -c -t nat` per family (the packet counters of the `KUBE-SEP-…`
  DNAT rules). Only reads: `-c` prints the counters, it does not reset them (that is `-Z`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from kproxy_nft.compile.nftables import PROTOCOLS, TABLE, backends_map, nft_family
from kproxy_nft.kernel import libnftables
from kproxy_nft.kernel.iptables import Host, IptablesError
from kproxy_nft.kernel.nftables_transport import MISSING, Transport, make_transport
from kproxy_nft.kernel.runner import kernel_has_ipv6
from kproxy_nft.model import IPFamily, Protocol


class CounterReadError(RuntimeError):
    """The counters could not be read (not root, a tool missing, …); the message says why."""


def read_nftables_counters(
    transport: Transport, families: Iterable[IPFamily] = (IPFamily.V4, IPFamily.V6)
) -> dict[tuple[IPFamily, Protocol], str]:
    """(family, protocol) → the `nft list map` text of that backend map, for the maps there are."""
    out = {}
    for family in families:
        for proto in PROTOCOLS:
            command = f"list map {nft_family(family)} {TABLE} {backends_map(proto)}"
            result = transport.run(command, libnftables.PLAIN)
            if result.returncode == 0:
                out[(family, proto)] = result.stdout
            elif MISSING not in result.stderr:  # no table (or map) of this family: nothing counted
                raise CounterReadError(f"{command}: {result.stderr.strip() or 'failed'}")
    return out


def read_iptables_counters(
    host: Host, families: Iterable[IPFamily] = (IPFamily.V4, IPFamily.V6)
) -> dict[IPFamily, str]:
    """family → `iptables-save -c -t nat` output (the DNAT rules of the `KUBE-SEP-…` chains)."""
    out = {}
    for family in families:
        result = host.run(family, "save", "-c", "-t", "nat")
        if result.returncode != 0:
            raise CounterReadError(f"{' '.join(host.argv(family, 'save', '-c', '-t', 'nat'))}: "
                                   f"{result.stderr.strip() or f'exit status {result.returncode}'}")
        out[family] = result.stdout
    return out


def present_families(families: Iterable[IPFamily]) -> list[IPFamily]:
    """`families`, IPv6 left out on a kernel booted without it."""
    return [f for f in families if f is IPFamily.V4 or kernel_has_ipv6()]


@contextmanager
def reading() -> Iterator[None]:
    """What goes wrong while the counters are read (OSError, IptablesError), as `CounterReadError`."""
    try:
        yield
    except (OSError, IptablesError) as e:
        raise CounterReadError(f"{type(e).__name__}: {e}") from e


def read_nftables_listings(netns: str | None, families: Iterable[IPFamily]) -> list[str]:
    """The `nft list map` texts of our backend maps in `netns` (the maps there are), through the
    nft command, not libnftables: its errors come back to us, while libnftables prints its own
    on stderr first."""
    transport = make_transport(netns, use_libnftables=False)
    try:
        return list(read_nftables_counters(transport, families).values())
    finally:
        transport.close()


__all__ = [
    "CounterReadError",
    "present_families",
    "read_iptables_counters",
    "read_nftables_counters",
    "read_nftables_listings",
    "reading",
]
