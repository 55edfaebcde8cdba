"""The tracer against real packets: what `kproxy-nft trace` predicts is what the probes saw.

`traced_probe(lab, mode, client, ip, port, …)` sends the probe (`Lab.probe`) and traces the same
packet through the rules the node namespace holds at that moment, read back from the kernel
(`iptables-<backend>-save` / `ip6tables-…`, or `nft list ruleset`), exactly as `trace --live`
reads a node. Then `assert_trace_matches` holds the prediction against the attempts:

* verdict `dnat`: every attempt answered, by endpoints of the trace only, and by all of them
  when the probe was long enough that missing one would be a one-in-a-million chance;
  masquerade: an endpoint the trace masquerades saw a node address, any other the client's own;
* `reject`: every attempt refused; `drop`: every attempt timed out;
* `none` / `accept`: no pod answered (what answers is the node or upstream, not a service).

Every test that probes through it checks the tracer too. Reading the rules changes nothing.
"""

from __future__ import annotations

import re

import pytest

from kproxy_nft.kernel.iptables_text import parse_save
from kproxy_nft.lab import NODE, Lab, ProbeResult
from kproxy_nft.model import IPFamily, ip_family
from kproxy_nft.trace import Program, Trace, iptables_program, nftables_program, parse_packet, trace

MISS_CHANCE = 1e-6  # a predicted endpoint may go unseen only when that is at least this likely


def read_rules(lab: Lab, mode: str, family: IPFamily) -> str:
    """The node namespace's rules of `mode` (iptables-nft, iptables-legacy, nftables) as text."""
    if mode == "nftables":
        return lab.run_in(NODE, ["nft", "list", "ruleset"]).stdout
    tool = "iptables" if family is IPFamily.V4 else "ip6tables"
    return lab.run_in(NODE, [f"{tool}-{mode.split('-')[1]}-save"]).stdout


def node_local(lab: Lab) -> frozenset[str]:
    return frozenset((*lab.node_ips, *lab.node_ips6))


def source_of(lab: Lab, client: str, dst: str) -> str:
    """The source address `client` sends to `dst` from: its own, or the node's route choice."""
    if client != NODE:
        return lab.ip_of(client) if ip_family(dst) is IPFamily.V4 else lab.ip6_of(client)
    route = lab.run_in(NODE, ["ip", "route", "get", dst]).stdout
    m = re.search(r"\bsrc (\S+)", route)
    assert m, f"no source address for {dst} in the node: {route!r}"
    return m.group(1)


def kernel_program(lab: Lab, mode: str, family: IPFamily) -> Program:
    local = node_local(lab)
    text = read_rules(lab, mode, family)
    if mode == "nftables":
        program = nftables_program(text, family, local)
        assert program is not None, f"no kproxy-nft table of {family.name} in the node:\n{text}"
        return program
    return iptables_program(parse_save(text, family), local)


def predict(lab: Lab, mode: str, client: str, ip: str, port: int, proto: str = "tcp") -> Trace:
    """The trace of `client` → `ip:port` through the rules the node holds now."""
    dst = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    packet = parse_packet(source_of(lab, client, ip), dst, proto)
    return trace(kernel_program(lab, mode, packet.family), packet, node_local(lab))


def _pod_of_ip(lab: Lab) -> dict[str, str]:
    found = {}
    for name, attachment in lab.attachments.items():
        if attachment.is_pod:
            found[attachment.ip] = name
            if attachment.ip6:
                found[attachment.ip6] = name
    return found


def assert_trace_matches(lab: Lab, mode: str, client: str, predicted: Trace, res: ProbeResult) -> None:
    """The prediction equals what the attempts of `res` did (see the module docstring)."""
    why = f"[{mode}] {client} → {res.target}: trace {predicted.as_dict()}, probes {res.summary()}"
    pods = _pod_of_ip(lab)
    answered = {a.pod for a in res.attempts if a.ok}
    if predicted.verdict == "reject":
        assert res.error_counts() == {"refused": len(res)}, why
    elif predicted.verdict == "drop":
        assert res.error_counts() == {"timeout": len(res)}, why
    elif predicted.verdict in ("none", "accept"):
        assert not answered & set(pods.values()), why
    else:
        assert res.ok, why
        ip_of = {e.address: e.address.rpartition(":")[0].strip("[]") for e in predicted.endpoints}
        expected = {pods.get(ip, ip) for ip in ip_of.values()}
        assert answered <= expected, why
        sure = all((1 - e.probability) ** len(res) < MISS_CHANCE for e in predicted.endpoints)
        assert answered == expected or not sure, why
        masqueraded = {pods.get(ip_of[a], a) for a in predicted.masqueraded_endpoints}
        source = source_of(lab, client, res.target.rpartition(":")[0].strip("[]"))
        for attempt in res.attempts:
            seen = attempt.seen_ip
            if attempt.pod in masqueraded:
                assert seen in node_local(lab), f"{why}: {attempt.pod} saw {seen}, not a node address"
            else:
                assert seen == source, f"{why}: {attempt.pod} saw {seen}, not the client's {source}"


def mode_under_test(request: pytest.FixtureRequest) -> str:
    """The mode a parametrized kernel test runs in (iptables-nft, iptables-legacy, nftables)."""
    params = request.node.callspec.params
    return str(next(params[name] for name in ("mode", "program", "make_backend") if name in params))


def traced_probe(lab: Lab, mode: str, client: str, ip: str, port: int, **probe: object) -> ProbeResult:
    """`lab.probe(client, ip, port, **probe)`, checked against the trace of the same packet."""
    predicted = predict(lab, mode, client, ip, port, str(probe.get("proto", "tcp")))
    res = lab.probe(client, ip, port, **probe)  # type: ignore[arg-type]
    assert_trace_matches(lab, mode, client, predicted, res)
    return res
