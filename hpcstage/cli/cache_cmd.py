"""``hpcstage cache usage|ls|evict``: what the node-local caches hold, and evicting it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from hpcstage.cli import cache_view
from hpcstage.cli.client import Client, client_for
from hpcstage.cli.common import config_option, load_client
from hpcstage.core.units import format_size
from hpcstage.errors import HpcstageError
from hpcstage.watch.slurm.hostlist import expand_hostlist

WALK_TIMEOUT = 300.0  # seconds for `cache evict SRC`'s answer


def _client(config_path: Path | None) -> Client:
    return client_for(load_client(config_path))


@click.group("cache")
def cache() -> None:
    """Show what the node-local caches hold; evict a dataset from them.

    Every node keeps verified objects in its cache, shared by all jobs; a job's $HPCSTAGE_DIR
    holds hardlinks to them, which lease them against eviction. Unleased data is evicted by
    policy (TTL, then least recently used above the high watermark).
    """


@cache.command("usage")
@config_option
@click.option("--nodes", help="Nodes in hostlist form, e.g. n[1-3] (default: every node).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def usage(config_path: Path | None, nodes: str | None, as_json: bool) -> None:
    """Bytes and objects per node, leased and total, against the cache's capacity."""
    client = _client(config_path)
    names = list(expand_hostlist(nodes)) if nodes else client.get("/api/v1/nodes")
    rows = {n: _usage(client, n) for n in names}
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'NODE':<10} {'USED':>10} {'LEASED':>10} {'OBJECTS':>9} {'CAPACITY':>10}  FULL")
    for node, row in rows.items():
        if "error" in row:
            click.echo(f"{node:<10} {row['error']}")
            continue
        u, cap = row["usage"], row["capacity"]
        full = f"{100 * u['bytes'] / cap:.1f}%" if cap else "-"
        click.echo(
            f"{node:<10} {format_size(u['bytes']):>10} {format_size(u['leased_bytes']):>10}"
            f" {u['objects']:>9} {format_size(cap):>10}  {full}"
        )


@cache.command("ls")
@config_option
@click.argument("node")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def ls(config_path: Path | None, node: str, as_json: bool) -> None:
    """NODE's cache: usage, fetch counters since its agent started, packed trees, job
    directories, and what released jobs left undeletable (for an admin to remove)."""
    row = _client(config_path).get(f"/api/v1/nodes/{node}/cache")
    if as_json:
        click.echo(json.dumps(row, indent=2))
        return
    u, s = row["usage"], row["stats"]
    click.echo(
        f"{node}: {format_size(u['bytes'])} in {u['objects']} objects "
        f"({format_size(u['leased_bytes'])} leased) of {format_size(row['capacity'])}"
    )
    click.echo(
        f"  since the agent started: {s['fetched_objects']} fetched "
        f"({format_size(s['fetched_bytes'])}), {s['peer_objects']} copied from other nodes' "
        f"caches ({format_size(s['peer_bytes'])}), {s['hits']} cache hits"
    )
    if u.get("trees"):
        click.echo(
            f"  packed trees: {u['trees']} ({format_size(u['tree_bytes'])},"
            f" {u['tree_inodes']} inodes), {u['leased_trees']} attached to jobs"
        )
    views = row["views"]
    click.echo(f"  job directories: {', '.join(views) if views else 'none'}")
    left = row.get("leftovers", [])
    if left:
        # Jobs made these undeletable to the service account (e.g. a chmod 500 directory).
        click.echo(
            f"  left by released jobs, for an admin to remove: released/{{{','.join(left)}}}"
        )


@cache.command("evict")
@config_option
@click.argument("src", required=False)
@click.option(
    "--nodes",
    help="Nodes in hostlist form, e.g. n[1-3] (with SRC: default every node; without: required).",
)
@click.option("--json", "as_json", is_flag=True, help="With SRC: print JSON.")
def evict(config_path: Path | None, src: str | None, nodes: str | None, as_json: bool) -> None:
    """Evict SRC's cached objects from NODES, or apply the eviction policy on NODES now.

    With SRC (s3://bucket/key or s3://bucket/prefix/): every cached version of SRC's objects
    is evicted, whatever the policy, except those a job's directory links: a running or
    staged job never loses a file; they stay and are counted as in use. Allowed to admins
    and to whoever may read SRC by the site policy. Exit status 1 if a node could not be
    asked.

    Without SRC (admins only): objects unused for longer than cache.ttl go first, then the
    least recently used until usage is below cache.low_watermark; data leased by a job
    directory is never evicted.

    \b
    Examples:
      hpcstage cache evict s3://datasets/ligands/ --nodes n[1-3]
      hpcstage cache evict --nodes n[1-3]
    """
    if src is not None:
        # Each node walks its index for SRC's keys: longer than a usual answer for large SRC.
        _evict_source(client_for(load_client(config_path), WALK_TIMEOUT), src, nodes, as_json)
        return
    if nodes is None:
        raise click.UsageError("name SRC, or --nodes to apply the eviction policy on")
    client = _client(config_path)
    for node in expand_hostlist(nodes):
        done = client.post(f"/api/v1/nodes/{node}/evict")
        click.echo(f"{node}: {done['evicted']} objects evicted")


def _evict_source(client: Client, src: str, nodes: str | None, as_json: bool) -> None:
    body: dict[str, Any] = {"src": src}
    if nodes is not None:
        body["nodes"] = list(expand_hostlist(nodes))
    doc = client.post("/api/v1/cache/evict", body)
    click.echo(json.dumps(doc, indent=2) if as_json else cache_view.evict_table(doc))
    failed = cache_view.failed_nodes(doc)
    if failed:
        raise HpcstageError(f"could not evict on {','.join(failed)}: see above")


def _usage(client: Client, node: str) -> dict[str, Any]:
    try:
        found: dict[str, Any] = client.get(f"/api/v1/nodes/{node}/cache")
    except Exception as exc:  # one unreachable node must not hide the others
        return {"error": str(exc)}
    return found
