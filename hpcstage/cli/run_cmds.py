"""``hpcstage daemon`` and ``hpcstage agent``: the long-running processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import click
import uvicorn

from hpcstage.auth import user_name
from hpcstage.cli.common import config_option, load_settings
from hpcstage.errors import ConfigError
from hpcstage.logs import ENV_VAR, LOG_FORMATS, LogFormat, setup_logging
from hpcstage.service.unit import EX_CONFIG

_LOG_FORMAT_HELP = (
    "Log format on stderr: auto (journal when stderr is systemd's journal, else text),"
    " text, json (one object per line) or journal (no time, a <N> syslog priority per line)."
)


@click.command()
@config_option
@click.option("--no-api", is_flag=True, help="Do not serve the HTTP API (tests, debugging).")
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default=None,
    help=_LOG_FORMAT_HELP + " Default: site.log_format.",
)
def daemon(config_path: Path | None, no_api: bool, log_format: LogFormat | None) -> None:
    """Run the site daemon: watch the Slurm queue, stage inputs onto nodes, serve the API.

    Runs in the foreground as the service account (no root), logging to stderr (under systemd
    in the journal's form: --log-format); stop it with
    SIGTERM or Ctrl-C: running transfers are left queued and resume at the next start.
    State lives in site.state_url (SQLite by default, PostgreSQL for HA). One daemon acts
    on a state database at a time: another one started on it stands by (logging who is
    active) and takes over when that one stops or dies (SQLite: within 2 s; PostgreSQL:
    about 30 s). Exit status 3: the lock on the state was lost with the database session
    (restart it to stand for election again); 78: the configuration is invalid (fix it
    first: `hpcstage config check FILE`); 1: another error (an unreachable state database).
    `hpcstage config systemd-unit` writes a systemd unit that restarts it accordingly.

    \b
    Example:
      hpcstage daemon --config /etc/hpcstage/site.toml
    """
    from hpcstage.api import create_app
    from hpcstage.service.daemon import Daemon

    try:
        settings = load_settings(config_path)
        _usable_state_dir(settings.site.state_dir)
    except ConfigError as exc:
        _config_error(exc)
    raise_open_files_limit()  # one SSH session per node, S3 and API connections
    resolved = setup_logging(
        settings.site.log_level.upper(),
        log_format or settings.site.log_format,
        text="%(asctime)s %(name)s %(levelname)s %(message)s",
        journal="%(name)s %(levelname)s %(message)s",
    )
    # Agents started on this host write to this stderr too: the same format. (Those over SSH
    # do not get it: the daemon reads their text lines and logs them in its own.)
    os.environ[ENV_VAR] = resolved
    d = Daemon(settings)
    api = None
    if not no_api:
        config = uvicorn.Config(
            create_app(d),  # mypy checks here that Daemon is an api.service.StagingService
            host=settings.api.host,
            port=settings.api.port,
            log_level="warning",
            lifespan="off",
        )
        server = _QuietServer(config)
        api = server.serve()
    try:
        asyncio.run(d.run(api))
    except ConfigError as exc:  # found at start-up, e.g. a state_url it cannot use
        _config_error(exc)
    if d.exit_code:
        sys.exit(d.exit_code)


def _config_error(exc: ConfigError) -> NoReturn:
    click.echo(f"hpcstage: error: {exc}", err=True)
    sys.exit(EX_CONFIG)


def _usable_state_dir(path: Path) -> None:
    """Create ``site.state_dir`` if missing (0700: the state and audit log are the service
    account's alone); ConfigError, saying what to do, when it cannot be created or written."""
    me = user_name(os.geteuid())
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"site.state_dir {path}: cannot create it ({exc.strerror or exc}); create it for"
            f" the service account, e.g. install -d -o {me} -m 0700 {path}"
        ) from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(
            f"site.state_dir {path}: not writable by {me}; make it the service account's"
            f" (chown {me} {path}) or choose another"
        )


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
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS),
    default="auto",
    show_default=True,
    envvar=ENV_VAR,
    help=_LOG_FORMAT_HELP + f" The daemon sets {ENV_VAR} for agents it starts locally.",
)
@click.option(
    "--epoch",
    type=click.IntRange(min=1),
    default=None,
    help="Leader epoch of the daemon starting this agent (with --state-id): the agent claims"
    " the node cache for it and exits once a newer one is claimed. Without: not fenced.",
)
@click.option("--state-id", default=None, help="Id of that daemon's state database.")
def agent(
    node: str, cache_dir: Path, log_format: LogFormat, epoch: int | None, state_id: str | None
) -> None:
    """Internal: the node agent, started by the daemon over SSH; speaks JSON lines on stdio."""
    from hpcstage.agent.main import run_agent
    from hpcstage.core.fencing import Epoch

    if (epoch is None) != (not state_id):
        raise click.UsageError("--epoch and --state-id go together")
    raise_open_files_limit()  # connections and in-flight temp files add up
    run_agent(node, cache_dir, log_format, Epoch(state_id, epoch) if state_id and epoch else None)


def raise_open_files_limit() -> None:
    """Raise the soft limit on open files to the hard one (systemd's default soft limit is
    1024, its hard one 524288)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
