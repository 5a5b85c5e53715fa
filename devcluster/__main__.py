"""``python -m devcluster up|down|status|env`` — the dev cluster's command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from devcluster.cluster import DevCluster
from hpcstage.errors import HpcstageError

DEFAULT_BASE = Path("/var/tmp/hpcstage-devcluster")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--base",
    type=click.Path(path_type=Path),
    default=DEFAULT_BASE,
    show_default=True,
    help="Directory holding the cluster's configuration, state, logs, caches and S3 data.",
)
@click.pass_context
def main(ctx: click.Context, base: Path) -> None:
    """A real Slurm cluster on 127.0.0.1 for trying hpcstage and for its tests.

    Starts munge, slurmctld, three slurmd (n1, n2, n3), an S3 server (rclone serve s3) and an
    sshd for the service account `hpcstage`, and creates the users alice (account chem) and
    bob (account bio). Needs root; run scripts/bootstrap first to install the packages.
    """
    ctx.obj = DevCluster(base)


@main.command()
@click.pass_obj
def up(cluster: DevCluster) -> None:
    """Start the cluster (fails if one is already running at --base)."""
    info = cluster.up(progress=lambda msg: click.echo(f"  starting {msg}", err=True))
    click.echo(f"dev cluster up at {info.base}")
    click.echo(f"  Slurm {info.slurm_version}: nodes {', '.join(info.nodes)}")
    click.echo(f"  S3 endpoint {info.s3_endpoint} (credentials in {info.base}/env.sh)")
    click.echo(f"  sshd on 127.0.0.1:{info.sshd_port} for user hpcstage")
    click.echo(f"  use it: source {info.base}/env.sh; sinfo")


@main.command()
@click.option("--purge", is_flag=True, help="Also delete the base directory.")
@click.pass_obj
def down(cluster: DevCluster, purge: bool) -> None:
    """Cancel jobs and stop every process the cluster started (by pid)."""
    stopped = cluster.down(purge=purge)
    click.echo(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@main.command()
@click.pass_obj
def status(cluster: DevCluster) -> None:
    """Show which processes are alive and Slurm's view of the nodes (JSON)."""
    click.echo(json.dumps(cluster.status(), indent=2))


if __name__ == "__main__":
    try:
        main(standalone_mode=True)
    except HpcstageError as exc:
        click.echo(f"devcluster: error: {exc}", err=True)
        sys.exit(1)
