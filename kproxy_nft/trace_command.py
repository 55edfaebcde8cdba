"""`kproxy-nft trace`: the shell around the pure tracer (`kproxy_nft.trace`).

Offline, the rules are compiled from the manifests (`-f`) with the same settings flags `dump`
takes; `--live` reads what the kernel holds now (`iptables-save` of nat and filter, or our nft
tables), only reading: nothing is ever written. The command is built here and registered by
`cli` (`trace_command(settings_options, load_inputs)`), so this module needs nothing from `cli`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from kproxy_nft.config import ProxySettings
from kproxy_nft.model import ClusterState, IPFamily
from kproxy_nft.proxier import Proxier, make_proxier
from kproxy_nft.report import fail
from kproxy_nft.sources.manifests import Manifests
from kproxy_nft.trace import (
    Packet,
    Program,
    TraceInputError,
    node_addresses,
    parse_packet,
    trace,
)
from kproxy_nft.trace.reasons import explain
from kproxy_nft.trace.text import render_text

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]
LoadInputs = Callable[..., tuple[Manifests, ProxySettings]]

EPILOG = """\b
Examples:
  kproxy-nft trace -f examples/ --config examples/kube-proxy-config.yaml --src 10.1.0.50 --dst 10.101.181.214:8080
  kproxy-nft trace -f examples/ --proxy-mode nftables --src 192.168.100.2 --dst 10.101.181.214:8080 -o json
  sudo kproxy-nft trace --live --src 10.1.0.50 --dst 10.101.181.214:8080"""


def _proxy_mode_ips(manifests: Manifests) -> dict[str, str]:
    """Load-balancer ingress IPs with `ipMode: Proxy` → `ns/name` (the model leaves them out)."""
    found = {}
    for svc in manifests.services:
        ingress = (svc.status.load_balancer.ingress if svc.status and svc.status.load_balancer else None) or []
        for ing in ingress:
            if ing.ip and ing.ip_mode == "Proxy" and svc.metadata is not None:
                found[ing.ip] = f"{svc.metadata.namespace or 'default'}/{svc.metadata.name}"
    return found


def _live_program(proxier: Proxier, family: IPFamily, local: frozenset[str]) -> Program:
    """The rules the kernel holds now, only read (exit 2 with one line when they cannot be)."""
    from kproxy_nft.kernel.iptables import IptablesError
    from kproxy_nft.kernel.nftables import NftablesError

    try:
        program = proxier.live_trace_program(family, local)
    except (OSError, NftablesError, IptablesError) as e:
        fail(f"--live: cannot read the {proxier.mode} rules (root needed?): {type(e).__name__}: {e}")
    if program is None:
        fail(f"--live: no IPv{int(family)} rules of the {proxier.mode} mode on this node "
             f"(is the {proxier.mode} mode running?)")
    return program


def run_trace(manifests: Manifests, settings: ProxySettings, packet: Packet, live: bool, netns: str | None,
              output: str) -> None:
    """Trace `packet` and print it (text or the JSON contract)."""
    state: ClusterState = manifests.cluster_state()
    node = settings.node
    extra: tuple[str, ...] = ()
    if live:
        from kproxy_nft.kernel.addresses import local_addresses

        extra = local_addresses(netns)
    local = node_addresses(node, extra)
    proxier = make_proxier(settings, netns=netns)
    try:
        if live:
            program = _live_program(proxier, packet.family, local)
        else:
            program = proxier.trace_program(state, packet.family, local)
    finally:
        proxier.close()
    reasons = explain(state, node, packet, local, _proxy_mode_ips(manifests))
    result = trace(program, packet, local, reasons)
    if output == "json":
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        click.echo(render_text(packet, result), nl=False)


def trace_command(settings_options: Decorator, load_inputs: LoadInputs) -> click.Command:
    """The `trace` command, with `dump`'s settings flags (`settings_options`) and manifest reading."""

    @click.command("trace", epilog=EPILOG)
    @click.option("-f", "--filename", "paths", multiple=True, metavar="PATH",
                  help="Manifest file or directory (as dump); with --live, only for the reasons.")
    @settings_options
    @click.option("--src", required=True, metavar="IP", help="The packet's source address.")
    @click.option("--dst", required=True, metavar="IP:PORT|[IPv6]:PORT", help="Where the packet is sent.")
    @click.option("--protocol", default="tcp", show_default=True, metavar="tcp|udp|sctp")
    @click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
    @click.option("--live", is_flag=True, help="Trace the rules the kernel holds now (read only; needs root).")
    @click.option("--netns", default=None, hidden=True, help="Read the rules of this network namespace (tests).")
    def command(paths: tuple[str, ...], src: str, dst: str, protocol: str, output: str, live: bool,
                netns: str | None, **flags: Any) -> None:
        """Follow one packet through the rules: its endpoints and their chances, masquerade, verdict, and why.

        A source that is one of the node's IPs (--node-ip) or loopback starts in OUTPUT, any
        other in PREROUTING. The JSON output (-o json) is a stable contract (docs/TRACE.md).
        """
        try:
            packet = parse_packet(src, dst, protocol)
        except TraceInputError as e:
            fail(str(e))
        if not paths and not live:
            fail("trace needs -f PATH (the manifests to compile), or --live")
        manifests, settings = load_inputs(paths, **flags)
        run_trace(manifests, settings, packet, live, netns, output)

    return command
