"""Packs the daemon runs for users (``hpcstage pack --daemon``).

A scientist whose S3 prefix the policy lets them read, but who holds no S3 credentials of
their own, asks the daemon to pack it. The daemon checks the policy (read on the source,
write on the destination) and the user's limit, records the pack, and runs it on its own
host as a child process: the same ``hpcstage pack`` a user runs, with the site's
credentials (the daemon's environment and profile, which the child inherits) and a spool
under ``site.state_dir``. A child keeps the daemon's memory and event loop out of the
packing (tar building, hashing, Parquet), and is killed cleanly.

The child's ``--json`` lines are its messages: progress, then a summary. A pack that is
stopped (daemon shutdown, lost leadership, a crash) is queued again and resumed by the next
daemon: ``hpcstage pack`` resumes the pending version from the segments already uploaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from hpcstage.config.schema import Settings
from hpcstage.core import limits, policy
from hpcstage.core.packing import (
    PackRequest,
    PackUpdate,
    packs_to_start,
    parse_pack_line,
    parse_size,
    spool_need,
    spool_refusal,
)
from hpcstage.core.units import format_duration
from hpcstage.db import Pack
from hpcstage.errors import LimitError

log = logging.getLogger("hpcstage.daemon")

MAX_ATTEMPTS = 3  # a pack whose child dies this often (not stopped by us) fails for good
STOP_GRACE = 10.0  # seconds a child has to stop after SIGTERM before SIGKILL
ERROR_TAIL = 4000  # bytes of the child's stderr kept for the daemon's log
ERROR_PREFIX = "hpcstage: error: "  # how the CLI states an error meant for its user
PACK_JOBS = 2  # segments a daemon pack builds at once (each up to its size in the spool)


@dataclass
class Packs:
    """Admits, records and runs daemon packs; at most ``limits.packs_running`` at once."""

    settings: Settings
    db: sessionmaker[Session]
    audit: Callable[..., None]  # AuditLog.record: (event, **fields)
    changed: Callable[[int], None]  # a pack's row or progress changed (wakes long polls)
    command: tuple[str, ...] = (sys.executable, "-m", "hpcstage")
    free_bytes: Callable[[Path], int] = lambda path: shutil.disk_usage(path).free
    live: dict[int, PackUpdate] = field(default_factory=dict)  # progress of running packs
    _tasks: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    _spool_needs: dict[int, int] = field(default_factory=dict)  # of the running packs
    _stopping: bool = False

    # -- admission ------------------------------------------------------------------------

    def create(self, request: PackRequest, user: str, admin: bool = False) -> int:
        """Record a pack of ``request`` for ``user`` and start it when a slot is free.

        DirectiveError for a malformed request, PermissionError when the policy does not let
        ``user`` read the source or write the destination, LimitError when the user has
        ``limits.packs_in_flight`` unfinished packs or one into the same destination runs.
        """
        request.check()
        refusal = "" if admin else self._not_allowed(user, request.src, request.dest)
        if refusal:
            self.audit("refused", user=user, pack=request.src, dest=request.dest)
            raise PermissionError(f"pack of {request.src} refused: {refusal}")
        with self.db.begin() as session:
            refusal = self._refusal(session, user, request.dest, admin)
            if refusal:
                self.audit("refused", user=user, pack=request.src, reason=refusal)
                raise LimitError(f"pack of {request.src} refused: {refusal}")
            row = Pack(
                user=user,
                src=request.src,
                dest=request.dest,
                options=json.dumps({**request.options(), "admin": admin}, sort_keys=True),
                state="queued",
                created_at=time.time(),
            )
            session.add(row)
            session.flush()
            pack_id = row.id
        self.audit("pack", user=user, src=request.src, dest=request.dest, id=pack_id)
        self.start_due()
        return pack_id

    def _not_allowed(self, user: str, src: str, dest: str) -> str:
        """Why the policy does not let ``user`` pack ``src`` into ``dest`` ('' if it does):
        read on the source; read and write on the dataset (a pack reads its versions, and
        --update's summary tells what they hold)."""
        wanted: tuple[tuple[policy.Access, str], ...] = (
            ("read", src),
            ("read", dest),
            ("write", dest),
        )
        for access, url in wanted:
            decision = policy.check(self.settings.policy, user, "", access, url)
            if not decision.allowed:
                return decision.rule
        return ""

    def _refusal(self, session: Session, user: str, dest: str, admin: bool) -> str:
        unfinished = Pack.state.in_(("queued", "running"))
        same = session.scalar(select(Pack.id).where(unfinished, Pack.dest == dest).limit(1))
        if same is not None:
            return f"pack {same} into {dest} is not finished yet: wait for it"
        if admin:
            return ""
        mine = select(func.count()).select_from(Pack).where(unfinished, Pack.user == user)
        return limits.pack_refusal(self.settings.limits, session.scalar(mine) or 0)

    # -- running --------------------------------------------------------------------------

    def recover(self) -> None:
        """At start-up: packs a stopped daemon was running are queued again (they resume)."""
        with self.db.begin() as session:
            for row in session.scalars(select(Pack).where(Pack.state == "running")):
                row.state = "queued"

    def start_due(self) -> None:
        """Start queued packs, oldest first, while fewer than ``limits.packs_running`` run."""
        if self._stopping:
            return
        room = self.settings.limits.packs_running - len(self._tasks)
        if room <= 0:
            return
        with self.db.begin() as session:
            queued = select(Pack.id, Pack.user).where(Pack.state == "queued").order_by(Pack.id)
            waiting = [(i, u) for i, u in session.execute(queued) if i not in self._tasks]
            running = select(Pack.user).where(Pack.id.in_(list(self._tasks)))
            ids = packs_to_start(waiting, session.scalars(running).all(), room)
        for pack_id in ids:
            self._tasks[pack_id] = asyncio.create_task(self._run(pack_id))

    async def _run(self, pack_id: int) -> None:
        try:
            await self._attempt(pack_id)
        except Exception as exc:  # a bug here must not leave the row "running" forever
            log.exception("pack %d: unexpected error", pack_id)
            self._end(pack_id, "failed", error=f"internal error: {exc}")
        finally:
            self._tasks.pop(pack_id, None)
            self._spool_needs.pop(pack_id, None)
            self.live.pop(pack_id, None)
            self.start_due()

    async def _attempt(self, pack_id: int) -> None:
        with self.db.begin() as session:
            row = session.get_one(Pack, pack_id)
            admin = bool(json.loads(row.options).get("admin"))
            # A grant revoked while the pack waited (or across a restart) stops it.
            refusal = "" if admin else self._not_allowed(row.user, row.src, row.dest)
            refusal = f"no longer allowed: {refusal}" if refusal else self._no_room(row)
            if not refusal:
                self._spool_needs[pack_id] = spool_need(_segment_size(row), PACK_JOBS)
                row.state, row.started_at, row.attempts = "running", time.time(), row.attempts + 1
                argv = self._argv(row, self._spool(pack_id))
                attempts = row.attempts
        if refusal:
            self._end(pack_id, "failed", error=refusal)
            return
        self.changed(pack_id)
        log.info("pack %d: %s", pack_id, " ".join(argv[len(self.command) :]))
        child = await asyncio.create_subprocess_exec(
            *_dies_with_us(argv),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # our signals are ours; we stop it ourselves
        )
        stderr = asyncio.create_task(_tail(child.stderr))
        summary: dict[str, Any] | None = None
        limit = self.settings.limits.pack_time_limit
        timed_out = False
        try:
            async with asyncio.timeout(limit or None):
                summary = await self._follow(pack_id, child)
                code = await child.wait()
        except TimeoutError:
            timed_out = True
            await _stop(child)
            code = await child.wait()
        except asyncio.CancelledError:
            await _stop(child)
            raise
        finally:
            tail = await stderr
        if timed_out:
            error = (
                f"stopped after {format_duration(limit)}, the site's limit for one pack"
                " (limits.pack_time_limit); the same `hpcstage pack --daemon` again resumes"
                " it from the segments already uploaded"
            )
            self._end(pack_id, "failed", error=error)
            shutil.rmtree(self._spool(pack_id), ignore_errors=True)
        elif summary is not None and code == 0:
            self._end(pack_id, "done", summary=summary)
            shutil.rmtree(self._spool(pack_id), ignore_errors=True)
        elif self._stopping:
            return  # stopped by shutdown: recover() queues it again
        else:
            if tail.strip():
                log.error("pack %d: hpcstage pack said:\n%s", pack_id, tail.rstrip())
            error = _user_error(tail) or f"hpcstage pack exited with status {code}"
            again = code < 0 and attempts < MAX_ATTEMPTS  # killed (OOM, a signal): resume
            self._end(pack_id, "queued" if again else "failed", error=error)
            if not again:  # its listing and half-built segments: nothing resumes them
                shutil.rmtree(self._spool(pack_id), ignore_errors=True)

    async def _follow(
        self, pack_id: int, child: asyncio.subprocess.Process
    ) -> dict[str, Any] | None:
        """Read the child's JSON lines until it closes stdout; its summary, if it gave one."""
        assert child.stdout is not None
        summary = None
        while line := await child.stdout.readline():
            update = parse_pack_line(line)
            if update is None:
                continue  # not one of its messages (a warning): its stderr tells the story
            if update.event == "done":
                summary = update.summary
            else:
                self.live[pack_id] = update
                self.changed(pack_id)
        return summary

    def _end(self, pack_id: int, state: str, error: str = "", summary: Any = None) -> None:
        with self.db.begin() as session:
            row = session.get_one(Pack, pack_id)
            row.state, row.error = state, error
            if state != "queued":
                row.finished_at = time.time()
            if summary is not None:
                row.summary = json.dumps(summary, sort_keys=True)
        self.audit("pack_" + state, id=pack_id, error=error)
        log.log(logging.ERROR if error else logging.INFO, "pack %d: %s %s", pack_id, state, error)
        self.changed(pack_id)

    def _no_room(self, row: Pack) -> str:
        """Why the spool's file system cannot hold this pack's segments now ("" if it can),
        counting the room the packs running beside it may still take (all of it: they may
        have written none yet) as taken."""
        taken = sum(need for other, need in self._spool_needs.items() if other != row.id)
        free = self.free_bytes(self._spool(row.id)) - taken
        return spool_refusal(free, _segment_size(row), PACK_JOBS)

    def _argv(self, row: Pack, spool: Path) -> list[str]:
        opts = json.loads(row.options)
        argv = [*self.command, "pack", row.src, row.dest, "--json", "--spool", str(spool)]
        argv += ["--config", str(self._store_config(spool))]
        argv += ["--segment-size", str(opts.get("segment_size", "256M"))]
        argv += ["--jobs", str(PACK_JOBS)]
        argv += ["--update"] if opts.get("update") else []
        argv += ["--verify"] if opts.get("verify") else []
        return argv

    def _spool(self, pack_id: int) -> Path:
        spool = Path(self.settings.site.state_dir) / "packs" / str(pack_id)
        spool.mkdir(mode=0o700, parents=True, exist_ok=True)
        return spool

    def _store_config(self, spool: Path) -> Path:
        """A TOML file with the site's [store] (where the store is; never credentials): the
        child reads it as ``hpcstage pack --config`` reads a site configuration's."""
        store = self.settings.store
        lines = ["[store]", f"endpoint_url = {json.dumps(str(store.endpoint_url))}"]
        lines += [f"addressing_style = {json.dumps(store.addressing_style)}"]
        lines += [f"verify_tls = {'true' if store.verify_tls else 'false'}"]
        for key in ("region", "profile", "ca_bundle"):
            value = getattr(store, key)
            if value:
                lines.append(f"{key} = {json.dumps(str(value))}")
        path = spool / "store.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    async def close(self) -> None:
        """Stop the running packs; the next daemon resumes them."""
        self._stopping = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # Their rows stay "running": the next daemon's recover() queues them (this one may
        # have lost the state's lock, and must not write it).

    # -- for the API ----------------------------------------------------------------------

    def document(self, session: Session, row: Pack) -> dict[str, Any]:
        """What ``GET /api/v1/packs/{id}`` answers: the row, with live progress while it runs."""
        live = self.live.get(row.id)
        return {
            "id": row.id,
            "user": row.user,
            "src": row.src,
            "dest": row.dest,
            "options": json.loads(row.options),
            "state": row.state,
            "error": row.error,
            "attempts": row.attempts,
            "created_at": row.created_at,
            "started_at": row.started_at,
            "finished_at": row.finished_at,
            "progress": live.progress if live is not None else None,
            "summary": json.loads(row.summary) if row.summary else None,
        }


def _segment_size(row: Pack) -> int:
    return parse_size(str(json.loads(row.options).get("segment_size", "256M")))


def _dies_with_us(argv: list[str]) -> list[str]:
    """``argv`` run so that the kernel kills it when the daemon dies (SIGKILL, a crash): an
    orphaned pack would race the next daemon's resumed one on the same pending version.
    setpriv (util-linux) sets the parent-death signal before exec; without it, a dead daemon
    leaves its packs running to their end."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else argv


async def _tail(stream: asyncio.StreamReader | None) -> str:
    """The last ERROR_TAIL bytes the child wrote to stderr (read to the end: a full pipe
    would stop it)."""
    kept = b""
    while stream is not None and (chunk := await stream.read(65536)):
        kept = (kept + chunk)[-ERROR_TAIL:]
    return kept.decode(errors="replace")


def _user_error(tail: str) -> str:
    """The message the child meant for its user (``hpcstage: error: ...``), never other
    output (a traceback, a library's warning: the daemon's log keeps those)."""
    said = [line.strip() for line in tail.splitlines() if line.startswith(ERROR_PREFIX)]
    return said[-1][len(ERROR_PREFIX) :] if said else ""


async def _stop(child: asyncio.subprocess.Process) -> None:
    """SIGTERM the child's process group (the pack and its threads), SIGKILL after a grace."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, sig)
        try:
            await asyncio.wait_for(child.wait(), wait)
            return
        except TimeoutError:
            continue
