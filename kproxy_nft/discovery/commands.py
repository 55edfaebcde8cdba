"""Click commands for the discovery views (`kproxy-nft env`, `kproxy-nft dns records|serve`).

The shell around the pure views: read manifests (`discovery.load`), call `envvars` or
`zonefile`, print; or run the server (`discovery.server`). Bad input is reported the way
every kproxy-nft command reports it (`report.fail`: one line on stderr, exit code 2).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from kproxy_nft.discovery.records import DEFAULT_TTL, DEFAULT_ZONE, RecordOptions, zone_name
from kproxy_nft.report import fail
from kproxy_nft.sources.manifests import ManifestError

F = TypeVar("F", bound=Callable[..., Any])

_PATHS = click.option(
    "-f", "--filename", "paths", multiple=True, required=True, metavar="PATH",
    help="Manifest file or directory (recursive *.yaml|*.yml|*.json); '-' reads stdin.",
)


def _notify(notices: tuple[str, ...]) -> None:
    for notice in notices:
        if "/KubeProxyConfiguration " in notice:
            continue  # proxy settings found among the manifests (as in examples/): no news here
        click.echo(f"kproxy-nft: {notice}", err=True)


def _zone(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    try:
        zone_name(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return value


def record_options(func: F) -> F:
    """The options that shape the DNS records; shared by `dns records` and `dns serve`."""
    options = [
        _PATHS,
        click.option("--zone", default=DEFAULT_ZONE, show_default=True, callback=_zone,
                     help="The cluster domain (kubelet --cluster-domain)."),
        click.option("--ttl", type=click.IntRange(0, 3600), default=DEFAULT_TTL, show_default=True,
                     help="TTL of the records, in seconds (CoreDNS `ttl`)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.command(epilog="""\b
Example:
  kproxy-nft env -f examples/ --namespace default""")
@_PATHS
@click.option("-n", "--namespace", default="default", show_default=True, help="The pod's namespace.")
@click.option("--service-links/--no-service-links", default=True, show_default=True,
              help="The pod's enableServiceLinks: with it off only the `kubernetes` Service remains.")
@click.option("--format", "output_format", type=click.Choice(["env", "json"]), default="env", show_default=True,
              help="KEY=value lines, or one JSON object.")
def env(paths: tuple[str, ...], namespace: str, service_links: bool, output_format: str) -> None:
    """Print the Service environment variables kubelet gives a container in NAMESPACE."""
    from kproxy_nft.discovery.envvars import render_env, service_environment
    from kproxy_nft.discovery.load import load

    try:
        loaded = load(paths)
    except ManifestError as e:
        fail(str(e))
    _notify(loaded.notices)
    variables = service_environment(loaded.services, namespace, service_links)
    click.echo(render_env(variables, output_format), nl=False)


@click.group()
def dns() -> None:
    """Cluster DNS for the Services: list the records, or serve them."""


@dns.command(epilog="""\b
Example:
  kproxy-nft dns records -f examples/""")
@record_options
@click.option("--ns-ip", "ns_ips", multiple=True, metavar="IP", default=("127.0.0.1",), show_default=True,
              help="The name server's address, for the NS glue (repeatable).")
def records(paths: tuple[str, ...], zone: str, ttl: int, ns_ips: tuple[str, ...]) -> None:
    """Print the DNS records of the Services and EndpointSlices in PATH, in master-file format.

    One section per zone: the cluster domain, then the reverse zones that have PTR records.
    """
    from kproxy_nft.discovery.load import load_record_set
    from kproxy_nft.discovery.records import is_ip
    from kproxy_nft.discovery.zonefile import render_master_files

    bad = [ip for ip in ns_ips if not is_ip(ip)]
    if bad:
        fail(f"--ns-ip: {bad[0]!r} is not an IP address")
    try:
        record_set, notices = load_record_set(paths, RecordOptions(zone, ttl, ns_ips))
    except ManifestError as e:
        fail(str(e))
    _notify(notices)
    click.echo(render_master_files(record_set), nl=False)


@dns.command(epilog="""\b
Example:
  kproxy-nft dns serve -f examples/ --listen 127.0.0.1:5353 &
  dig @127.0.0.1 -p 5353 _https-port._tcp.sample-clusterip-multi.default.svc.cluster.local SRV""")
@record_options
@click.option("--listen", default="127.0.0.1:5353", show_default=True, metavar="ADDR:PORT",
              help="Address to answer on, UDP and TCP ([IPv6]:PORT; port 0 picks a free one).")
def serve(paths: tuple[str, ...], zone: str, ttl: int, listen: str) -> None:
    """Answer DNS queries for the Services in PATH, authoritatively, over UDP and TCP.

    Re-reads the manifests when they change (a bad edit keeps the previous records). Prints
    `READY <addr>:<port>` on stdout once listening; SIGHUP re-reads, SIGTERM/Ctrl-C stops.
    """
    from kproxy_nft.discovery.server import ManifestRecords, nameserver_ips, parse_listen, serve_manifests

    try:
        host, port = parse_listen(listen)
    except ValueError as e:
        fail(f"--listen: {e}")
    try:
        source = ManifestRecords(paths, RecordOptions(zone, ttl, nameserver_ips(host)))
    except ManifestError as e:
        fail(str(e))
    _notify(source.notices)
    try:
        asyncio.run(serve_manifests(source, host, port, sys.stdout))
    except OSError as e:
        fail(f"cannot listen on {listen}: {e.strerror or e}")
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers were in place
        pass
