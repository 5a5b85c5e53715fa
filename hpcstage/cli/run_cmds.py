"""``hpcstage daemon`` and ``hpcstage agent``: the long-running processes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import uvicorn

from hpcstage.cli.common import config_option, load_settings


@click.command()
@config_option
@click.option("--no-api", is_flag=True, help="Do not serve the HTTP API (tests, debugging).")
def daemon(config_path: Path | None, no_api: bool) -> None:
    """Run the site daemon: watch the Slurm queue, stage inputs onto nodes, serve the API.

    Runs in the foreground as the service account (no root), logging to stderr; stop it with
    SIGTERM or Ctrl-C: running transfers are left queued and resume at the next start.
    State lives in site.state_url (SQLite by default, PostgreSQL for HA). One daemon acts
    on a state database at a time: another one started on it stands by (logging who is
    active) and takes over when that one stops or dies (SQLite: within 2 s; PostgreSQL:
    about 30 s). Exit status 3: the lock on the state was lost with the database session
    (restart it to stand for election again).

    \b
    Example:
      hpcstage daemon --config /etc/hpcstage/site.toml
    """
    from hpcstage.api import create_app
    from hpcstage.daemon import Daemon

    settings = load_settings(config_path)
    logging.basicConfig(
        level=settings.site.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    d = Daemon(settings)
    api = None
    if not no_api:
        config = uvicorn.Config(
            create_app(d),
            host=settings.api.host,
            port=settings.api.port,
            log_level="warning",
            lifespan="off",
        )
        server = _QuietServer(config)
        api = server.serve()
    asyncio.run(d.run(api))
    if d.exit_code:
        sys.exit(d.exit_code)


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon drains on SIGTERM itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@click.command(hidden=True)
@click.option("--node", required=True, help="Name of this node as Slurm knows it.")
@click.option(
    "--cache-dir",
    required=True,
    type=click.Path(path_type=Path),
    help="This node's cache directory (local SSD).",
)
def agent(node: str, cache_dir: Path) -> None:
    """Internal: the node agent, started by the daemon over SSH; speaks JSON lines on stdio."""
    from hpcstage.transfer.agent import run_agent

    run_agent(node, cache_dir)
