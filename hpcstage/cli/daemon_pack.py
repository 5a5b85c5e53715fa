"""``hpcstage pack --daemon``: ask the site daemon to pack an S3 prefix, and follow it.

Thin: one POST, then long polls of the pack's document; progress is drawn by the same
report as a pack run here (a bar on a terminal, JSON lines with --json).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click

from hpcstage.cli.client import Client, client_for
from hpcstage.cli.common import load_client
from hpcstage.errors import PackError
from hpcstage.packed.pack import PackStats

FOLLOW_WAIT = 10.0  # seconds the daemon may hold a poll when nothing changed
# Options of a pack run here that mean nothing for one the daemon runs.
LOCAL_ONLY = ("slurm", "restart", "spool", "endpoint_url")


def pack_on_daemon(src: str, dest: str, opts: dict[str, Any]) -> None:
    """POST the pack, then follow it to its end (or until Ctrl-C: the daemon carries on)."""
    given = [name for name in LOCAL_ONLY if opts.get(name)]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise click.UsageError(f"--daemon runs the pack on the daemon's host: {flags} do not apply")
    client = client_for(load_client(opts["config_path"]))
    body = {
        "src": src,
        "dest": dest,
        "update": opts["update"],
        "segment_size": opts["segment_size"],
        "verify": opts["verify"],
    }
    pack_id = client.post("/api/v1/packs", body)["id"]
    # Imported here, not at the top: pack_cmd imports this module when --daemon is given.
    from hpcstage.cli.pack_cmd import PackReport, pack_done

    report = PackReport(opts["as_json"])
    if opts["as_json"]:
        report.emit({"event": "queued", "id": pack_id})
    else:
        click.echo(f"pack {pack_id}: queued on the daemon", err=True)
    try:
        doc = asyncio.run(_follow(client, pack_id, report))
    except KeyboardInterrupt:
        click.echo(f"\nstopped following pack {pack_id}; the daemon carries on with it", err=True)
        sys.exit(130)
    if doc["state"] == "failed":
        raise PackError(f"pack {pack_id} failed: {doc['error'] or 'no reason given'}")
    summary = dict(doc["summary"] or {})
    summary.setdefault("event", "done")
    verified = summary.pop("verified_bytes", None)
    pack_done(report, summary, verified)


async def _follow(client: Client, pack_id: int, report: Any) -> dict[str, Any]:
    """The pack's document once it ended, drawing its progress meanwhile."""
    stats = PackStats()
    path = f"/api/v1/packs/{pack_id}"
    async with report.running(stats):
        doc: dict[str, Any] = await asyncio.to_thread(client.get, path)
        while doc["state"] in ("queued", "running"):
            for key, value in (doc["progress"] or {}).items():
                setattr(stats, key, value)
            query = f"{path}?since={doc['changes']}&wait={FOLLOW_WAIT}"
            doc = await asyncio.to_thread(client.get, query)
    return doc
