"""The nftables fake against the real kernel: the same transaction to both, the same verdict, the same listing.

Each case starts the fake and a throwaway namespace (`kpn-…`) from the same small table, sends
one transaction to both, and asserts that both refuse it or both accept it (with the errno the
kernel named, when it named one), and that both then list the same declarations, chains and
elements (parsed: nft orders elements by hash). Every refusal rule of `nftables_fake` has a case
here, and so does its accepted neighbour. Then the backend itself drives both through the same
syncs, so the planner's real output is checked too.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kproxy_nft.compile.nftables import compile_all, render_script
from kproxy_nft.kernel.nftables import NftablesBackend, read_table
from kproxy_nft.kernel.nftables_fake import EBUSY, EEXIST, ENOENT, EOPNOTSUPP, FakeNftables, FakeTransport
from kproxy_nft.kernel.nftables_text import KernelTable, parse_json_elements, parse_listing
from kproxy_nft.kernel.nftables_transport import CommandTransport
from kproxy_nft.model import ClusterState
from tests.kernel.conftest import run_in
from tests.test_compile_nftables import every_type

pytestmark = pytest.mark.kernel

BASE = """table ip t {
\tcomment "base"
\tmap m {
\t\ttype ipv4_addr . inet_proto . inet_service : verdict
\t}
\tmap b {
\t\ttypeof ip daddr . tcp dport . numgen random mod 65536 : ip daddr . tcp dport
\t}
\tmap aff {
\t\ttypeof ip saddr . ip daddr . tcp dport : ip daddr . tcp dport
\t\tsize 1048576
\t\tflags dynamic,timeout
\t}
\tset s {
\t\ttype ipv4_addr
\t}
\tchain base {
\t\ttype nat hook prerouting priority -100; policy accept;
\t\tip daddr . meta l4proto . th dport vmap @m
\t}
\tchain c1 {
\t\tjump c2
\t}
\tchain c2 {
\t\tip daddr @s drop
\t}
\tchain c3 {
\t}
\tchain c4 {
\t\tmeta l4proto tcp update @aff { ct original ip saddr . ct original ip daddr . ct original proto-dst timeout 3h : ip daddr . tcp dport }
\t\tdnat ip to ip daddr . tcp dport . numgen random mod 2 map @b
\t\tmeta l4proto tcp dnat ip to numgen random mod 2 map { 0 : 10.1.0.1 . 80, 1 : 10.1.0.2 . 80 }
\t}
}
add element ip t m { 1.1.1.1 . tcp . 80 : goto c3, 1.1.1.2 . tcp . 80 : drop }
add element ip t b { 10.96.0.1 . 80 . 0 : 10.1.0.1 . 8080 }
add element ip t s { 2.2.2.2 }
add element ip t aff { 10.9.9.1 . 10.96.0.1 . 80 timeout 1h : 10.1.0.1 . 8080 }
"""  # noqa: E501 (one rule per line, as nft lists it)

M1 = "1.1.1.1 . tcp . 80"
REFUSED: dict[str, tuple[str, str | None]] = {
    # a reference to something missing (or to a base chain)
    "rule jumps to a missing chain": ("add rule ip t c3 jump nope", ENOENT),
    "rule goes to a missing chain": ("add rule ip t c3 goto nope", ENOENT),
    "anonymous vmap to a missing chain": ("add rule ip t c3 tcp dport vmap { 80 : goto nope }", ENOENT),
    "rule names a missing set": ("add rule ip t c3 ip daddr @nope drop", ENOENT),
    "element goes to a missing chain": ("add element ip t m { 3.3.3.3 . tcp . 80 : goto nope }", ENOENT),
    "rule jumps to a base chain": ("add rule ip t c3 jump base", EOPNOTSUPP),
    "element goes to a base chain": ("add element ip t m { 3.3.3.3 . tcp . 80 : goto base }", EOPNOTSUPP),
    "rule jumps to a chain declared after it": ("add chain ip t x\nadd rule ip t x jump y\nadd chain ip t y", None),
    "rule into a missing chain": ("add rule ip t nope accept", None),
    "element into a missing set": ("add element ip t nope { 1.2.3.4 }", None),
    "flush of a missing chain": ("flush chain ip t nope", ENOENT),
    # deleting what is still used, or not there
    "delete a chain a rule jumps to": ("delete chain ip t c2", EBUSY),
    "delete a chain an element goes to": ("delete chain ip t c3", EBUSY),
    "delete a chain, then the element going to it": (f"delete chain ip t c3\ndelete element ip t m {{ {M1} }}", EBUSY),
    "add a jump, then delete its target": ("add chain ip t y\nadd rule ip t c3 jump y\ndelete chain ip t y", EBUSY),
    "delete a set a rule names": ("delete set ip t s", EBUSY),
    "delete a map a rule names": ("delete map ip t m", EBUSY),
    "delete a missing chain": ("delete chain ip t nope", None),
    "delete a missing table": ("delete table ip nope", ENOENT),
    "delete a missing element": ("delete element ip t s { 9.9.9.9 }", ENOENT),
    "delete an element twice in one command": ("delete element ip t s { 2.2.2.2, 2.2.2.2 }", ENOENT),
    "delete an element twice in one transaction": ("delete element ip t s { 2.2.2.2 }\n" * 2, ENOENT),
    # existing things
    "add an element with another value": (f"add element ip t m {{ {M1} : goto c2 }}", EEXIST),
    "add an element with another verdict": (f"add element ip t m {{ {M1} : drop }}", EEXIST),
    "one key twice with two values in one command": (
        "add element ip t m { 4.4.4.4 . tcp . 80 : goto c3, 4.4.4.4 . tcp . 80 : goto c2 }", EEXIST),
    "one key twice with two values in two commands": (
        "add element ip t m { 4.4.4.4 . tcp . 80 : goto c3 }\nadd element ip t m { 4.4.4.4 . tcp . 80 : goto c2 }",
        EEXIST),
    "create an element that exists": (f"create element ip t m {{ {M1} : goto c3 }}", EEXIST),
    "create a chain that exists": ("create chain ip t c1", EEXIST),
    "add a base chain with another priority": (
        "add chain ip t base { type nat hook prerouting priority -90; policy accept; }", EOPNOTSUPP),
    "add a hook to a regular chain": ("add chain ip t c3 { type nat hook output priority -100; policy accept; }",
                                      EOPNOTSUPP),
    "declare a set again with another type": ("add set ip t s { type ipv6_addr; }", EEXIST),
    # elements that do not fit their declaration
    "a key with too few parts": ("add element ip t m { 1.2.3.4 : goto c3 }", None),
    "a value in a set": ("add element ip t s { 1.2.3.4 : goto c3 }", None),
    "no value in a map": ("add element ip t m { 1.2.3.4 . tcp . 80 }", None),
    "a value with too few parts": ("add element ip t b { 10.96.0.1 . 80 . 1 : 10.1.0.1 }", None),
    # all or nothing
    "a good command, then a bad one": ("add element ip t s { 7.7.7.7 }\ndelete element ip t s { 9.9.9.9 }", ENOENT),
}  # fmt: skip

ACCEPTED: dict[str, str] = {
    "delete the element going to a chain, then the chain": f"delete element ip t m {{ {M1} }}\ndelete chain ip t c3",
    "delete a chain with rules nothing jumps to": "delete chain ip t c1",
    "delete a base chain": "delete chain ip t base",
    "flush a chain, then delete the chain it jumped to": "flush chain ip t c1\ndelete chain ip t c2",
    "add an element that exists with the same value": f"add element ip t m {{ {M1} : goto c3 }}",
    "add a set element that exists": "add element ip t s { 2.2.2.2 }",
    "one key twice with one value in one command": "add element ip t m { 4.4.4.4 . tcp . 80 : goto c3, "
                                                   "4.4.4.4 . tcp . 80 : goto c3 }",
    "delete an element, then add it with another value": f"delete element ip t m {{ {M1} }}\n"
                                                         f"add element ip t m {{ {M1} : goto c2 }}",
    "add a chain that exists": "add chain ip t c1",
    "add a base chain that exists, without its hook": "add chain ip t base",
    "add a base chain that exists, with the same hook": "add chain ip t base "
                                                        "{ type nat hook prerouting priority -100; policy accept; }",
    "declare a set again the same way": "add set ip t s { type ipv4_addr; }",
    "add a table that exists": "add table ip t",
    "add and delete a table (cleanup)": "add table ip t\ndelete table ip t\nadd table ip6 t\ndelete table ip6 t",
    "flush a table: rules go, elements stay": "flush table ip t",
    "flush a map": "flush map ip t b",
    "delete a map no rule names": "delete chain ip t c4\ndelete map ip t aff",
    "a table block refers forward": "table ip t2 {\n\tchain a {\n\t\tjump b\n\t}\n\tchain b {\n\t\tip daddr @s2 drop\n"
                                    "\t}\n\tset s2 {\n\t\ttype ipv4_addr\n\t}\n}",
    "a table block adds rules to existing chains": "table ip t {\n\tchain c3 {\n\t\tjump c2\n\t}\n}",
    "an affinity entry re-added with a short timeout, then deleted (the planner's cleanup)": (
        "add element ip t aff { 10.9.9.1 . 10.96.0.1 . 80 timeout 1s : 10.1.0.1 . 8080 }\n"
        "delete element ip t aff { 10.9.9.1 . 10.96.0.1 . 80 }"),
    "a new affinity entry": "add element ip t aff { 10.9.9.2 . 10.96.0.1 . 80 timeout 1h : 10.1.0.2 . 8080 }",
    "elements in a map declaration": "add map ip t m2 { type inet_service : verdict; elements = { 80 : goto c3 }; }",
}  # fmt: skip


@pytest.fixture
def pair(netns: str) -> Iterator[tuple[str, FakeNftables]]:
    """A namespace and a fake, both holding BASE."""
    loaded = run_in(netns, ["nft", "-f", "-"], BASE)
    assert loaded.returncode == 0, loaded.stderr
    fake = FakeNftables()
    fake.apply(BASE)
    yield netns, fake


def kernel_view(netns: str, family: str, table: str) -> tuple[object, ...] | None:
    listing = run_in(netns, ["nft", "-y", "list", "table", family, table])
    if listing.returncode != 0:
        return None
    sets, chains, elements = parse_listing(listing.stdout)
    dynamic = {}
    for name, decl in sets.items():
        if any("dynamic" in line for line in decl.body):
            listed = run_in(netns, ["nft", "-j", "list", decl.keyword, family, table, name]).stdout
            dynamic[name] = parse_json_elements(listed)
            elements.pop(name, None)
    return sets, chains, elements, dynamic


def fake_view(fake: FakeNftables, family: str, table: str) -> tuple[object, ...] | None:
    if fake.table(family, table) is None:
        return None
    sets, chains, elements = parse_listing(fake.listing(family, table))
    dynamic = {}
    for name, decl in sets.items():
        if any("dynamic" in line for line in decl.body):
            dynamic[name] = parse_json_elements(fake.json_elements(family, table, name))
            elements.pop(name, None)
    return sets, chains, elements, dynamic


def send_to_both(netns: str, fake: FakeNftables, text: str) -> tuple[str | None, str | None]:
    """(kernel error, fake error) of one transaction, None where it was accepted."""
    kernel = run_in(netns, ["nft", "-f", "-"], text + "\n")
    result = FakeTransport(fake).run(text + "\n")
    return (kernel.stderr if kernel.returncode else None), (result.stderr if result.returncode else None)


def assert_same_tables(netns: str, fake: FakeNftables) -> None:
    for family, table in (("ip", "t"), ("ip", "t2"), ("ip6", "t")):
        assert fake_view(fake, family, table) == kernel_view(netns, family, table), (family, table)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_the_fake_refuses_what_the_kernel_refuses(pair: tuple[str, FakeNftables], case: str) -> None:
    netns, fake = pair
    text, errno = REFUSED[case]
    kernel_error, fake_error = send_to_both(netns, fake, text)
    assert kernel_error is not None, "the kernel accepted it"
    assert fake_error is not None, f"the fake accepted what the kernel refused: {kernel_error}"
    if errno is not None:
        assert errno in kernel_error and errno in fake_error, (kernel_error, fake_error)
    assert_same_tables(netns, fake)  # nothing of it applied, in either


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_the_fake_accepts_what_the_kernel_accepts(pair: tuple[str, FakeNftables], case: str) -> None:
    netns, fake = pair
    kernel_error, fake_error = send_to_both(netns, fake, ACCEPTED[case])
    assert kernel_error is None, kernel_error
    assert fake_error is None, fake_error
    assert_same_tables(netns, fake)


def test_the_compilers_dump_lists_the_same(netns: str) -> None:
    state, node = every_type()
    script = render_script(compile_all(state, node))
    assert run_in(netns, ["nft", "-f", "-"], script).returncode == 0
    fake = FakeNftables()
    fake.apply(script)
    for family in ("ip", "ip6"):
        assert fake_view(fake, family, "kproxy-nft") == kernel_view(netns, family, "kproxy-nft")
        # The backend's own read path, through both transports, finds the same table.
        kernel_table = read_table(CommandTransport(netns), family)
        fake_table = read_table(FakeTransport(fake), family)
        assert isinstance(kernel_table, KernelTable) and fake_table == kernel_table


def test_the_backends_syncs_land_the_same_in_the_fake_and_the_kernel(netns: str) -> None:
    """The planner's real output, incremental and full, with tampering in between, sent to both."""
    state, node = every_type()
    fake = FakeNftables()
    steps = []
    names = sorted(state.services)
    for i in range(0, len(names), 3):  # services leave, come back, lose endpoints
        kept = {n: s for n, s in state.services.items() if n not in names[i:i + 3]}
        fewer = {n: e[:1] for n, e in state.endpoints.items() if n in names[i + 3:i + 6]}
        steps.append(ClusterState(kept, {**state.endpoints, **fewer}))
    steps.append(state)
    tamper = "delete element ip kproxy-nft cluster-ips { 10.96.0.10 }\nflush chain ip kproxy-nft masquerading\n"
    with NftablesBackend(netns) as kernel, NftablesBackend(transport=FakeTransport(fake)) as model:
        for step in steps:
            desired = compile_all(step, node)
            plans = kernel.sync(desired), model.sync(desired)
            assert plans[0].text == plans[1].text and plans[0].followup == plans[1].followup
            for family in ("ip", "ip6"):
                assert fake_view(fake, family, "kproxy-nft") == kernel_view(netns, family, "kproxy-nft")
        assert run_in(netns, ["nft", "-f", "-"], tamper).returncode == 0
        fake.apply(tamper)
        repaired = kernel.full_sync(compile_all(state, node)), model.full_sync(compile_all(state, node))
        assert repaired[0].text == repaired[1].text and repaired[0].summary.drift == repaired[1].summary.drift == 2
        assert fake_view(fake, "ip", "kproxy-nft") == kernel_view(netns, "ip", "kproxy-nft")
