"""The daemon's state: SQLAlchemy 2 models. The database is the truth for what is in flight.

SQLite (one file) is the default; PostgreSQL serves a highly available pair of daemons.
Schema changes go through Alembic migrations in hpcstage/db/migrations/.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    """Declarative base of every hpcstage table."""


class Job(Base):
    """A Slurm job with staging directives, or a warmup or kept-warm dataset (``hpcstage pin``)
    the daemon runs on its own."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16), default="job")  # job | warmup | pin
    slurm_job_id: Mapped[int | None] = mapped_column(BigInteger, unique=True, nullable=True)
    name: Mapped[str] = mapped_column(String(256), default="")
    user: Mapped[str] = mapped_column(String(64), default="")
    account: Mapped[str] = mapped_column(String(64), default="")
    partition: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[str] = mapped_column(String(32), default="PENDING")
    state_reason: Mapped[str] = mapped_column(String(128), default="")
    priority: Mapped[int] = mapped_column(BigInteger, default=0)
    expected_start: Mapped[float | None] = mapped_column(Float, nullable=True)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    planned_nodes: Mapped[str] = mapped_column(Text, default="")  # comma-separated, expanded
    nodes: Mapped[str] = mapped_column(Text, default="")  # where it runs / ran
    batch_host: Mapped[str] = mapped_column(String(128), default="")  # where stage-out reads
    directive_source: Mapped[str] = mapped_column(String(32), default="")
    error: Mapped[str] = mapped_column(Text, default="")  # refusal or malformed directive
    first_seen: Mapped[float] = mapped_column(Float, default=0.0)
    released_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Slurm's submit time: with the id, what tells this job from a later one Slurm gave the
    # same id (its counter wrapped, its state was reset). None in rows of older releases.
    submitted_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # When a newer job with this id appeared: this one is gone from Slurm for good.
    replaced_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The id, once the newer job took ``slurm_job_id`` over (after this one's release).
    former_slurm_job_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # A task of a job array: the array's id and this task's (``A_a`` in squeue), or the
    # tasks a pending array's record still holds ("4-19"). None/"" outside arrays and in rows
    # of older releases.
    array_job_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    array_task_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    array_tasks: Mapped[str] = mapped_column(String(256), default="")
    # Slurm's restart count of the run this row records (a requeue counts one at once, the
    # new submit time comes when the run is wound down): a re-run that asks for its inputs
    # before the daemon has seen the requeue is told to ask again. None in older rows.
    restarts: Mapped[int | None] = mapped_column(Integer, nullable=True)

    requests: Mapped[list[Request]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="Request.position"
    )

    @property
    def slurm_id(self) -> int | None:
        """The Slurm job id, also after a newer job took it over."""
        return self.slurm_job_id if self.slurm_job_id is not None else self.former_slurm_job_id


class Request(Base):
    """One directive of a job.

    ``in``: a source and its destination under $HPCSTAGE_DIR. ``out``: a path under
    $HPCSTAGE_DIR and its destination in the store. ``dir``: no data, only the job directory
    (for jobs that stage out but stage nothing in).
    """

    __tablename__ = "requests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    direction: Mapped[str] = mapped_column(String(8), default="in")  # in | out | dir
    position: Mapped[int] = mapped_column(Integer, default=0)
    src: Mapped[str] = mapped_column(Text)
    dest: Mapped[str] = mapped_column(Text)
    line: Mapped[int] = mapped_column(Integer, default=0)
    text: Mapped[str] = mapped_column(Text, default="")
    when: Mapped[str] = mapped_column(String(16), default="always")  # stage-out: on=...
    optional: Mapped[bool] = mapped_column(Boolean, default=False)  # stage-out: SRC may be absent
    pack: Mapped[bool] = mapped_column(Boolean, default=False)  # stage-out: as a packed dataset
    # stage-out: DEST as written, when it holds %-patterns (``dest`` is it expanded). A job
    # array's pending record learns its task id (%a) only when it becomes a task.
    dest_template: Mapped[str] = mapped_column(Text, default="")

    job: Mapped[Job] = relationship(back_populates="requests")
    stagings: Mapped[list[Staging]] = relationship(
        back_populates="request", cascade="all, delete-orphan"
    )


class Staging(Base):
    """Progress of one request on one node: queued -> running -> ready | failed (| released)."""

    __tablename__ = "stagings"
    __table_args__ = (UniqueConstraint("request_id", "node"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[int] = mapped_column(
        ForeignKey("requests.id", ondelete="CASCADE"), index=True
    )
    node: Mapped[str] = mapped_column(String(128), index=True)
    state: Mapped[str] = mapped_column(String(16), default="queued")
    files_done: Mapped[int] = mapped_column(BigInteger, default=0)
    files_total: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_total: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    fetched_files: Mapped[int] = mapped_column(BigInteger, default=0)  # from the store
    peer_files: Mapped[int] = mapped_column(BigInteger, default=0)  # from other nodes' caches
    error: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    request: Mapped[Request] = relationship(back_populates="stagings")
    uploads: Mapped[list[Upload]] = relationship(
        back_populates="staging", cascade="all, delete-orphan", order_by="Upload.path"
    )


class Upload(Base):
    """One file of a stage-out: where it went and how (uploaded, present, skipped, failed)."""

    __tablename__ = "uploads"
    __table_args__ = (UniqueConstraint("staging_id", "path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    staging_id: Mapped[int] = mapped_column(
        ForeignKey("stagings.id", ondelete="CASCADE"), index=True
    )
    path: Mapped[str] = mapped_column(Text)
    key: Mapped[str] = mapped_column(Text, default="")
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    state: Mapped[str] = mapped_column(String(16))
    trash_key: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[float] = mapped_column(Float, default=0.0)

    staging: Mapped[Staging] = relationship(back_populates="uploads")


class Event(Base):
    """An append-only log of what the daemon did and why, shown in status."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ts: Mapped[float] = mapped_column(Float, index=True)
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), nullable=True, index=True
    )
    node: Mapped[str] = mapped_column(String(128), default="")
    level: Mapped[str] = mapped_column(String(8), default="info")
    message: Mapped[str] = mapped_column(Text)

    # One way (a job loads no events): lets an event name a job not flushed yet.
    job: Mapped[Job | None] = relationship()


class Pack(Base):
    """``hpcstage pack --daemon``: a packing the daemon runs for a user with the site's
    credentials (S3 prefix to packed dataset), after the policy let the user read the source
    and write the destination."""

    __tablename__ = "packs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user: Mapped[str] = mapped_column(String(64), index=True)
    src: Mapped[str] = mapped_column(Text)
    dest: Mapped[str] = mapped_column(Text, index=True)
    options: Mapped[str] = mapped_column(Text, default="{}")  # JSON: update, segment_size, ...
    state: Mapped[str] = mapped_column(String(16), default="queued")  # running, done, failed
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float, default=0.0)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    summary: Mapped[str] = mapped_column(Text, default="")  # JSON: the pack's "done" line


class KeptWarm(Base):
    """``hpcstage pin``: a dataset an admin keeps warm on chosen nodes, leased while kept.

    Its staging is the job row with the same id (kind ``pin``): its view on each node, a
    directory no user can reach, holds the lease; removing the pin ends that job, which
    releases the views. Not a packed dataset's pinned version (``staging/pin.py``).
    """

    __tablename__ = "kept_warm"

    id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    src: Mapped[str] = mapped_column(Text)
    nodes: Mapped[str] = mapped_column(Text)  # comma-separated, expanded
    schedule: Mapped[str] = mapped_column(String(128), default="")  # core/schedule.py; "" none
    until: Mapped[float | None] = mapped_column(Float, nullable=True)  # released after
    created_by: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[float] = mapped_column(Float, default=0.0)
    last_refresh_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    next_refresh_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    removed_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    removed_by: Mapped[str] = mapped_column(String(64), default="")  # "" and a time: expired


class Fencing(Base):
    """The state database's leader epochs (core/fencing.py): one row, made by its migration.

    ``state_id`` names this database to the node caches (epochs of two databases are not
    ordered); ``epoch`` grows by one each time a daemon becomes active on it (``holder``,
    ``since``: the last one, for people)."""

    __tablename__ = "fencing"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1
    state_id: Mapped[str] = mapped_column(String(32))
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    holder: Mapped[str] = mapped_column(Text, default="")
    since: Mapped[float] = mapped_column(Float, default=0.0)
