"""The nftables fake on its own (no root): all or nothing, its refusals, its listings, and the backend on top of it.

Whether its rules are the kernel's is checked in tests/kernel/test_nftables_fake.py, against a
real kernel; here, what a test relying on the fake may count on.
"""

from __future__ import annotations

import pytest

from kproxy_nft.compile.nftables import TABLE, compile_all, render_script
from kproxy_nft.kernel.nftables import NftablesBackend, NftablesError, read_table
from kproxy_nft.kernel.nftables_fake import FakeNftables, FakeNftablesError, FakeTransport
from kproxy_nft.kernel.nftables_text import parse_json_elements, parse_listing
from kproxy_nft.model import ClusterState
from tests.test_compile_nftables import every_type

SMALL = """table ip t {
\tmap m {
\t\ttype ipv4_addr . inet_proto . inet_service : verdict
\t}
\tchain a {
\t\tjump b
\t}
\tchain b {
\t}
}
add element ip t m { 1.1.1.1 . tcp . 80 : goto b }
"""


def small() -> FakeNftables:
    fake = FakeNftables()
    fake.apply(SMALL)
    return fake


def test_a_refused_transaction_changes_nothing_and_names_the_statement() -> None:
    fake = small()
    before = fake.listing("ip", "t")
    with pytest.raises(FakeNftablesError) as e:
        fake.apply("add chain ip t c\nadd rule ip t c jump a\ndelete chain ip t b\n")
    assert e.value.line == 3 and e.value.statement == "delete chain ip t b"
    assert "Device or resource busy" in e.value.reason and "a rule of a" in e.value.reason
    assert fake.listing("ip", "t") == before


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("add rule ip t b jump nope", "No such file or directory"),
        ("add element ip t m { 2.2.2.2 . tcp . 80 : goto nope }", "No such file or directory"),
        ("delete element ip t m { 1.1.1.1 . tcp . 80 }\ndelete element ip t m { 1.1.1.1 . tcp . 80 }", "No such"),
        ("add element ip t m { 1.1.1.1 . tcp . 80 : drop }", "File exists"),
        ("delete chain ip t b", "Device or resource busy"),
        ("add element ip t m { 1.1.1.1 : drop }", "datatype mismatch"),
        ("this is not nft", "Invalid argument"),
    ],
)
def test_refusals(text: str, reason: str) -> None:
    with pytest.raises(FakeNftablesError, match=reason):
        small().apply(text)


def test_statements_run_in_order_so_the_element_goes_before_its_chain() -> None:
    fake = small()
    fake.apply("delete element ip t m { 1.1.1.1 . tcp . 80 }\ndelete chain ip t a\ndelete chain ip t b\n")
    assert parse_listing(fake.listing("ip", "t"))[1] == {}
    # A kernel before 6.2 releases the element's reference only at commit.
    old = FakeNftables(pre_6_2_kernel=True)
    old.apply(SMALL)
    with pytest.raises(FakeNftablesError, match="before 6.2"):
        old.apply("delete element ip t m { 1.1.1.1 . tcp . 80 }\ndelete chain ip t a\ndelete chain ip t b\n")
    old.apply("delete element ip t m { 1.1.1.1 . tcp . 80 }\ndelete chain ip t a\n")
    old.apply("delete chain ip t b\n")


def test_the_listing_loads_back_into_the_same_state() -> None:
    state, node = every_type()
    fake = FakeNftables()
    fake.apply(render_script(compile_all(state, node)))
    again = FakeNftables()
    again.apply(fake.listing("ip", TABLE) + fake.listing("ip6", TABLE))
    for family in ("ip", "ip6"):
        assert parse_listing(again.listing(family, TABLE)) == parse_listing(fake.listing(family, TABLE))


def test_dynamic_maps_list_as_json_with_their_timeouts() -> None:
    state, node = every_type()
    fake = FakeNftables()
    fake.apply(render_script(compile_all(state, node)))
    fake.apply(f"add element ip {TABLE} affinity-tcp {{ 10.9.9.1 . 10.96.0.12 . 443 timeout 1h : 10.1.0.22 . 8443 }}")
    listed = fake.json_elements("ip", TABLE, "affinity-tcp")
    assert '"timeout": 3600' in listed
    assert parse_json_elements(listed) == {"10.9.9.1 . 10.96.0.12 . 443": "10.1.0.22 . 8443"}
    assert parse_json_elements(fake.json_elements("ip", TABLE, "service-nodeports"))["tcp . 30080"].startswith("goto ")


def test_the_backend_runs_on_the_fake() -> None:
    state, node = every_type()
    transport = FakeTransport()
    with NftablesBackend(transport=transport) as backend:
        assert read_table(transport, "ip") is None  # nothing yet: the listing fails as nft's does
        first = backend.sync(compile_all(state, node))
        assert first.summary.full and backend.full_sync(compile_all(state, node)).is_empty
        name = next(n for n in sorted(state.services) if len(state.endpoints_of(n)) > 1)
        fewer = ClusterState(state.services, {**state.endpoints, name: state.endpoints[name][:1]})
        assert not backend.sync(compile_all(fewer, node)).is_empty
        assert backend.full_sync(compile_all(fewer, node)).summary.drift == 0
        transport.fake.refuse = lambda statement: statement.startswith("add element")
        with pytest.raises(NftablesError, match="refused by the test"):
            backend.sync(compile_all(state, node))
        backend.cleanup()
    assert transport.fake.tables == {}
    assert [c for c, _ in transport.calls if c.startswith("list table")]
