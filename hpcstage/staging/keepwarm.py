"""Kept-warm datasets (``hpcstage pin``): a source an admin keeps staged on chosen nodes.

Not to be confused with ``staging/pin.py``, which settles the *version* of a packed dataset a
request reads. Here "pin" is the admin's word for "keep this warm here".

A kept-warm dataset is recorded twice: a ``KeptWarm`` row (source, nodes, schedule, until,
who) and a job row of kind ``pin`` with the same id and one input. The planner stages that
job like a warmup, but with a view: the agent links the objects into ``DIR/jobs/pin-<id>``,
a directory only the service account can reach, and those links are the lease that keeps the
objects from eviction, beyond the cache's TTL and under watermark pressure, exactly as a
job's inputs are kept. Removing the pin (or its ``until`` passing) ends that job: its views
are released at the next tick and the data ages out of the caches like any unleased data.

With a schedule (``core/schedule.py``) the daemon queues the staging again on every node
when it is due: the agent lists the source again, fetches what is new or changed and links
it (a link replaced in the view releases the old version's lease). A refresh only adds and
replaces: an object deleted from the source keeps its link, so stays leased on the nodes,
until the pin is removed (dropping it would mean holding every listed key of the source to
compare with the view, up to 10^6 and more; an admin who wants the space back re-creates the
pin). The result of the last refresh is what the stagings say since then (``document``).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from hpcstage.core import directives as dirs
from hpcstage.core import schedule as schedules
from hpcstage.db import Job, KeptWarm, Request, Staging
from hpcstage.errors import DirectiveError
from hpcstage.watch.fold import log_event, split_nodes

log = logging.getLogger("hpcstage.daemon")

KIND = "pin"  # the job kind of a kept-warm dataset
STATE = "PINNED"  # its job's state (squeue's column shows it)


@dataclass(frozen=True)
class PinRequest:
    """What ``hpcstage pin add`` asks for."""

    src: str  # as a --stage-in value: s3://bucket/prefix/[:DEST] or a shared path
    nodes: list[str]  # expanded
    schedule: str = ""  # core/schedule.py; "" = staged once, never refreshed
    until: float | None = None  # Unix time after which it is released; None = until removed


class NotAdmin(PermissionError):
    """Only admins keep datasets warm: the cache space is the site's."""


@dataclass
class KeepWarm:
    """Records, refreshes and removes kept-warm datasets."""

    db: sessionmaker[Session]
    audit: Callable[..., None]  # AuditLog.record: (event, **fields)
    wake: Callable[[], None]

    def create(self, pin: PinRequest, user: str, admin: bool) -> int:
        """Keep ``pin.src`` warm on ``pin.nodes``; its id. NotAdmin for a user who is not an
        admin; DirectiveError naming ``src``, ``schedule`` or ``until`` when one is wrong."""
        src, nodes, schedule, until = pin.src, pin.nodes, pin.schedule, pin.until
        if not admin:
            self.audit("refused", user=user, pin=src, reason="not an admin")
            raise NotAdmin(f"only admins may keep datasets warm ({user} is not in api.admins)")
        try:
            stage_in = dirs.parse_value("stage-in", src)
        except DirectiveError as exc:
            raise DirectiveError(f"src: {exc}") from exc
        now = time.time()
        every = _schedule(schedule)
        if until is not None and until <= now:
            raise DirectiveError(f"until: {_when(until)} is already past")
        with self.db.begin() as session:
            job = Job(kind=KIND, name=f"pin {src}", user=user, state=STATE, first_seen=now)
            job.planned_nodes = ",".join(nodes)
            request = Request(direction="in", position=0, src=stage_in.src.url, line=0, text=src)
            request.dest = str(stage_in.dest)
            job.requests = [request]
            session.add(job)
            session.flush()
            next_at = every.next_after(now) if every is not None else None
            session.add(
                KeptWarm(
                    id=job.id,
                    src=stage_in.src.url,
                    nodes=job.planned_nodes,
                    schedule=schedule.strip(),
                    until=until,
                    created_by=user,
                    created_at=now,
                    next_refresh_at=next_at,
                )
            )
            log_event(session, job.id, "", f"kept warm on {', '.join(nodes)} by {user}")
            pin_id = job.id
        self.audit("pin", user=user, src=stage_in.src.url, nodes=nodes, schedule=schedule)
        self.wake()
        return pin_id

    def remove(self, pin_id: int, user: str, admin: bool) -> bool:
        """Stop keeping ``pin_id`` warm: its leases go at the next tick. False if there is no
        such pin (or it was removed already); NotAdmin for a user who is not an admin."""
        if not admin:
            self.audit("refused", user=user, unpin=pin_id, reason="not an admin")
            raise NotAdmin(f"only admins may remove kept-warm datasets ({user} is not an admin)")
        with self.db.begin() as session:
            found = session.get(KeptWarm, pin_id)
            if found is None or found.removed_at is not None:
                return False
            _end(session, found, time.time(), f"removed by {user}", user)
        self.audit("unpin", user=user, pin=pin_id)
        self.wake()
        return True

    def run_due(self, now: float | None = None) -> int:
        """Release the pins whose ``until`` passed and queue again those whose refresh is
        due; the number of pins changed (the caller wakes the planner)."""
        now = time.time() if now is None else now
        changed = 0
        with self.db.begin() as session:
            live = select(KeptWarm).where(KeptWarm.removed_at.is_(None))
            for pin in session.scalars(live):
                if pin.until is not None and pin.until <= now:
                    _end(session, pin, now, f"kept until {_when(pin.until)}", "")
                    changed += 1
                elif pin.next_refresh_at is not None and pin.next_refresh_at <= now:
                    _refresh(session, pin, now)
                    changed += 1
        return changed


def _schedule(text: str) -> schedules.Schedule | None:
    if not text.strip():
        return None
    try:
        return schedules.parse(text)
    except schedules.ScheduleError as exc:
        raise DirectiveError(f"schedule: {exc}") from exc


def _end(session: Session, pin: KeptWarm, now: float, why: str, user: str) -> None:
    """End the pin's job: the planner releases its views (no lease grace for a pin)."""
    pin.removed_at, pin.removed_by, pin.next_refresh_at = now, user, None
    job = session.get_one(Job, pin.id)
    if job.ended_at is None:
        job.ended_at, job.state = now, "UNPINNED"
    log_event(session, pin.id, "", f"no longer kept warm: {why}")


def _refresh(session: Session, pin: KeptWarm, now: float) -> None:
    """Queue the pin's staging again on every node (what runs now goes on: it is fresh)."""
    stagings = (
        select(Staging.id)
        .join(Request)
        .where(Request.job_id == pin.id, Staging.state.notin_(("running", "queued")))
    )
    session.execute(
        update(Staging)
        .where(Staging.id.in_(stagings))
        .values(state="queued", error="", attempts=0)
        .execution_options(synchronize_session=False)
    )
    every = schedules.parse(pin.schedule)  # checked when the pin was made
    pin.last_refresh_at = now
    pin.next_refresh_at = every.next_after(now)
    log_event(session, pin.id, "", f"scheduled refresh ({pin.schedule})")
    log.info("pin %d: scheduled refresh of %s (%s)", pin.id, pin.src, pin.schedule)


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def document(session: Session, pin: KeptWarm) -> dict[str, Any]:
    """What ``hpcstage pin ls`` shows of one pin: its settings and each node's staging."""
    rows = session.execute(
        select(Staging).join(Request).where(Request.job_id == pin.id, Request.direction == "in")
    ).scalars()
    nodes = {
        st.node: {
            "state": st.state,
            "files": st.files_done,
            "bytes": st.bytes_done,
            "finished_at": st.finished_at,
            "error": st.error,
        }
        for st in rows
    }
    return {
        "id": pin.id,
        "src": pin.src,
        "nodes": list(split_nodes(pin.nodes)),
        "schedule": pin.schedule,
        "until": pin.until,
        "created_by": pin.created_by,
        "created_at": pin.created_at,
        "last_refresh_at": pin.last_refresh_at,
        "next_refresh_at": pin.next_refresh_at,
        "removed_at": pin.removed_at,
        "state": _state(pin, nodes),
        "staging": nodes,
    }


def _state(pin: KeptWarm, nodes: dict[str, dict[str, Any]]) -> str:
    """One word for the pin: warm | staging | failed | released (and ``failed`` names why)."""
    if pin.removed_at is not None:
        return "released"
    states = [nodes.get(n, {}).get("state", "queued") for n in split_nodes(pin.nodes)]
    if "failed" in states:
        return "failed"
    return "warm" if all(s == "ready" for s in states) else "staging"
