"""The `kproxy-nft` command line (click): the imperative shell around the pure compilers.

Exit codes and error lines: see `report` (0 success, 1 changes, 2 bad input or a failed change
undone, 3 internal error, 130 Ctrl-C).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from kproxy_nft.config import (
    ConfigError,
    ConntrackOverrides,
    Overrides,
    ProxySettings,
    kube_proxy_configuration,
    load_config_file,
    parse_go_duration,
    resolve,
    with_node_object,
)
from kproxy_nft.convert import convert_node
from kproxy_nft.model import ClusterState, IPFamily, LocalMode, NodeContext, ip_family
from kproxy_nft.proxier import MODES, Proxier, make_proxier, with_local_addresses
from kproxy_nft.report import EXIT_INTERRUPTED, fail, internal_error, warn
from kproxy_nft.sources.manifests import ManifestError, Manifests, no_cyclic_gc, read_manifests

F = TypeVar("F", bound=Callable[..., Any])

_VERBOSE = "kproxy_nft.verbose"  # ctx.meta key (shared by all contexts of a run): show tracebacks


class _Main(click.Group):
    """The command group, and the net under every command: an exception no command handled is a
    bug, reported by `internal_error` (exit 3), never with click's exit 1 or a bare traceback.

    Commands that live with their own feature package are loaded when named (`add_lazy`): their
    imports (the trace interpreters, `rich`'s live views, dnspython) cost every other command
    ~0.15 s at start otherwise.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lazy: dict[str, Callable[[], click.Command]] = {}

    def add_lazy(self, name: str, load: Callable[[], click.Command]) -> None:
        self._lazy[name] = load

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        load = self._lazy.pop(cmd_name, None)
        if load is not None:
            self.add_command(load(), cmd_name)
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # usage errors (exit 2) and explicit exits: click reports them
        except KeyboardInterrupt:
            click.echo("kproxy-nft: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except OSError as e:
            if e.errno == errno.EPIPE:
                raise  # `kproxy-nft dump | head`: click quiets the broken pipe
            internal_error(e, ctx.meta.get(_VERBOSE, 0) > 0)
        except Exception as e:  # noqa: BLE001 - the point: anything else is reported the same way
            internal_error(e, ctx.meta.get(_VERBOSE, 0) > 0)


def _comma_list(values: Sequence[str]) -> tuple[str, ...]:
    return tuple(v.strip() for value in values for v in value.split(",") if v.strip())


def settings_options(func: F) -> F:
    """The kube-proxy flags that shape the rules; shared by every command that compiles."""
    options = [
        click.option("--proxy-mode", type=click.Choice(MODES), default=None,
                     help="Backend whose rules to produce (default: the config's mode, else iptables)."),
        click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                     help="A KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1) YAML; flags win over it."),
        click.option("--hostname-override", default=None, help="This node's name (default: the host name)."),
        click.option("--node-ip", "node_ips", multiple=True, metavar="IP", help="This node's IP (repeatable)."),
        click.option("--zone", default=None, help="This node's topology.kubernetes.io/zone (for topology hints)."),
        click.option("--cluster-cidr", "cluster_cidrs", multiple=True, metavar="CIDR",
                     help="Pod CIDR(s); traffic from elsewhere to a service is masqueraded."),
        click.option("--service-cidr", "service_cidrs", multiple=True, metavar="CIDR",
                     help="Service IP range(s), besides ServiceCIDR objects (nftables: unallocated IPs drop)."),
        click.option("--masquerade-all", is_flag=True, default=None,
                     help="Masquerade all traffic sent to service cluster IPs."),
        click.option("--iptables-masquerade-bit", "masquerade_bit", type=click.IntRange(0, 31), default=None,
                     help="The fwmark bit that flags packets for SNAT (default 14 → 0x4000)."),
        click.option("--nodeport-addresses", "nodeport_addresses", multiple=True, metavar="CIDR|primary",
                     help="Addresses NodePorts answer on (repeatable; default: all local addresses in "
                     "iptables mode, primary in nftables mode)."),
        click.option("--iptables-localhost-nodeports", "localhost_nodeports", type=bool, default=None,
                     metavar="BOOL", help="Serve NodePorts on 127.0.0.1 (route_localnet). Default false, "
                     "unlike kube-proxy (CVE-2020-8558)."),
        # A plain string, not a click.Choice: an unknown mode is then the usual one-line error.
        click.option("--detect-local-mode", default=None, metavar="|".join(m.value for m in LocalMode),
                     help="How traffic from this node's pods is told apart (default ClusterCIDR): by source in "
                     "--cluster-cidr, in the Node's spec.podCIDRs, or by input interface."),
        click.option("--pod-bridge-interface", default=None, metavar="NAME",
                     help="With --detect-local-mode BridgeInterface: traffic arriving on it is from a pod."),
        click.option("--pod-interface-name-prefix", default=None, metavar="PREFIX",
                     help="With --detect-local-mode InterfaceNamePrefix: traffic arriving on an interface "
                     "whose name starts with it is from a pod."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


class _GoDuration(click.ParamType[float]):
    """A duration as kube-proxy's flags take it (Go's: 24h0m0s, 1h, 30s, 0), in seconds, >= 0."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        try:
            seconds = parse_go_duration(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)
        if seconds < 0:
            self.fail("must be greater than or equal to 0", param, ctx)
        return seconds


def node_setup_options(func: F) -> F:
    """kube-proxy's node setup flags (for `run`): the conntrack sysctls made at startup, with
    kube-proxy's names and defaults (cmd/kube-proxy/app/options.go), --init-only, --write-config-to."""
    duration = _GoDuration()
    options = [
        click.option("--conntrack-max-per-core", type=click.IntRange(min=0), default=None,
                     help="Conntrack entries per CPU (default 32768; 0 leaves the limit, and --conntrack-min, "
                     "alone)."),
        click.option("--conntrack-min", type=click.IntRange(min=0), default=None,
                     help="Conntrack entries at least, whatever the CPUs (default 131072)."),
        click.option("--conntrack-tcp-timeout-established", type=duration, default=None,
                     help="Idle timeout of established TCP connections (default 24h; 0 leaves it as is)."),
        click.option("--conntrack-tcp-timeout-close-wait", type=duration, default=None,
                     help="Timeout of TCP connections in CLOSE_WAIT (default 1h; 0 leaves it as is)."),
        click.option("--conntrack-tcp-be-liberal", is_flag=True, default=None,
                     help="nf_conntrack_tcp_be_liberal=1: out-of-window TCP packets are not marked INVALID."),
        click.option("--conntrack-udp-timeout", type=duration, default=None,
                     help="Idle timeout of UNREPLIED UDP flows (default 0: leave as is)."),
        click.option("--conntrack-udp-timeout-stream", type=duration, default=None,
                     help="Idle timeout of ASSURED UDP flows (default 0: leave as is)."),
        click.option("--init-only", is_flag=True,
                     help="Make the node settings (conntrack sysctls) and exit: 1 if one could not be made. "
                     "For an init container; the agent then needs only CAP_NET_ADMIN."),
        click.option("--write-config-to", type=click.Path(dir_okay=False), default=None, metavar="FILE",
                     help="Write the effective KubeProxyConfiguration (v1alpha1 YAML) to FILE and exit."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def node_options(func: F) -> F:
    """`-f PATH` plus the settings flags: for commands that compile manifests."""
    func = settings_options(func)
    return click.option("-f", "--filename", "paths", multiple=True, required=True, metavar="PATH",
                        help="Manifest file or directory (recursive *.yaml|*.yml|*.json); '-' reads stdin.")(func)


def load_settings(proxy_mode: str | None = None, config_path: str | None = None, hostname_override: str | None = None,
                  node_ips: Sequence[str] = (), zone: str | None = None, cluster_cidrs: Sequence[str] = (),
                  service_cidrs: Sequence[str] = (), masquerade_all: bool | None = None,
                  masquerade_bit: int | None = None, nodeport_addresses: Sequence[str] = (),
                  localhost_nodeports: bool | None = None, detect_local_mode: str | None = None,
                  pod_bridge_interface: str | None = None, pod_interface_name_prefix: str | None = None,
                  conntrack: ConntrackOverrides | None = None) -> ProxySettings:
    """Settings from the config file and flags (raises ConfigError)."""
    file_config = load_config_file(config_path) if config_path else None
    return resolve(
        file_config,
        Overrides(
            mode=proxy_mode,
            hostname=hostname_override,
            node_ips=_comma_list(node_ips),
            zone=zone,
            cluster_cidrs=_comma_list(cluster_cidrs),
            service_cidrs=_comma_list(service_cidrs),
            masquerade_all=masquerade_all,
            masquerade_bit=masquerade_bit,
            nodeport_addresses=_comma_list(nodeport_addresses),
            localhost_nodeports=localhost_nodeports,
            detect_local_mode=detect_local_mode,
            pod_bridge_interface=pod_bridge_interface,
            pod_interface_name_prefix=pod_interface_name_prefix,
            conntrack=conntrack or ConntrackOverrides(),
        ),
        default_hostname=socket.gethostname(),
        source=config_path or "flags",
    )


def primary_family(node: NodeContext) -> IPFamily:
    """kube-proxy's primary family: that of the first node IP (IPv4 when none is known)."""
    return ip_family(node.node_ips[0]) if node.node_ips else IPFamily.V4


def load_inputs(paths: Sequence[str], keep_objects: bool = True, **flags: Any) -> tuple[Manifests, ProxySettings]:
    """Read settings and manifests, turning any problem into `fail` (exit 2). `keep_objects`:
    see `read_manifests` (False for a command that only compiles them)."""
    try:
        settings = load_settings(**flags)
        manifests = read_manifests(paths, keep_objects=keep_objects)
    except (ConfigError, ManifestError) as e:
        fail(str(e))
        raise  # unreachable: fail exits
    config_path = flags.get("config_path")
    for notice in manifests.notices:
        if config_path and notice.startswith(f"{config_path}:"):
            continue  # the config file itself, found among the manifests: no news
        click.echo(f"kproxy-nft: {notice}", err=True)
    if manifests.service_cidrs:  # ServiceCIDR objects add to --service-cidr / the config file's
        cidrs = tuple(dict.fromkeys((*settings.node.service_cidrs, *manifests.service_cidrs)))
        settings = dataclasses.replace(settings, node=dataclasses.replace(settings.node, service_cidrs=cidrs))
    node_object = manifests.node(settings.node.hostname)
    if node_object is not None:  # this node's Node, as the agent takes it from the API
        settings = with_node_object(settings, convert_node(node_object))
    node = settings.node
    if node.detect_local_mode is LocalMode.NODE_CIDR and node.local_detector(primary_family(node)) is None:
        warn(f"--detect-local-mode NodeCIDR: no podCIDR of this family in a Node {node.hostname} among the "
             "manifests: pod traffic is not told apart (no masquerade of off-cluster sources)")
    return manifests, settings


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="kproxy-nft")
@click.option("-v", "--verbose", count=True, help="Show the traceback of an internal error (exit status 3).")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """kproxy-nft: Kubernetes Service networking rules (kube-proxy's), compiled and applied.

    Exit status: 0 success, 1 changes (apply) or failed probes (demo), 2 bad input or a
    failed change (the kernel left as it was), 3 internal error.
    """
    ctx.meta[_VERBOSE] = verbose


@main.command(epilog="""\b
Example:
  kproxy-nft dump -f examples/ --config examples/kube-proxy-config.yaml
  kproxy-nft dump -f examples/ --proxy-mode nftables --cluster-cidr 10.1.0.0/16
  kubectl get svc,endpointslices -A -o yaml | kproxy-nft dump -f - --cluster-cidr 10.244.0.0/16""")
@node_options
@click.option("--ip-family", type=click.Choice(["4", "6"]), default=None,
              help="Which family's rules to print (iptables-restore or ip6tables-restore input); "
              "default: the family of the primary (first) node IP, else 4.")
def dump(ip_family: str | None, **options: Any) -> None:
    """Print the rules for the Services and EndpointSlices in PATH.

    iptables mode: input for `iptables-restore` (`ip6tables-restore` with --ip-family 6).
    nftables mode: an `nft -f` script with the `ip` and `ip6` kproxy-nft tables.
    """
    # Reading, merging and compiling build millions of objects and no cycles: without the
    # collector's rescans of them a 10k-Service dump takes a third less (issue 14).
    with no_cyclic_gc():
        manifests, settings = load_inputs(keep_objects=False, **options)
        state = manifests.cluster_state(warn)
        family = IPFamily(int(ip_family)) if ip_family else primary_family(settings.node)
        text = make_proxier(settings).render(state, family)
        del manifests, state
    click.echo(text, nl=False)


@main.command(epilog="""\b
Example:
  sudo kproxy-nft demo                  # the seed (examples/ with its kube-proxy-config.yaml)
  sudo kproxy-nft demo --count 300 --backend legacy
  sudo kproxy-nft demo --proxy-mode nftables""")
@click.option("-f", "--filename", "paths", multiple=True, metavar="PATH",
              help="Manifests to replay (default: the seed's examples/).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="KubeProxyConfiguration (default: examples/kube-proxy-config.yaml with the seed).")
@click.option("--count", "-n", type=click.IntRange(1, 100_000), default=100, show_default=True,
              help="Fresh HTTP GETs per service port.")
@click.option("--backend", type=click.Choice(["nft", "legacy"]), default="nft", show_default=True,
              help="Which iptables binary family loads the rules in the lab's node namespace.")
@click.option("--proxy-mode", type=click.Choice(MODES), default=None,
              help="Rules to replay with (default: the config's mode, iptables for the seed).")
def demo(paths: tuple[str, ...], config_path: str | None, count: int, backend: str, proxy_mode: str | None) -> None:
    """Replay the seed's experiment in network namespaces (needs root).

    Creates a node namespace, one namespace per pod of the manifests (answering HTTP with their
    pod name), the seed's `testpod` and an outside client; applies the rules in the node; sends
    COUNT fresh GETs to every ClusterIP service port and shows which pod answered. Removes
    everything afterwards, also on Ctrl-C.
    """
    from rich.console import Console

    from kproxy_nft.lab.demo import DemoError, run_demo, seed_directory

    if not paths:  # the seed's objects, shipped inside the package (examples/ links to them)
        seed = seed_directory()
        paths = (str(seed),)
        config_path = config_path or str(seed / "kube-proxy-config.yaml")
    _, settings = load_inputs(paths, proxy_mode=proxy_mode, config_path=config_path)

    def apply_rules(node_ns: str, state: ClusterState) -> str:
        """Reconcile the lab's node namespace the way `apply` does, through the same proxier."""
        proxier = make_proxier(settings, netns=node_ns, iptables_backend=backend)
        try:
            plan = proxier.plan(state)
            proxier.apply(plan)
        finally:
            proxier.close()
        return f"{proxier.mode} in {node_ns}: " + "; ".join(line.strip() for line in plan.lines if line.strip())

    try:
        rule_tools = make_proxier(settings, iptables_backend=backend).tools
        failures = run_demo(list(paths), settings.node, apply_rules, count, Console(), rule_tools, settings.mode)
    except (DemoError, ManifestError) as e:
        fail(str(e))
    sys.exit(1 if failures else 0)


def _kernel_errors() -> tuple[type[Exception], ...]:
    """What a kernel backend raises when a change fails (and is undone), or a tool is missing or
    refused: exit 2. Anything else is a bug (exit 3)."""
    from kproxy_nft.kernel.iptables import IptablesError, PlanError
    from kproxy_nft.kernel.libnftables import LibnftablesUnavailable
    from kproxy_nft.kernel.nftables import NftablesError

    return IptablesError, PlanError, NftablesError, LibnftablesUnavailable, OSError


@main.command(epilog="""\b
Example:
  sudo kproxy-nft apply -f examples/ --config examples/kube-proxy-config.yaml
  kproxy-nft apply -f examples/ --dry-run            # what would change, and the exact payload
  sudo kproxy-nft apply -f examples/ --proxy-mode nftables""")
@node_options
@click.option("--dry-run", is_flag=True, help="Print the plan and payload; do not touch the kernel.")
@click.option("--iptables-backend", type=click.Choice(["auto", "nft", "legacy"]), default="auto", show_default=True,
              help="Which iptables binaries to use; auto decides like kube-proxy, by where rules already are.")
def apply(dry_run: bool, iptables_backend: str, **options: Any) -> None:
    """Reconcile the kernel to the manifests in PATH, all or nothing across IPv4 and IPv6.

    nftables mode: one transaction for both families. iptables mode: one atomic restore per
    family, and IPv4 is reverted if IPv6 then fails. Only what differs is rewritten; chains and
    tables kproxy-nft does not own are never touched. Exit status like diff(1): 0 nothing to
    change, 1 changes (applied, or pending with --dry-run), 2 error (the kernel is left as it
    was; the one line says so, or says it could not be), 3 internal error. After a change,
    UDP/SCTP conntrack flows that may be stale are deleted (a failure there is a warning).
    """
    manifests, settings = load_inputs(keep_objects=False, **options)
    state = manifests.cluster_state(warn)
    settings = with_local_addresses(settings, None)  # `--nodeport-addresses CIDR` matches these too
    proxier = make_proxier(settings, iptables_backend=None if iptables_backend == "auto" else iptables_backend)
    try:
        plan = proxier.plan(state)
        for line in plan.lines:
            click.echo(line)
        if dry_run:
            click.echo(plan.payload, nl=False)
        else:
            proxier.apply(plan)
    except _kernel_errors() as e:  # every kernel failure is reported the same way
        fail(f"{type(e).__name__}: {e}")
    if not plan.is_empty and not dry_run:
        _clean_conntrack(proxier, state)
    proxier.close()
    sys.exit(0 if plan.is_empty else 1)


def _clean_conntrack(proxier: Proxier, state: ClusterState) -> None:
    """Delete the UDP/SCTP flows the new rules may have left stale; never fails the apply.

    `apply` does not know what the kernel held before, so like kube-proxy's first sync it takes
    every UDP/SCTP service port with endpoints as newly served and deletes the flows to it.
    """
    result = proxier.clean_conntrack(state)
    if result.filters:
        click.echo(f"conntrack: {result.deleted} stale flows deleted")
    for error in result.errors:
        click.echo(f"kproxy-nft: warning: conntrack cleanup: {error}", err=True)


@main.command(epilog="""\b
Example:
  sudo kproxy-nft cleanup                          # both modes' rules
  sudo kproxy-nft cleanup --proxy-mode iptables""")
@click.option("--proxy-mode", type=click.Choice(MODES), default=None,
              help="Clean only this mode's rules (default: both).")
@click.option("--iptables-backend", type=click.Choice(["auto", "nft", "legacy"]), default="auto", show_default=True)
def cleanup(proxy_mode: str | None, iptables_backend: str) -> None:
    """Remove every rule, chain and table kproxy-nft owns, and nothing else."""
    settings = load_settings()
    try:
        for mode in (proxy_mode,) if proxy_mode else MODES:
            proxier = make_proxier(settings, mode=mode,
                                   iptables_backend=None if iptables_backend == "auto" else iptables_backend)
            for line in proxier.cleanup():
                click.echo(line)
            proxier.close()
    except _kernel_errors() as e:
        fail(f"{type(e).__name__}: {e}")


@main.command(epilog="""\b
Examples:
  kproxy-nft run --proxy-mode nftables --hostname-override $(hostname)     # in-cluster or ~/.kube/config
  kproxy-nft run --manifests examples/ --config examples/kube-proxy-config.yaml   # no cluster""")
@click.option("--kubeconfig", default=None, envvar="KUBECONFIG", help="kubeconfig file (default: in-cluster, "
              "then ~/.kube/config).")
@click.option("--manifests", "manifest_paths", multiple=True, metavar="PATH",
              help="Use manifest files instead of the API (this node's Node too); a changed file is read again.")
@settings_options
@node_setup_options
@click.option("--iptables-backend", type=click.Choice(["auto", "nft", "legacy"]), default="auto", show_default=True)
@click.option("--min-sync-period", type=float, default=1.0, show_default=True, help="Seconds between partial syncs.")
@click.option("--sync-period", type=float, default=30.0, show_default=True,
              help="Seconds between canary probes where the kernel sends no notifications (iptables-legacy).")
@click.option("--full-sync-period", type=float, default=3600.0, show_default=True,
              help="Seconds between safety-net read-backs of the whole kernel (kube-proxy: hourly).")
@click.option("--metrics-bind-address", default="127.0.0.1:10249", show_default=True)
@click.option("--metrics-per-endpoint", is_flag=True,
              help="Serve kproxy_nft_endpoint_new_connections_total, one series per endpoint, read from the "
              "kernel's counters on each scrape (off by default: its cardinality; docs/TOP.md).")
@click.option("--healthz-bind-address", default="127.0.0.1:10256", show_default=True,
              help="kube-proxy listens on 0.0.0.0:10256; ours stays on loopback unless told (see deploy/).")
@click.option("--netns", default=None, hidden=True, help="Program this network namespace (tests, demos).")
@click.option("-v", "--verbose", count=True)
def run(kubeconfig: str | None, manifest_paths: tuple[str, ...], iptables_backend: str, min_sync_period: float,
        sync_period: float, full_sync_period: float, metrics_bind_address: str, metrics_per_endpoint: bool,
        healthz_bind_address: str, netns: str | None, verbose: int, init_only: bool, write_config_to: str | None,
        **flags: Any) -> None:
    """Run the node agent: watch Services and EndpointSlices, keep the kernel reconciled.

    Stops on SIGTERM/SIGINT and leaves the rules in place; a restarted agent adopts them.
    """
    from kproxy_nft.agent.runtime import run_agent

    click.get_current_context().meta[_VERBOSE] = verbose  # tracebacks of internal errors too
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    conntrack = {key.removeprefix("conntrack_"): flags.pop(key) for key in list(flags) if key.startswith("conntrack_")}
    try:
        settings = load_settings(**flags, conntrack=ConntrackOverrides(**conntrack))
    except ConfigError as e:
        fail(str(e))
        raise  # unreachable: fail exits
    if write_config_to:
        _write_config(write_config_to, kube_proxy_configuration(
            settings, kubeconfig=kubeconfig, metrics_bind_address=metrics_bind_address,
            healthz_bind_address=healthz_bind_address, sync_period=sync_period, min_sync_period=min_sync_period))
        return
    if init_only:
        _init_only(settings, netns)
    try:
        run_agent(settings, kubeconfig=kubeconfig, manifest_paths=list(manifest_paths),
                  iptables_backend=None if iptables_backend == "auto" else iptables_backend, netns=netns,
                  min_sync_period=min_sync_period, sync_period=sync_period, full_sync_period=full_sync_period,
                  metrics_address=metrics_bind_address, healthz_address=healthz_bind_address,
                  metrics_per_endpoint=metrics_per_endpoint)
    except Exception as e:  # noqa: BLE001 - a startup failure: one line, exit 2
        fail(f"{type(e).__name__}: {e}")
    # Stopped (SIGTERM/SIGINT): leave without the interpreter's teardown of the heap, which at
    # 10,000 services takes most of a second of the 2 s an agent gets to exit.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _write_config(path: str, document: dict[str, Any]) -> None:
    """`run --write-config-to`: the effective configuration, which `--config` reads back."""
    import yaml

    try:
        with open(path, "w", encoding="utf-8") as out:
            yaml.safe_dump(document, out, sort_keys=False)
    except OSError as e:
        fail(f"{path}: cannot write: {e.strerror or e}")
    click.echo(f"kproxy-nft: wrote the configuration to {path}", err=True)


def _init_only(settings: ProxySettings, netns: str | None) -> None:
    """`run --init-only`: make the node settings and exit, 1 when one could not be made (an init
    container that cannot do its one job must not let the pod start as if it had)."""
    from kproxy_nft.agent.node_setup import failed, setup_node

    failures = failed(setup_node(settings.conntrack, netns=netns))
    if failures:
        click.echo(f"kproxy-nft: error: init-only: {len(failures)} node setting(s) could not be made: "
                   + "; ".join(o.describe() for o in failures), err=True)
        sys.exit(1)
    sys.exit(0)


def _env() -> click.Command:
    from kproxy_nft.discovery.commands import env

    return env


def _dns() -> click.Command:
    from kproxy_nft.discovery.commands import dns

    return dns


def _trace() -> click.Command:
    """`kproxy-nft trace` (kproxy_nft/trace_command.py), with dump's settings flags and manifest reading."""
    from kproxy_nft.trace_command import trace_command

    return trace_command(settings_options, load_inputs)


def _diff() -> click.Command:
    """`kproxy-nft diff` (kproxy_nft/diff_command.py), with dump's settings flags and manifest reading."""
    from kproxy_nft.diff_command import diff_command

    return diff_command(settings_options, load_inputs)


def _top() -> click.Command:
    """`kproxy-nft top` (kproxy_nft/top_command.py): connections per endpoint, from the kernel's counters."""
    from kproxy_nft.top_command import top_command

    return top_command()


# Commands that live with their own feature package, loaded when named (see `_Main`).
for _name, _load in (("env", _env), ("dns", _dns), ("trace", _trace), ("diff", _diff), ("top", _top)):
    main.add_lazy(_name, _load)

if __name__ == "__main__":  # pragma: no cover
    main()
