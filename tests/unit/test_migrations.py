"""The state schema upgrades in place: a daemon's database from an older release keeps its rows."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, MetaData, Table, create_engine, inspect

from hpcstage.db import MIGRATIONS, Job, Request, Staging, open_db


def _upgrade(url: str, revision: str) -> None:
    engine = create_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    engine.dispose()


def _insert(conn: Connection, table: str, **row: object) -> None:
    conn.execute(Table(table, MetaData(), autoload_with=conn).insert().values(**row))


def test_a_database_of_revision_0002_upgrades_and_keeps_its_stagings(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    _upgrade(url, "0002")
    engine = create_engine(url)
    with engine.begin() as conn:
        assert "peer_files" not in {c["name"] for c in inspect(conn).get_columns("stagings")}
        _insert(
            conn,
            "jobs",
            id=1,
            kind="job",
            name="j",
            user="alice",
            account="",
            partition="",
            state="RUNNING",
            state_reason="",
            priority=0,
            planned_nodes="",
            nodes="n1",
            batch_host="",
            directive_source="admin_comment",
            error="",
            first_seen=0.0,
        )
        _insert(
            conn,
            "requests",
            id=1,
            job_id=1,
            direction="in",
            position=0,
            src="s3://b/k",
            dest="k",
            line=1,
            text="--stage-in=s3://b/k",
            when="always",
            optional=False,
        )
        _insert(
            conn,
            "stagings",
            id=1,
            request_id=1,
            node="n1",
            state="ready",
            files_done=3,
            bytes_done=300,
            fetched_files=3,
            error="",
            attempts=1,
        )
    engine.dispose()

    factory = open_db(url)  # what a newer daemon does at start: upgrade to head
    try:
        with factory.begin() as session:
            st = session.get_one(Staging, 1)
            assert (st.files_done, st.fetched_files, st.peer_files) == (3, 3, 0)
            st.peer_files = 29
        with factory.begin() as session:
            assert session.get_one(Staging, 1).peer_files == 29
    finally:
        factory.kw["bind"].dispose()


def test_a_database_of_revision_0003_upgrades_and_its_jobs_keep_their_ids(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    _upgrade(url, "0003")
    engine = create_engine(url)
    with engine.begin() as conn:
        _insert(
            conn,
            "jobs",
            id=1,
            kind="job",
            slurm_job_id=7,
            name="j",
            user="alice",
            account="",
            partition="",
            state="COMPLETED",
            state_reason="",
            priority=0,
            planned_nodes="",
            nodes="n1",
            batch_host="n1",
            directive_source="admin_comment",
            error="",
            first_seen=100.0,
        )
    engine.dispose()

    factory = open_db(url)
    try:
        with factory.begin() as session:
            job = session.get_one(Job, 1)
            assert (job.slurm_job_id, job.slurm_id, job.submitted_at, job.replaced_at) == (
                7,
                7,
                None,
                None,
            )
            job.slurm_job_id, job.former_slurm_job_id = None, 7
        with factory.begin() as session:
            assert session.get_one(Job, 1).slurm_id == 7
    finally:
        factory.kw["bind"].dispose()
    # And back: the downgrade drops the columns again.
    engine = create_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0003")
        columns = {c["name"] for c in inspect(conn).get_columns("jobs")}
    engine.dispose()
    assert not columns & {"submitted_at", "replaced_at", "former_slurm_job_id"}


def test_a_database_of_revision_0004_upgrades_and_its_stage_outs_do_not_pack(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    _upgrade(url, "0004")
    engine = create_engine(url)
    with engine.begin() as conn:
        assert "pack" not in {c["name"] for c in inspect(conn).get_columns("requests")}
        _insert(
            conn,
            "jobs",
            id=1,
            kind="job",
            slurm_job_id=8,
            name="j",
            user="alice",
            account="",
            partition="",
            state="COMPLETED",
            state_reason="",
            priority=0,
            planned_nodes="",
            nodes="n1",
            batch_host="n1",
            directive_source="admin_comment",
            error="",
            first_seen=100.0,
        )
        _insert(
            conn,
            "requests",
            id=1,
            job_id=1,
            direction="out",
            position=0,
            src="out",
            dest="s3://b/o/",
            line=1,
            text="--stage-out=out:s3://b/o/",
            when="always",
            optional=False,
        )
    engine.dispose()

    factory = open_db(url)
    try:
        with factory.begin() as session:
            request = session.get_one(Request, 1)
            assert (request.dest, request.pack) == ("s3://b/o/", False)
            request.pack = True
        with factory.begin() as session:
            assert session.get_one(Request, 1).pack is True
    finally:
        factory.kw["bind"].dispose()


def test_the_migrations_make_exactly_the_tables_the_models_declare(tmp_path: Path) -> None:
    # A model column or table without its migration (or the other way round) works in tests
    # that create tables from the models, and breaks every site's upgrade.
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from hpcstage.db import Base, open_db

    factory = open_db(f"sqlite:///{tmp_path}/state.db")
    try:
        with factory.kw["bind"].connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        factory.kw["bind"].dispose()  # Python 3.13 warns of sqlite connections left open


def test_a_database_of_revision_0005_upgrades_and_its_jobs_are_no_array_tasks(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    _upgrade(url, "0005")
    engine = create_engine(url)
    with engine.begin() as conn:
        assert "array_job_id" not in {c["name"] for c in inspect(conn).get_columns("jobs")}
        _insert(
            conn,
            "jobs",
            id=1,
            kind="job",
            slurm_job_id=9,
            name="j",
            user="alice",
            account="chem",
            partition="",
            state="RUNNING",
            state_reason="",
            priority=0,
            planned_nodes="",
            nodes="n1",
            batch_host="n1",
            directive_source="admin_comment",
            error="",
            first_seen=100.0,
        )
    engine.dispose()

    factory = open_db(url)
    try:
        with factory.begin() as session:
            job = session.get_one(Job, 1)
            assert (job.array_job_id, job.array_task_id, job.array_tasks) == (None, None, "")
            job.array_job_id, job.array_task_id = 8, 1
        with factory.begin() as session:
            assert session.get_one(Job, 1).array_task_id == 1
    finally:
        factory.kw["bind"].dispose()
    engine = create_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0005")
        columns = {c["name"] for c in inspect(conn).get_columns("jobs")}
    engine.dispose()
    assert not columns & {"array_job_id", "array_task_id", "array_tasks"}
