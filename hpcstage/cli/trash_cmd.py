"""``hpcstage trash ls|restore``: the recycle bin of objects that stage-out replaced."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import click

from hpcstage.cli.client import Client, client_for
from hpcstage.cli.common import config_option, load_client
from hpcstage.core.units import format_size
from hpcstage.store.protocol import parse_s3_url


def _client(config_path: Path | None) -> Client:
    return client_for(load_client(config_path))


@click.group("trash")
def trash() -> None:
    """List and restore objects that stage-out replaced.

    Stage-out never overwrites silently: when a job's output lands on a key that already
    holds a different object, the old object is first copied to
    s3://BUCKET/<trash_prefix><YYYY-MM-DD>/<JOBID>/<KEY> and kept for stage_out.trash_retention.
    """


@trash.command("ls")
@config_option
@click.argument("place", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one list of every entry).")
@click.option(
    "--page-size",
    type=click.IntRange(1, 1000),
    default=1000,
    show_default=True,
    help="Recycle-bin keys the daemon examines per request; all pages are followed.",
)
def ls(config_path: Path | None, place: str | None, as_json: bool, page_size: int) -> None:
    """List the recycle-bin entries of PLACE (default: every bucket stage-out wrote to).

    PLACE is s3://BUCKET/ or s3://BUCKET/PREFIX, as every command names a place: the entries
    whose original key is under PREFIX (a bare BUCKET is read as s3://BUCKET/).

    \b
    Example:
      hpcstage trash ls s3://results/project/run1/
    """
    bucket, prefix = _place(place) if place else ("", "")
    entries = _entries(_client(config_path), bucket, prefix, page_size)
    if as_json:
        click.echo(json.dumps(list(entries), indent=2))
        return
    empty = True
    for e in entries:  # printed as the pages come
        empty = False
        click.echo(
            f"{e['day']}  job {e['job']:<8} {format_size(e['size']):>10}  "
            f"s3://{e['bucket']}/{e['key']}"
        )
        click.echo(f"    restore: hpcstage trash restore s3://{e['bucket']}/{e['trash_key']}")
    if empty:
        click.echo("the recycle bin is empty")


def _place(place: str) -> tuple[str, str]:
    """(bucket, key prefix) of s3://BUCKET[/PREFIX] or of a bare bucket name."""
    if "://" not in place and "/" not in place:
        return place, ""
    try:
        return parse_s3_url(place)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="PLACE") from exc


def _entries(client: Client, bucket: str, prefix: str, page_size: int) -> Iterator[dict[str, Any]]:
    """Every entry, page after page, following the API's ``next`` token."""
    query: dict[str, str | int] = {"limit": page_size}
    if bucket:
        query["bucket"] = bucket
    if prefix:
        query["prefix"] = prefix
    while True:
        page = client.get(f"/api/v1/trash?{urlencode(query)}")
        yield from page["entries"]
        if not page["next"]:
            return
        query["after"] = page["next"]


@trash.command("restore")
@config_option
@click.argument("url")
def restore(config_path: Path | None, url: str) -> None:
    """Put the recycle-bin entry URL back at its original key.

    Whatever is at that key now is moved to the recycle bin first, so a restore loses nothing
    either. URL is one of the `restore:` lines of `hpcstage trash ls`. The key must be one the
    site's policy lets you write today (admins: any).
    """
    done = _client(config_path).post("/api/v1/trash/restore", {"url": url})
    click.echo(f"restored s3://{url.removeprefix('s3://').split('/', 1)[0]}/{done['key']}")
    if done["displaced_to"]:
        click.echo(f"  the object that was there is now in the bin: {done['displaced_to']}")
