"""Parsing nf_tables notifications (kernel/nftables_events.py) from bytes recorded in a namespace.

tests/nft_monitor_recorded.txt holds the datagrams a NFNLGRP_NFTABLES socket received while, in
a fresh namespace: `nft -f` created table ip kproxy-nft with chains, a map, a rule and an element;
`nft delete element` removed it; `iptables-nft -t nat -N KUBE-SERVICES`, `-A PREROUTING -j
KUBE-SERVICES`, then `-F` ran. Each was its own process, so each commit names another pid.
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import pytest

from kproxy_nft.kernel.nftables_events import (
    Commit,
    CommitReader,
    Interest,
    MessageError,
    ObjectChange,
    table_dump_request,
    tables_in_dump,
)
from kproxy_nft.kernel.runner import own_pids

RECORDED = Path(__file__).with_name("nft_monitor_recorded.txt")
NFTABLES = Interest(tables=frozenset({("ip", "kproxy-nft"), ("ip6", "kproxy-nft")}))
IPTABLES_NFT = Interest(shared_tables=frozenset({(f, t) for f in ("ip", "ip6") for t in ("nat", "filter", "mangle")}))


def recorded() -> list[bytes]:
    return [bytes.fromhex(line) for line in RECORDED.read_text().splitlines() if not line.startswith("#")]


def commits() -> list[Commit]:
    reader = CommitReader()
    return [commit for datagram in recorded() for commit in reader.feed(datagram)]


def test_each_commit_lists_its_objects_then_its_generation_and_pid() -> None:
    found = commits()
    assert [c.generation for c in found] == [2, 3, 4, 5, 6]
    assert len({c.pid for c in found}) == 5 and all(c.pid for c in found)
    assert found[0].changes == (
        ObjectChange("new", "table", "ip", "kproxy-nft", "kproxy-nft"),
        ObjectChange("new", "chain", "ip", "kproxy-nft", "services"),
        ObjectChange("new", "set", "ip", "kproxy-nft", "service-ips"),
        ObjectChange("new", "chain", "ip", "kproxy-nft", "lb"),
        ObjectChange("new", "rule", "ip", "kproxy-nft", "services"),
        ObjectChange("new", "setelem", "ip", "kproxy-nft", "service-ips"),
    )
    assert found[1].changes == (ObjectChange("del", "setelem", "ip", "kproxy-nft", "service-ips"),)


def test_a_rule_names_the_chains_it_jumps_to() -> None:
    jump, flush = commits()[3:5]
    assert jump.changes[-1] == ObjectChange("new", "rule", "ip", "nat", "PREROUTING", ("KUBE-SERVICES",))
    assert flush.changes == (ObjectChange("del", "rule", "ip", "nat", "PREROUTING", ("KUBE-SERVICES",)),)


def test_interest_nftables_mode_owns_its_tables_and_nothing_else() -> None:
    found = commits()
    assert [NFTABLES.touched_by(c) for c in found] == [{"ip kproxy-nft"}, {"ip kproxy-nft"}, set(), set(), set()]
    assert NFTABLES.touched(ObjectChange("del", "table", "ip6", "kproxy-nft", "kproxy-nft")) == "ip6 kproxy-nft"
    assert NFTABLES.touched(ObjectChange("del", "table", "inet", "kproxy-nft", "kproxy-nft")) is None


def test_interest_iptables_nft_owns_kube_chains_and_jumps_to_them_in_shared_tables() -> None:
    found = commits()
    assert [IPTABLES_NFT.touched_by(c) for c in found] == [set(), set(), {"ip nat"}, {"ip nat"}, {"ip nat"}]
    docker = ObjectChange("new", "rule", "ip", "nat", "DOCKER", ("DOCKER-ISOLATION",))
    assert IPTABLES_NFT.touched(docker) is None
    assert IPTABLES_NFT.touched(ObjectChange("del", "table", "ip", "nat", "nat")) == "ip nat"
    assert IPTABLES_NFT.touched(ObjectChange("new", "table", "ip", "nat", "nat")) is None


def test_the_objects_touched_narrow_a_check_only_when_nothing_but_rules_and_elements_changed() -> None:
    found = commits()
    assert IPTABLES_NFT.chains_touched_by(found[3]) == {"PREROUTING"}  # our jump, in a built-in chain
    assert IPTABLES_NFT.chains_touched_by(found[0]) == frozenset()  # nothing of ours
    assert NFTABLES.chains_touched_by(found[0]) is None  # a table, a set: compare everything
    assert NFTABLES.chains_touched_by(found[1]) == {"@service-ips"}  # an element: that set


def test_objects_wait_for_their_generation_across_datagrams() -> None:
    reader = CommitReader()
    objects, generation = recorded()[0], recorded()[1]
    assert reader.feed(objects) == []
    (commit,) = reader.feed(generation)
    assert len(commit.changes) == 6
    reader.feed(objects)
    reader.lost()  # an overrun: what was collected belongs to an unknown commit
    (commit,) = reader.feed(generation)
    assert commit.changes == ()


def test_other_subsystems_and_messages_are_ignored() -> None:
    header = struct.pack("=IHHII", 16 + 4, (1 << 8) | 0, 0, 0, 0)  # ctnetlink, not nf_tables
    assert CommitReader().feed(header + b"\x02\x00\x00\x00") == []


@pytest.mark.parametrize("cut", [17, 30, 100])
def test_truncated_bytes_are_an_error_not_a_guess(cut: int) -> None:
    with pytest.raises(MessageError):  # the header promises more than arrived
        CommitReader().feed(recorded()[0][:cut])


def test_our_threads_count_as_ours() -> None:
    """The kernel names a committer by thread id; libnftables commits from the agent's loop thread."""
    seen: list[frozenset[int]] = []
    thread = threading.Thread(target=lambda: seen.append(own_pids() & {threading.get_native_id()}))
    thread.start()
    thread.join()
    assert seen[0] and os.getpid() in own_pids()


def test_outside_the_hosts_pid_namespace_the_monitor_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Commits name host pids: in a pid namespace of its own the agent could not tell its own
    commits and would repair itself forever, so it refuses and the agent probes instead."""
    from kproxy_nft.kernel import nft_monitor

    monkeypatch.setattr(nft_monitor, "in_host_pid_namespace", lambda: False)
    with pytest.raises(OSError, match="hostPID"):
        nft_monitor.NftMonitor(None, NFTABLES, lambda tables, chains: None)


def _message(msg_type: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), msg_type, 0x2, 1, 0) + body + b"\0" * (-len(body) % 4)


def _table(family: int, name: str) -> bytes:
    """A NEWTABLE message as the kernel dumps it: nfgenmsg, then NFTA_TABLE_NAME."""
    payload = name.encode() + b"\0"
    attribute = struct.pack("=HH", 4 + len(payload), 1) + payload + b"\0" * (-len(payload) % 4)
    return _message(10 << 8, bytes([family, 0, 0, 0]) + attribute)


def test_a_table_dump_request_asks_every_family_for_a_dump() -> None:
    request = table_dump_request(sequence=7)
    length, msg_type, flags, sequence, port = struct.unpack_from("=IHHII", request)
    assert (length, msg_type, flags, sequence, port) == (len(request), 10 << 8 | 1, 0x301, 7, 0)
    assert request[16:] == b"\0\0\0\0"  # AF_UNSPEC: every family


def test_a_table_dump_gives_family_and_name_until_done_or_an_error() -> None:
    first = _table(2, "kproxy-nft") + _table(10, "kproxy-nft")
    assert tables_in_dump(first) == (["ip kproxy-nft", "ip6 kproxy-nft"], False, 0)
    assert tables_in_dump(_table(1, "kube-proxy") + _message(3, b"\0" * 4)) == (["inet kube-proxy"], True, 0)
    assert tables_in_dump(_message(2, struct.pack("=i", -1) + b"\0" * 16)) == ([], True, 1)  # EPERM
