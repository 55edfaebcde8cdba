"""`kproxy-nft diff OLD NEW`: what a manifest change will do to this node, for CI and for people.

The Service-level change is computed by the pure `kproxy_nft.diff`. The rule-level change is
`apply --dry-run`'s, literally: the same `Proxier.plan`, run against

* offline (`diff OLD NEW`): an empty node kept in memory into which OLD was first applied
  (`diff_offline`: the kernel fakes behind the real proxiers). No kernel, no root;
* live (`diff --live NEW`): the rules the kernel holds now (root needed, read only).

Exit status like diff(1) and `apply --dry-run`: 0 same, 1 differs, 2 bad input (one line,
naming file, document and field as `dump` does). The command is built here and registered by
`cli` (`diff_command(settings_options, load_inputs)`), so this module needs nothing from `cli`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import click

from kproxy_nft.config import ProxySettings
from kproxy_nft.diff import DiffReport, RuleChange, diff_states
from kproxy_nft.diff.render import FORMATS, RENDERERS
from kproxy_nft.model import ClusterState
from kproxy_nft.proxier import make_proxier, with_local_addresses
from kproxy_nft.report import fail, warn
from kproxy_nft.sources.manifests import Manifests

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]
LoadInputs = Callable[..., tuple[Manifests, ProxySettings]]

EPILOG = """\b
Examples:
  kproxy-nft diff old/ new/ --config examples/kube-proxy-config.yaml
  kproxy-nft diff base/svc.yaml,base/eps.yaml pr/ --proxy-mode nftables -o markdown
  kubectl get svc,endpointslices -A -o yaml | kproxy-nft diff cluster/ -
  sudo kproxy-nft diff --live new/"""


# ---------------------------------------------------------------------------------------------
# live: the rules the kernel holds now
# ---------------------------------------------------------------------------------------------


def _read_errors() -> tuple[type[Exception], ...]:
    """What reading the kernel's rules raises when it cannot (no privileges, no tool): exit 2."""
    from kproxy_nft.kernel.iptables import IptablesError, PlanError
    from kproxy_nft.kernel.libnftables import LibnftablesUnavailable
    from kproxy_nft.kernel.nftables import NftablesError

    return IptablesError, PlanError, NftablesError, LibnftablesUnavailable, OSError


def live_rules(new: ClusterState, settings: ProxySettings, iptables_backend: str | None,
               netns: str | None) -> RuleChange:
    """`apply --dry-run` of NEW against this node's kernel: read only, nothing is sent."""
    if os.geteuid() != 0:
        fail("diff --live reads the rules the kernel holds, which needs root (CAP_NET_ADMIN); "
             "without it, compare two manifest sets: kproxy-nft diff OLD NEW")
    settings = with_local_addresses(settings, netns)  # `--nodeport-addresses CIDR` matches these, as in apply
    proxier = make_proxier(settings, netns=netns, iptables_backend=iptables_backend)
    try:
        plan = proxier.plan(new)
    except _read_errors() as e:
        fail(f"diff --live: cannot read the {settings.mode} rules (root with CAP_NET_ADMIN needed): "
             f"{type(e).__name__}: {e}")
    finally:
        proxier.close()
    return RuleChange(settings.mode, "live", plan.is_empty, plan.lines, plan.payload)


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------


def split_paths(side: str) -> tuple[str, ...]:
    """OLD or NEW: a file, a directory, `-` (stdin), or `PATH,PATH,…` (a path that exists is never split)."""
    if side == "-" or os.path.exists(side):
        return (side,)
    paths = tuple(p for p in side.split(",") if p)
    if not paths:
        fail(f"diff: no manifest path in {side!r}")
    return paths


def _sides(sides: Sequence[str], live: bool) -> list[tuple[str, ...]]:
    """The path lists of OLD and NEW (NEW only, with --live); one line and exit 2 otherwise."""
    wanted = 1 if live else 2
    if len(sides) != wanted:
        usage = "diff --live NEW" if live else "diff OLD NEW"
        fail(f"{usage} takes {wanted} manifest argument{'s' if wanted > 1 else ''}, not {len(sides)}")
    paths = [split_paths(side) for side in sides]
    if sum("-" in p for p in paths) > 1:
        fail("diff: only one side can be read from stdin ('-')")
    return paths


def run_diff(sides: Sequence[str], load_inputs: LoadInputs, output: str, live: bool, iptables_backend: str,
             netns: str | None, **flags: Any) -> DiffReport:
    """Read the sides, compare them, print the report in `output` format; return it."""
    # Only the models are compared and compiled: the decoded objects are not kept (see `read_manifests`).
    inputs = [load_inputs(paths, keep_objects=False, **flags) for paths in _sides(sides, live)]
    states = [manifests.cluster_state(warn) for manifests, _ in inputs]
    backend = None if iptables_backend == "auto" else iptables_backend
    if live:
        report = DiffReport(None, live_rules(states[0], inputs[0][1], backend, netns))
    else:
        from kproxy_nft.diff_offline import offline_families, offline_rules

        (_, old_settings), (_, new_settings) = inputs
        families = {*offline_families(old_settings.node), *offline_families(new_settings.node)}
        state = diff_states(states[0], states[1], old_settings.node, new_settings.node, families)
        rules = offline_rules(states[0], old_settings, states[1], new_settings, backend or "nft")
        report = DiffReport(state, rules)
    click.echo(RENDERERS[output](report), nl=False)
    return report


def diff_command(settings_options: Decorator, load_inputs: LoadInputs) -> click.Command:
    """The `diff` command, with `dump`'s settings flags (`settings_options`) and manifest reading."""

    @click.command("diff", epilog=EPILOG)
    @click.argument("sides", nargs=-1, metavar="OLD NEW")
    @settings_options
    @click.option("-o", "--output", type=click.Choice(FORMATS), default="text", show_default=True,
                  help="json: a stable schema (docs/DIFF.md); markdown: for a CI comment.")
    @click.option("--live", is_flag=True, help="Compare NEW with the rules the kernel holds now (read only; root).")
    @click.option("--iptables-backend", type=click.Choice(["auto", "nft", "legacy"]), default="auto",
                  show_default=True, help="With --live: which iptables to read (auto: as apply decides); "
                  "offline: the name the plan shows (auto: nft).")
    @click.option("--netns", default=None, hidden=True, help="With --live: read this network namespace (tests).")
    def command(sides: tuple[str, ...], output: str, live: bool, iptables_backend: str, netns: str | None,
                **flags: Any) -> None:
        """What changing the manifests OLD to NEW does on this node: per service port, then the rules.

        OLD and NEW are each a manifest file or directory as `dump -f` takes, or several joined
        with commas (PATH,PATH); one of them may be '-' (stdin). Per service port: fields that
        change (type, traffic policies, IPs…), the endpoints this node adds or drops, per family,
        the frontends (cluster, external and LB IPs, node port) that start or stop answering, and
        the UDP/SCTP flows the change clears. Then the rule-level change as `apply --dry-run`
        prints it, planned against an in-memory node holding OLD: no kernel, no root.

        Exit status: 0 same, 1 differs, 2 bad input (one line), 3 internal error.
        """
        report = run_diff(sides, load_inputs, output, live, iptables_backend, netns, **flags)
        sys.exit(1 if report.differs else 0)

    return command
