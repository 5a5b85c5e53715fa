"""The ``hpcstage`` command line. Thin: each command parses arguments and calls library code."""

from __future__ import annotations

import sys

import click

from hpcstage import __version__
from hpcstage.errors import HpcstageError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="hpcstage")
def cli() -> None:
    """Stage job data from the S3 store to node-local cache before Slurm starts the job,
    and write declared outputs back after it ends.

    Users put directives in batch scripts:

    \b
      #SBATCH --stage-in=s3://bucket/dataset/        (with the SPANK plugin)
      #HPCSTAGE --stage-in=s3://bucket/dataset/      (without it)
      #HPCSTAGE --stage-out=results:s3://bucket/out/%j/

    and find their inputs under $HPCSTAGE_DIR. Admins run `hpcstage daemon`.
    The site configuration is a TOML file given with --config or HPCSTAGE_CONFIG.
    """


def _register() -> None:
    # Imported here so each command module stays independent of the others.
    from hpcstage.cli import cache_cmd, config_cmd, run_cmds, trash_cmd, user_cmds

    for command in (
        user_cmds.env,
        user_cmds.status,
        user_cmds.warmup,
        run_cmds.daemon,
        run_cmds.agent,
        trash_cmd.trash,
        cache_cmd.cache,
        config_cmd.config,
    ):
        cli.add_command(command)


def main() -> None:
    """Entry point: run the CLI, turning our own errors into one clear line and exit code 1."""
    _register()
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
