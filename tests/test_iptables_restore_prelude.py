"""When iptables-nft gets the cache prelude (`-S` first, see `kernel.iptables._NFT_PRELUDE_FROM`).

Its chain list costs commands × distinct chains named: a first sync of thousands of services
needs the prelude, but a rewrite of one large chain (KUBE-SERVICES after someone flushed it,
the drift repair) does not, and fetching every chain would cost it more than the list does.
"""

from __future__ import annotations

from kproxy_nft.kernel.iptables import Host, IptablesBackend, apply, read_state
from kproxy_nft.kernel.iptables_fake import FakeIptables
from kproxy_nft.kernel.iptables_plan import plan
from kproxy_nft.model import IPFamily
from tests.test_reconcile import NS, many_services


def test_only_a_payload_naming_many_chains_gets_the_prelude() -> None:
    desired = many_services(5200)
    fake = FakeIptables()
    host = Host(IptablesBackend.NFT, NS, fake)
    apply(plan(desired, read_state(host)), host)
    assert "-S" in (fake.calls[-1][1] or "").splitlines()  # the first sync: thousands of chains
    flushed = host.run(IPFamily.V4, "restore", "-w", "--noflush", input="*nat\n:KUBE-SERVICES - [0:0]\nCOMMIT\n")
    assert flushed.returncode == 0
    repair = plan(desired, read_state(host))
    assert len(repair.payload.splitlines()) > 5000  # what got the prelude before, by its length…
    apply(repair, host)
    sent = fake.calls[-1][1] or ""
    assert "-S" not in sent.splitlines() and sent == repair.payload  # …but it names one chain
    assert plan(desired, read_state(host)).is_empty
