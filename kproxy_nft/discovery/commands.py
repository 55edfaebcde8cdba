"""Click commands for the discovery views (`kproxy-nft env`, `kproxy-nft dns ...`)."""

from __future__ import annotations

import click


@click.command()
def env() -> None:
    """Print the environment variables kubelet injects for Services (not implemented yet)."""
    raise click.ClickException("not implemented yet")


@click.group()
def dns() -> None:
    """Cluster DNS records for Services (not implemented yet)."""
