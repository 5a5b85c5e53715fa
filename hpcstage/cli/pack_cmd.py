"""``hpcstage pack``: pack a directory or an S3 prefix into a packed dataset, here or as a Slurm
job array (docs/packed-datasets.md, "Packing"). Thin: options in, hpcstage.packed.pack out."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from hpcstage.cli.common import ENV_VAR, bytes_bar
from hpcstage.core.packed import SUFFIX, VersionInfo
from hpcstage.core.packing import (
    DEFAULT_SLICE_FILES,
    PackPlan,
    SlurmPack,
    check_segment_size,
    parse_size,
)
from hpcstage.errors import PackError
from hpcstage.packed.pack import Packer, PackSettings, PackStats
from hpcstage.packed.sources import DirSource, S3Source, Source
from hpcstage.packed.stores import StoreAccess
from hpcstage.packed.work import private_spool
from hpcstage.store.fs import FsStore
from hpcstage.store.protocol import ObjectStore, parse_s3_url
from hpcstage.store.s3 import S3Store


@dataclass(frozen=True)
class _Access:
    """How this user reaches the site's S3 store: [store] of the site config, or the options;
    credentials from the user's own environment or AWS profile, never from the config."""

    config: Path | None
    endpoint_url: str | None
    fetchers: int

    def s3(self, bucket: str) -> S3Store:
        access = StoreAccess.from_site(self.config, endpoint_url=self.endpoint_url)
        return access.s3(bucket, max_connections=max(16, self.fetchers * 2))

    def options(self) -> tuple[str, ...]:
        """The same access, as options of a Slurm step."""
        out: list[str] = []
        if self.config is not None:
            out += ["--config", str(self.config.resolve())]
        if self.endpoint_url:
            out += ["--endpoint-url", self.endpoint_url]
        return (*out, "--fetchers", str(self.fetchers))


def _dest(access: _Access, dest: str) -> tuple[ObjectStore, str]:
    """The store and key prefix of DEST (s3://bucket/.../NAME.hpack/ or a shared-filesystem
    directory NAME.hpack)."""
    if not dest.rstrip("/").endswith(SUFFIX):
        raise PackError(f"{dest}: a packed dataset's name ends in {SUFFIX} (e.g. ligands{SUFFIX}/)")
    if dest.startswith("s3://"):
        bucket, key = _s3(dest)
        return access.s3(bucket), key.rstrip("/") + "/"
    path = Path(dest).absolute()
    return FsStore(path.parent), str(path) + "/"


def _s3(url: str) -> tuple[str, str]:
    try:
        return parse_s3_url(url)
    except ValueError as exc:
        raise PackError(str(exc)) from None


def _source(access: _Access, src: str, spool: Path, fetchers: int) -> Source:
    if src.startswith("s3://"):
        bucket, key = _s3(src)
        prefix = key.rstrip("/") + "/" if key else ""
        return S3Source(access.s3(bucket), prefix, spool, fetchers)
    path = Path(src).absolute()
    if not path.is_dir():
        raise PackError(
            f"{src}: no such directory (a source is a directory or s3://bucket/prefix/)"
        )
    return DirSource(path)


def _check_apart(src: str, dest: str) -> None:
    """Refuse a DEST inside SRC: a later pack would pack the dataset into itself."""
    if src.startswith("s3://") != dest.startswith("s3://"):
        return
    if src.startswith("s3://"):
        inside = (dest.rstrip("/") + "/").startswith(src.rstrip("/") + "/") or src == "s3://"
    else:
        inside = Path(dest).absolute().is_relative_to(Path(src).absolute())
    if inside:
        raise PackError(f"{dest} lies inside {src}: put the packed dataset somewhere else")


def _spool(given: Path | None, dest: str, what: str) -> Path:
    if given is None:
        tag = hashlib.sha256(dest.encode()).hexdigest()[:12]
        base = Path(os.environ.get("TMPDIR") or "/tmp") / f"hpcstage-pack-{os.getuid()}"
        private_spool(base)
        given = base / f"{tag}-{what}"
    return private_spool(given)


# -- progress -------------------------------------------------------------------------------


class PackReport:
    """A rich bar on a terminal, JSON lines with --json, nothing otherwise."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.started = time.monotonic()
        self._bar: Any = None
        self._task: Any = None

    @contextlib.asynccontextmanager
    async def running(self, stats: PackStats) -> AsyncIterator[None]:
        show = not self.as_json and sys.stderr.isatty()
        if show:
            self._start_bar()
        ticker = asyncio.create_task(self._tick(stats)) if show or self.as_json else None
        try:
            yield
        finally:
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
            self.show(stats)
            if self._bar is not None:
                self._bar.stop()

    def _start_bar(self) -> None:
        self._bar = bytes_bar(console=_stderr_console())
        self._bar.start()
        self._task = self._bar.add_task("listing", total=None)

    async def _tick(self, stats: PackStats) -> None:
        while True:
            await asyncio.sleep(1.0 if self.as_json else 0.3)
            self.show(stats)

    def show(self, stats: PackStats) -> None:
        if self.as_json:
            self.emit({"event": "progress", **vars(stats)})
        elif self._bar is not None:
            if stats.phase == "listing":
                label = f"listing: {stats.listed} files"
            else:
                label = f"{stats.phase} {stats.files}/{stats.files_total} files"
            self._bar.update(
                self._task,
                description=label,
                completed=stats.bytes,
                total=stats.bytes_total or None,
            )

    def emit(self, doc: dict[str, Any]) -> None:
        click.echo(json.dumps(doc, sort_keys=True))


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _summary(info: VersionInfo, plan: PackPlan, stats: PackStats, seconds: float) -> dict[str, Any]:
    return {
        "event": "done",
        "version": info.version,
        "up_to_date": info.version != plan.version,  # --update found nothing changed
        "parent": info.parent,
        "files": info.files,
        "bytes": info.size,
        "segments": len(info.segments),
        "packed_files": plan.to_pack,
        "packed_bytes": plan.bytes_to_pack,
        "kept_files": plan.files - plan.to_pack,
        "dropped_files": plan.dropped,
        "skipped_entries": plan.skipped,
        "segments_written": stats.segments,
        "segments_resumed": stats.segments_skipped,
        "seconds": round(seconds, 3),
        "files_per_s": round(plan.to_pack / seconds, 1) if seconds > 0 else 0.0,
    }


# -- the commands ---------------------------------------------------------------------------

_access_options: list[Callable[[Any], Any]] = [
    click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path),
        envvar=ENV_VAR,
        show_envvar=True,
        help="Site configuration: its [store] says where the S3 store is"
        " [default: /etc/hpcstage/site.toml if it exists].",
    ),
    click.option(
        "--endpoint-url",
        default=None,
        help="S3 endpoint, instead of the site configuration's (or $AWS_ENDPOINT_URL).",
    ),
    click.option(
        "--spool",
        type=click.Path(path_type=Path),
        default=None,
        help="Private local directory for segments being built [default: $TMPDIR or /tmp].",
    ),
    click.option("--fetchers", default=16, show_default=True, help="S3 GETs at a time."),
]


def _with_access(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_access_options):
        fn = option(fn)
    return fn


@click.command()
@click.argument("src")
@click.argument("dest")
@click.option("--update", is_flag=True, help="Pack only what changed since the newest version.")
@click.option("--segment-size", default="256M", show_default=True, help="Segment size (K/M/G).")
@click.option(
    "--slice-files",
    default=DEFAULT_SLICE_FILES,
    show_default=True,
    help="Files per slice of the listing (the unit of work of a process or array task).",
)
@click.option("--jobs", default=4, show_default=True, help="Slices packed at a time here.")
@click.option("--verify", is_flag=True, help="Read the new segments back and check their SHA-256.")
@click.option(
    "--restart", is_flag=True, help="Abandon a pending (interrupted) pack and start anew."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines: progress, then a summary.")
@click.option("--slurm", is_flag=True, help="Pack the slices as a Slurm job array, merge in a job.")
@click.option("--tasks", default=4, show_default=True, help="--slurm: array tasks.")
@click.option("--max-running", default=0, help="--slurm: array tasks at once (0: no limit).")
@click.option("--partition", default="", help="--slurm: partition (e.g. the transfer partition).")
@click.option(
    "--log-dir",
    type=click.Path(path_type=Path),
    default=Path("."),
    show_default=True,
    help="--slurm: where the jobs write their logs.",
)
@click.option("--sbatch-arg", "sbatch_args", multiple=True, help="--slurm: more sbatch options.")
@click.option("--wait", is_flag=True, help="--slurm: wait for the merge job to end.")
@click.option(
    "--daemon",
    "via_daemon",
    is_flag=True,
    help="Have the site daemon pack an S3 prefix the policy lets you read, with the site's"
    " credentials, into a dataset on S3 you may write.",
)
@_with_access
def pack(src: str, dest: str, **opts: Any) -> None:
    """Pack SRC (a directory, or s3://bucket/prefix/) into a new version of the packed dataset
    DEST (s3://bucket/.../NAME.hpack/, or a directory NAME.hpack on a shared filesystem).

    The source is listed once, in path order, into a listing kept under DEST/_pack/; its files
    go into tar segments of --segment-size, each uploaded and marked done as it is finished;
    the version (its manifest, then its record) is committed last. Memory stays bounded
    whatever the file count. Killed or failed, it resumes: run the same command again and the
    finished segments are kept (--restart starts over). S3 sources are read with your own
    credentials (AWS environment variables or profile) from the store the site configuration
    names; each object is checked against its listed size and ETag (MD5, where it is one).

    With --update, files whose size and identity (S3 ETag, or mtime) are unchanged keep
    pointing into the older version's segments; new and changed files are packed anew;
    deleted files drop out. Older versions stay readable, byte for byte.

    With --slurm, the listing is made here, then the slices are packed by a Slurm job array
    (--tasks tasks, on --partition) and merged by a job that starts when all succeeded. The
    version is the same, byte for byte, as one process would make. Job ids are printed;
    --wait waits for the merge.

    With --daemon, the site daemon packs SRC (s3://bucket/prefix/) into DEST (s3://...)
    on its own host, with the site's credentials, if the site policy lets you read SRC and
    write DEST: for data you may stage but hold no S3 keys for. Progress and the summary
    are shown as for a pack run here; Ctrl-C stops following, not the pack. A stopped
    daemon resumes it when it starts again.

    \b
    Examples:
      hpcstage pack /scratch/alice/ligands s3://lib/ligands.hpack/
      hpcstage pack --update /scratch/alice/ligands s3://lib/ligands.hpack/ --json
      hpcstage pack s3://raw/run42/ s3://lib/run42.hpack/ --slurm --tasks 16 \\
          --partition transfer --wait
      hpcstage pack --daemon s3://datasets/ligands/ s3://lib/ligands.hpack/
    """
    if opts["via_daemon"]:
        from hpcstage.cli.daemon_pack import pack_on_daemon

        pack_on_daemon(src, dest, opts)
        return
    try:
        asyncio.run(_pack(src, dest, opts))
    except KeyboardInterrupt:
        raise PackError("interrupted: run the same command again to resume") from None


async def _pack(src: str, dest: str, opts: dict[str, Any]) -> None:
    _check_apart(src, dest)
    access = _Access(opts["config_path"], opts["endpoint_url"], opts["fetchers"])
    store, prefix = _dest(access, dest)
    spool = _spool(opts["spool"], dest, "plan")
    settings = PackSettings(
        segment_size=check_segment_size(parse_size(opts["segment_size"])),
        slice_files=opts["slice_files"],
        jobs=opts["jobs"],
        update=opts["update"],
        restart=opts["restart"],
    )
    report = PackReport(opts["as_json"])
    try:
        source = _source(access, src, spool, opts["fetchers"])
    except BaseException:
        await store.close()
        raise
    try:
        packer = Packer(store, prefix, source, spool, settings)
        if opts["slurm"]:
            async with report.running(packer.stats):
                _, plan, resumed = await packer.plan()
                packer.stats.phase = "planned"
            await _submit(plan, resumed, dest, access, opts, report)
            return
        async with report.running(packer.stats):
            started = time.monotonic()
            info, plan = await packer.run()
            verified = await packer.verify(info) if opts["verify"] else None
        pack_done(report, _summary(info, plan, packer.stats, time.monotonic() - started), verified)
    finally:
        await _close(store, source)


async def _submit(
    plan: PackPlan,
    resumed: bool,
    dest: str,
    access: _Access,
    opts: dict[str, Any],
    report: PackReport,
) -> None:
    from hpcstage.packed import slurm_pack

    command = (sys.executable, "-m", "hpcstage")
    options = (*access.options(), "--jobs", str(opts["jobs"]))
    job = SlurmPack(command, dest, opts["tasks"], options)
    log_dir = opts["log_dir"].absolute()
    name = f"hpack-{plan.version}"
    ids = await asyncio.to_thread(
        slurm_pack.submit,
        job,
        max_running=opts["max_running"],
        partition=opts["partition"],
        name=name,
        log_dir=str(log_dir),
        extra=tuple(opts["sbatch_args"]),
    )
    doc = {
        "event": "submitted",
        "version": plan.version,
        "array_job": ids.array,
        "merge_job": ids.merge,
        "files": plan.files,
        "resumed": resumed,
    }
    _say(
        report,
        doc,
        f"version {plan.version}: array job {ids.array} ({opts['tasks']} tasks),"
        f" merge job {ids.merge}; logs in {log_dir}",
    )
    if opts["wait"]:
        await asyncio.to_thread(slurm_pack.wait, ids.merge)
        _say(report, {"event": "merged", "version": plan.version}, f"version {plan.version} done")


def _say(report: PackReport, doc: dict[str, Any], text: str) -> None:
    if report.as_json:
        report.emit(doc)
    else:
        click.echo(text)


def pack_done(report: PackReport, doc: dict[str, Any], verified: int | None) -> None:
    """The pack's last word: its summary as one JSON line, or a sentence (both CLIs use it)."""
    if verified is not None:
        doc["verified_bytes"] = verified
    if report.as_json:
        report.emit(doc)
        return
    if doc["up_to_date"]:
        click.echo(f"version {doc['version']} is up to date: nothing changed, nothing written")
        return
    kept = f", {doc['kept_files']} kept" if doc["kept_files"] else ""
    click.echo(
        f"version {doc['version']}: {doc['files']} files, {doc['bytes']} bytes in"
        f" {doc['segments']} segments ({doc['packed_files']} packed{kept},"
        f" {doc['dropped_files']} dropped, {doc['skipped_entries']} skipped) in"
        f" {doc['seconds']} s, {doc['files_per_s']} files/s"
    )


async def _close(store: ObjectStore, source: Source | None) -> None:
    await store.close()
    if isinstance(source, S3Source):
        await source.store.close()


@click.group(name="pack-step", hidden=True)
def pack_step() -> None:
    """Internal: the steps of `hpcstage pack --slurm`, run by its jobs."""


@pack_step.command()
@click.argument("dest")
@click.option("--tasks", type=int, required=True)
@click.option("--task", type=int, required=True)
@click.option("--jobs", default=4)
@_with_access
def slices(dest: str, tasks: int, task: int, jobs: int, **opts: Any) -> None:
    """Pack array task TASK's slices of the pending pack of DEST."""
    asyncio.run(_slices(dest, tasks, task, jobs, opts))


async def _slices(dest: str, tasks: int, task: int, jobs: int, opts: dict[str, Any]) -> None:
    access = _Access(opts["config_path"], opts["endpoint_url"], opts["fetchers"])
    store, prefix = _dest(access, dest)
    spool = _spool(opts["spool"], dest, f"task{task}-{os.getpid()}")
    packer = Packer(store, prefix, None, spool, PackSettings(jobs=jobs))
    try:
        work, plan, _ = await packer.plan()
        packer.source = _source(access, plan.source, spool, opts["fetchers"])
        await packer.pack_slices(work, plan, task, tasks)
        click.echo(
            f"task {task}/{tasks}: {packer.stats.segments} segments written,"
            f" {packer.stats.segments_skipped} found done"
        )
    finally:
        await _close(store, packer.source)
        with contextlib.suppress(OSError):
            spool.rmdir()


@pack_step.command()
@click.argument("dest")
@click.option("--jobs", default=4)
@_with_access
def merge(dest: str, jobs: int, **opts: Any) -> None:
    """Merge the slices of the pending pack of DEST into its version."""
    asyncio.run(_merge(dest, opts))


async def _merge(dest: str, opts: dict[str, Any]) -> None:
    access = _Access(opts["config_path"], opts["endpoint_url"], opts["fetchers"])
    store, prefix = _dest(access, dest)
    spool = _spool(opts["spool"], dest, f"merge-{os.getpid()}")
    packer = Packer(store, prefix, None, spool)
    try:
        work, plan, _ = await packer.plan()
        info = await packer.merge(work, plan)
        click.echo(
            json.dumps(
                {
                    "event": "merged",
                    "version": info.version,
                    "files": info.files,
                    "segments": len(info.segments),
                }
            )
        )
    finally:
        await store.close()
        with contextlib.suppress(OSError):
            spool.rmdir()
