"""Committed state changes that API requests can wait on (long polling).

``hpcstage warmup`` and ``hpcstage env`` follow a job's staging until it settles. Instead of
asking the daemon every fraction of a second, they send the ``changes`` count of their last
answer (``?since=N&wait=S``); the daemon answers as soon as it has committed a change to that
job since (an event logged for it, or its row updated: every staging that starts, finishes or
fails logs an event), or after ``S`` seconds. A finished staging is seen at once, and an idle
wait costs one request.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import OrderedDict

from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

from hpcstage.db.models import Event, Job

_TOUCHED = "hpcstage.touched"  # Session.info key: ids of the jobs this transaction changed
REMEMBERED = 10_000  # jobs whose last change is remembered; older ones count as "changed"


class Changes:
    """A counter bumped by every commit that changed a job; a request waiting on a job wakes
    when that job changes (only then: a site may have thousands of jobs waiting).

    Bumps from the event loop's thread wake waiters at once; from another thread they are
    handed to the loop (``asyncio.Event`` is not thread-safe).
    """

    def __init__(self) -> None:
        self.count = 0
        self._touched: OrderedDict[int, int] = OrderedDict()  # job id -> count of its change
        self._forgotten = 0  # the newest count dropped from _touched
        self._waiters: dict[int, set[asyncio.Event]] = {}  # job id -> its waiting requests
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wake waiters on ``loop`` (the daemon's), whichever thread commits."""
        self._loop, self._thread = loop, threading.get_ident()

    def bump(self, jobs: set[int]) -> None:
        """Record that ``jobs`` changed, and wake the requests waiting on them."""
        if self._loop is not None and threading.get_ident() != self._thread:
            self._loop.call_soon_threadsafe(self.bump, jobs)
            return
        self.count += 1
        for job in jobs:
            self._touched[job] = self.count
            self._touched.move_to_end(job)
            for woken in self._waiters.get(job, ()):
                woken.set()
        while len(self._touched) > REMEMBERED:
            _, dropped = self._touched.popitem(last=False)
            self._forgotten = max(self._forgotten, dropped)

    def changed(self, job: int, since: int) -> bool:
        """Whether ``job`` changed after the count was ``since`` (True when unsure)."""
        if since > self.count or since < self._forgotten:
            return True  # a count from before a restart, or too old to tell
        return self._touched.get(job, 0) > since

    async def wait(self, job: int, since: int | None, timeout: float) -> None:
        """Return once ``job`` changed after ``since``, or after ``timeout`` seconds; at once
        when ``since`` is None (no earlier answer)."""
        if since is None or timeout <= 0 or self.changed(job, since):
            return
        woken = asyncio.Event()
        self._waiters.setdefault(job, set()).add(woken)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), timeout)
        finally:
            waiting = self._waiters.get(job)
            if waiting is not None:
                waiting.discard(woken)
                if not waiting:
                    del self._waiters[job]

    def watch(self, factory: sessionmaker[Session]) -> None:
        """Bump after each commit of a session from ``factory`` that logged an event for a
        job or updated a job's row (read-only transactions, such as the API's, do not)."""
        event.listen(factory, "after_flush", _note_jobs)
        event.listen(factory, "after_commit", self._after_commit)
        event.listen(factory, "after_transaction_end", _forget_jobs)

    def _after_commit(self, session: Session) -> None:
        jobs = session.info.pop(_TOUCHED, None)
        if jobs:
            self.bump(jobs)


def pack_key(pack_id: int) -> int:
    """The key a daemon pack's changes are counted and waited on under: packs share the
    counter with jobs, under negative keys, so that pack 7 and job 7 never wake each other."""
    return -pack_id


def _note_jobs(session: Session, _context: object) -> None:
    # after_flush: ids are assigned, and new/dirty still list what this flush wrote.
    jobs: set[int] = session.info.setdefault(_TOUCHED, set())
    for obj in session.new:
        if isinstance(obj, Event) and obj.job_id is not None:
            jobs.add(obj.job_id)
        elif isinstance(obj, Job):
            jobs.add(obj.id)
    for obj in session.dirty:
        if isinstance(obj, Job) and session.is_modified(obj):
            jobs.add(obj.id)


def _forget_jobs(session: Session, transaction: SessionTransaction) -> None:
    # Only when the outermost transaction ends (after its commit was counted, or rolled
    # back): a savepoint rolled back inside a transaction that then commits must not drop
    # what the transaction changed before it (at worst, one early answer).
    if transaction.parent is None:
        session.info.pop(_TOUCHED, None)
