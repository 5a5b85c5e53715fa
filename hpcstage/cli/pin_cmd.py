"""``hpcstage pin add|ls|rm``: datasets admins keep warm on chosen nodes, with a schedule."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import click

from hpcstage.cli.client import Client, client_for
from hpcstage.cli.common import config_option, load_client
from hpcstage.core.units import format_size
from hpcstage.watch.slurm.hostlist import compress_hostlist, expand_hostlist


def _client(config_path: Path | None) -> Client:
    return client_for(load_client(config_path))


@click.group("pin")
def pin() -> None:
    """Admins: keep datasets warm on chosen nodes, beyond the cache's TTL.

    A kept-warm dataset is staged on its nodes and leased there (as a running job's inputs
    are): eviction never takes it, however full the cache. With --schedule the daemon
    lists the source again at those times and fetches what is new or changed (an object
    deleted from the source stays kept warm until `pin rm`: a refresh only adds and
    replaces). `pin rm` ends the lease; the data then ages out of the caches like any other.

    Not the same as a packed dataset's pinned version (s3://.../NAME.hpack@N).
    """


@pin.command("add")
@config_option
@click.argument("src")
@click.option("--nodes", required=True, help="Nodes in Slurm's hostlist form, e.g. n[1-3],gpu01.")
@click.option(
    "--schedule",
    default="",
    help="Refresh at these times: 'every N{s,m,h,d}' (at least 30s) or five cron fields"
    " in the daemon host's local time, e.g. '0 6 * * 1-5' (numbers, ranges, lists and"
    " steps; no names or @macros). Default: staged once, never refreshed.",
)
@click.option(
    "--until",
    "until_text",
    help="Keep it warm until this local time (2027-01-31T18:00; a date alone means its"
    " start, 00:00); default: until `pin rm`.",
)
def add(
    config_path: Path | None, src: str, nodes: str, schedule: str, until_text: str | None
) -> None:
    """Keep SRC (as a --stage-in value: s3://bucket/prefix/, a key or a shared path) warm
    on NODES. Prints the pin's id."""
    body: dict[str, Any] = {"src": src, "nodes": list(expand_hostlist(nodes))}
    body["schedule"] = schedule
    body["until"] = _until(until_text) if until_text else None
    done = _client(config_path).post("/api/v1/pins", body)
    click.echo(f"pin {done['id']}: {src} kept warm on {nodes}")


def _until(text: str) -> float:
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a date or time (2027-01-31 or 2027-01-31T18:00)",
            param_hint="--until",
        ) from None
    return when.timestamp()  # a naive time is local, as the admin typed it


@pin.command("ls")
@config_option
@click.option("--all", "removed", is_flag=True, help="Also pins removed or expired.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ls(config_path: Path | None, removed: bool, as_json: bool) -> None:
    """The datasets kept warm: where, how much, the schedule and the last refresh."""
    pins = _client(config_path).get(f"/api/v1/pins?removed={str(removed).lower()}")
    if as_json:
        click.echo(json.dumps(pins, indent=2))
        return
    click.echo(
        f"{'ID':>5} {'STATE':<8} {'NODES':<14} {'SIZE':>9} {'SCHEDULE':<14} {'LAST':<16} SRC"
    )
    for doc in pins:
        click.echo(_line(doc))
        for node, st in doc["staging"].items():
            if st["error"]:
                click.echo(f"{'':>5} {node}: {st['error']}")


def _line(doc: dict[str, Any]) -> str:
    sizes = [st["bytes"] for st in doc["staging"].values()]
    size = format_size(max(sizes)) if sizes else "-"
    last = doc["last_refresh_at"]
    return (
        f"{doc['id']:>5} {doc['state']:<8} {compress_hostlist(doc['nodes']):<14} {size:>9}"
        f" {doc['schedule'] or '-':<14} {_ago(last):<16} {doc['src']}"
    )


def _ago(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


@pin.command("rm")
@config_option
@click.argument("pin_id", type=click.IntRange(min=1))
def rm(config_path: Path | None, pin_id: int) -> None:
    """Stop keeping the dataset PIN_ID warm: its lease ends, the data then ages out."""
    _client(config_path).delete(f"/api/v1/pins/{pin_id}")
    click.echo(f"pin {pin_id}: no longer kept warm (its data is evicted by policy now)")
