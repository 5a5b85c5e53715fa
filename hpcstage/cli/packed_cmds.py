"""``hpcstage ls`` and ``hpcstage cat``: read a packed dataset in place, as yourself."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import click

from hpcstage.cli.common import config_option
from hpcstage.core.packed import SUFFIX, DatasetRef
from hpcstage.core.units import format_size
from hpcstage.errors import PackError
from hpcstage.packed.browse import Browser
from hpcstage.packed.stores import StoreAccess

_endpoint = click.option(
    "--endpoint-url",
    help="S3 endpoint (default: the site configuration's [store] endpoint_url, else"
    " $AWS_ENDPOINT_URL).",
)
_profile = click.option(
    "--profile", help="AWS profile for your credentials (default: AWS's chain)."
)


def _split(url: str) -> tuple[str, str]:
    """``s3://b/p/x.hpack@3/a/b`` -> ("s3://b/p/x.hpack@3/", "a/b")."""
    if not url.startswith("s3://"):
        raise PackError(f"{url!r}: expected s3://BUCKET/.../NAME{SUFFIX}[@N]/[PATH]")
    bucket, _, key = url[len("s3://") :].partition("/")
    parts = key.split("/")
    for i, part in enumerate(parts):
        name = part.partition("@")[0]
        if name.endswith(SUFFIX) and len(name) > len(SUFFIX):
            DatasetRef.parse("/".join(parts[: i + 1]) + "/")  # checks the version
            return f"s3://{bucket}/{'/'.join(parts[: i + 1])}/", "/".join(parts[i + 1 :])
    raise PackError(f"{url!r} names no packed dataset (a path component ending in {SUFFIX})")


def _browser(
    url: str, config_path: Path | None, endpoint_url: str | None, profile: str | None
) -> tuple[Browser, str]:
    access = StoreAccess.from_site(config_path, endpoint_url=endpoint_url, profile=profile)
    dataset, inside = _split(url)
    return Browser(dataset, access), inside


@click.command(name="ls")
@config_option
@_endpoint
@_profile
@click.option("-l", "--long", "long_", is_flag=True, help="Sizes, modes and times too.")
@click.option("-r", "--recursive", is_flag=True, help="Every file below, not one directory.")
@click.option("--versions", is_flag=True, help="List the dataset's versions instead.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines, one per entry.")
@click.argument("url")
def ls(
    config_path: Path | None,
    endpoint_url: str | None,
    profile: str | None,
    long_: bool,
    recursive: bool,
    versions: bool,
    as_json: bool,
    url: str,
) -> None:
    """List a directory of a packed dataset, straight from the store.

    URL is s3://BUCKET/.../NAME.hpack[@N]/[DIR/]: the newest version, or version N.
    Only the manifest's footer and the row groups that hold DIR are read.

    \b
    Examples:
      hpcstage ls s3://chem/lib/ligands.hpack/
      hpcstage ls -l s3://chem/lib/ligands.hpack@3/set1/
      hpcstage ls --versions s3://chem/lib/ligands.hpack/
      hpcstage ls -r --json s3://chem/lib/ligands.hpack/set1/ | wc -l
    """
    browser, inside = _browser(url, config_path, endpoint_url, profile)
    with browser:
        if versions:
            for info in browser.versions():
                doc = {
                    "version": info.version,
                    "created": info.created,
                    "files": info.files,
                    "bytes": info.size,
                    "segments": len(info.segments),
                    "parent": info.parent,
                }
                click.echo(json.dumps(doc) if as_json else _version_line(doc))
            return
        if recursive:
            for member in browser.walk(inside):
                _show(member.path, member.size, member.mode, member.mtime_ns, long_, as_json)
            return
        shown = 0
        for entry in browser.entries(inside):
            shown += 1
            name = entry.name + ("/" if entry.is_dir else "")
            m = entry.member
            if m is None:
                _show(name, None, None, None, long_, as_json)
            else:
                _show(name, m.size, m.mode, m.mtime_ns, long_, as_json)
        if not shown:
            found = browser.find(inside) if inside else None
            if found is None:
                raise PackError(
                    f"{url}: no such file or directory in version {browser.info.version}"
                )
            _show(found.path, found.size, found.mode, found.mtime_ns, long_, as_json)


def _version_line(doc: dict[str, object]) -> str:
    size = format_size(int(str(doc["bytes"])))
    parent = f", from {doc['parent']}" if doc["parent"] else ""
    return (
        f"@{doc['version']}  {doc['created']}  {doc['files']} files  {size}"
        f"  {doc['segments']} segments{parent}"
    )


def _show(
    name: str, size: int | None, mode: int | None, mtime_ns: int | None, long_: bool, as_json: bool
) -> None:
    if as_json:
        doc = {"name": name, "type": "dir" if size is None else "file", "size": size}
        if mode is not None:
            doc |= {"mode": f"{mode:04o}", "mtime_ns": mtime_ns}
        click.echo(json.dumps(doc))
    elif not long_:
        click.echo(name)
    elif size is None:
        click.echo(f"{'d':<10} {'-':>10}  {'':19}  {name}")
    else:
        when = datetime.datetime.fromtimestamp((mtime_ns or 0) / 1e9, datetime.UTC)
        click.echo(f"{mode or 0:04o}      {size:>10}  {when:%Y-%m-%d %H:%M:%S}  {name}")


@click.command(name="cat")
@config_option
@_endpoint
@_profile
@click.argument("urls", nargs=-1, required=True)
def cat(
    config_path: Path | None, endpoint_url: str | None, profile: str | None, urls: tuple[str, ...]
) -> None:
    """Write files of a packed dataset to standard output, checked against their CRC-32.

    Each URL is s3://BUCKET/.../NAME.hpack[@N]/PATH. A file costs the version record, the
    manifest's footer and the one row group that holds its path, then one ranged GET of its
    bytes; nothing is written for a file whose bytes fail their check.

    \b
    Example:
      hpcstage cat s3://chem/lib/ligands.hpack@3/set1/000001.sdf | head
    """
    out = sys.stdout.buffer
    for url in urls:
        browser, inside = _browser(url, config_path, endpoint_url, profile)
        with browser:
            if not inside:
                raise PackError(f"{url}: name a file inside the dataset")
            out.write(browser.cat(inside))
    out.flush()
