"""The ``hpcstage`` command line. Thin: each command parses arguments and calls library code."""

from __future__ import annotations

import importlib
import sys

import click

from hpcstage.errors import HpcstageError

# Each command's module is imported only when that command runs (or for --help): the
# commands a job runs (env) must not pay for the daemon's imports (FastAPI, SQLAlchemy,
# the configuration schema).
_COMMANDS = {
    "env": "hpcstage.cli.user_cmds",
    "status": "hpcstage.cli.user_cmds",
    "warmup": "hpcstage.cli.user_cmds",
    "dashboard": "hpcstage.cli.user_cmds",
    "daemon": "hpcstage.cli.run_cmds",
    "agent": "hpcstage.cli.run_cmds",
    "trash": "hpcstage.cli.trash_cmd",
    "cache": "hpcstage.cli.cache_cmd",
    "pin": "hpcstage.cli.pin_cmd",
    "config": "hpcstage.cli.config_cmd",
    "pack": "hpcstage.cli.pack_cmd",
    "pack-step": "hpcstage.cli.pack_cmd",
    "ls": "hpcstage.cli.packed_cmds",
    "cat": "hpcstage.cli.packed_cmds",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = _COMMANDS.get(cmd_name)
        if module is None:
            return None
        command = getattr(importlib.import_module(module), cmd_name.replace("-", "_"))
        assert isinstance(command, click.Command)
        return command


@click.group(
    cls=_LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(None, "-V", "--version", package_name="hpcstage", prog_name="hpcstage")
def cli() -> None:
    """Stage job data from the S3 store to node-local cache before Slurm starts the job,
    and write declared outputs back after it ends.

    Users put directives in batch scripts:

    \b
      #SBATCH --stage-in=s3://bucket/dataset/        (with the SPANK plugin)
      #HPCSTAGE --stage-in=s3://bucket/dataset/      (without it)
      #HPCSTAGE --stage-in=s3://bucket/dataset/:in:include=**/*.nc,exclude=tmp/**
      #HPCSTAGE --stage-in=s3://bucket/ref.fa?versionId=V   (one version of an object)
      #HPCSTAGE --stage-out=results:s3://bucket/out/%j/

    and find their inputs under $HPCSTAGE_DIR. Admins run `hpcstage daemon`.
    The site configuration is a TOML file: --config FILE, else $HPCSTAGE_CONFIG, else
    /etc/hpcstage/site.toml.
    """


def main() -> None:
    """Entry point: run the CLI, turning our own errors into one clear line and exit code 1."""
    try:
        code = cli.main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except HpcstageError as exc:
        click.echo(f"hpcstage: error: {exc}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
