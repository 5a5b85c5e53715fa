"""Warmups: fill nodes' caches with a source before any job asks for it (``hpcstage warmup``).

A warmup is recorded as a job of kind ``warmup`` with one input; the next tick plans it like a
job's stage-in, without a view. Users may warm only what the policy lets them read, and only
so many at once (``[limits]``); admins may warm anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from hpcstage.config.schema import Settings
from hpcstage.core import directives as dirs
from hpcstage.core import limits, policy
from hpcstage.db import Job, Request
from hpcstage.errors import LimitError
from hpcstage.watch.fold import log_event


@dataclass
class Warmups:
    """Admits and records warmup requests."""

    settings: Settings
    db: sessionmaker[Session]
    audit: Callable[..., None]  # AuditLog.record: (event, **fields); service/ owns the log
    wake: Callable[[], None]

    def create(self, src: str, nodes: list[str], user: str, admin: bool = False) -> int:
        """Record a warmup of ``src`` on ``nodes``; the next tick starts it.

        PermissionError when the policy does not let ``user`` read ``src``, LimitError when
        ``user`` has too many warmups in flight or requested too many in the last minute
        (admins may warm anything, as often as they like: they run the site).
        """
        stage_in = dirs.parse_value("stage-in", src)
        decision = policy.check(self.settings.policy, user, "", "read", stage_in.src.policy_url)
        if not (admin or decision.allowed):
            self.audit("refused", user=user, warmup=src, reason=decision.rule)
            raise PermissionError(f"warmup of {src} refused: {decision.rule}")
        refusal = "" if admin else self._refusal(user)
        if refusal:
            self.audit("refused", user=user, warmup=src, reason=refusal)
            raise LimitError(f"warmup of {src} refused: {refusal}")
        self.audit("warmup", user=user, src=stage_in.src.url, nodes=nodes)
        with self.db.begin() as session:
            job = Job(
                kind="warmup",
                name=f"warmup {src}",
                user=user,
                state="WARMUP",
                planned_nodes=",".join(nodes),
                first_seen=time.time(),
            )
            job.requests = [
                Request(
                    direction="in",
                    position=0,
                    src=stage_in.src.url,
                    dest=str(stage_in.dest),
                    line=0,
                    text=src,
                )
            ]
            session.add(job)
            session.flush()
            log_event(session, job.id, "", f"warmup of {src} on {', '.join(nodes)} requested")
            job_id = job.id
        self.wake()
        return job_id

    def _refusal(self, user: str) -> str:
        """Why ``user`` may not request another warmup now ('' if they may). Counted and
        recorded in one synchronous step of the loop: two requests cannot both slip under."""
        mine = select(func.count()).select_from(Job).where(Job.kind == "warmup", Job.user == user)
        with self.db.begin() as session:
            in_flight = session.scalar(mine.where(Job.released_at.is_(None))) or 0
            recent = session.scalar(mine.where(Job.first_seen >= time.time() - 60)) or 0
        return limits.warmup_refusal(self.settings.limits, in_flight, recent)
