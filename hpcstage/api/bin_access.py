"""Who may see and restore a recycle-bin entry: the user of the job whose stage-out put it
there (admins: anyone), and for a restore only where today's policy lets them write."""

from __future__ import annotations

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from hpcstage import auth
from hpcstage.config.schema import PolicySettings
from hpcstage.core import policy
from hpcstage.db import Job
from hpcstage.staging import trash

JOB_ID_DIGITS = 10  # Slurm job ids are 32-bit: longer digit strings are no job of ours

BinKey = tuple[str, str]
"""A recycle-bin entry's (Slurm job id, day), as its key spells them."""


def bin_owners(db: sessionmaker[Session], entries: set[BinKey]) -> dict[BinKey, trash.BinJob]:
    """The job behind each (Slurm job id, day) of recycle-bin entries, in one query. Ids
    are given again, so every job that held the id is a candidate (trash.owner_of)."""
    ids = {int(j) for j, _ in entries if j.isascii() and j.isdigit() and len(j) <= JOB_ID_DIGITS}
    if not ids:
        return {}
    query = select(
        Job.slurm_job_id, Job.former_slurm_job_id, Job.user, Job.account, Job.ended_at
    ).where(or_(Job.slurm_job_id.in_(ids), Job.former_slurm_job_id.in_(ids)))
    held: dict[str, list[trash.BinJob]] = {}
    with db.begin() as session:
        for now, before, user, account, ended in session.execute(query.order_by(Job.id)):
            held.setdefault(str(now or before), []).append(trash.BinJob(user, account or "", ended))
    found = {(j, d): trash.owner_of(d, held.get(j, [])) for j, d in entries}
    return {entry: job for entry, job in found.items() if job is not None}


def visible(
    db: sessionmaker[Session], me: auth.Identity, entries: list[trash.TrashEntry]
) -> list[trash.TrashEntry]:
    """Those of ``entries`` ``me`` may see: all for admins, else their own jobs'."""
    if me.admin:
        return entries
    owners = bin_owners(db, {(e.job, e.day) for e in entries})
    return [e for e in entries if _user(owners.get((e.job, e.day))) == me.user]


def may_not_restore(
    db: sessionmaker[Session],
    rules: PolicySettings,
    me: auth.Identity,
    entry: BinKey,
    url: str,
) -> str:
    """Why ``me`` may not restore ``entry`` to ``url`` ("": may): it must be from ``me``'s
    job, and today's policy must let ``me`` write there (a restore writes the key again,
    and the rules may have changed since). Admins run the site and may restore anything."""
    if me.admin:
        return ""
    job = bin_owners(db, {entry}).get(entry)
    if job is None or job.user != me.user:
        return "that recycle-bin entry belongs to another user's job"
    decision = policy.check(rules, me.user, job.account, "write", url)
    return "" if decision.allowed else f"restore refused: {decision.rule}"


def _user(job: trash.BinJob | None) -> str | None:
    return job.user if job is not None else None
