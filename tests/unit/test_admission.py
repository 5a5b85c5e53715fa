"""Admission without Slurm: directives read from the batch script (a fake backend), authorized
by the policy, and every decision written to the audit log."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from hpcstage.config.load import parse_config
from hpcstage.config.schema import Settings
from hpcstage.watch.admission import Admission
from hpcstage.watch.slurm.backend import SlurmBackend
from hpcstage.watch.slurm.model import JobInfo

SETTINGS = """
[site]
name = "t"
state_dir = "/nonexistent"
[store]
endpoint_url = "http://127.0.0.1:9"
[slurm]
directives_from = ["batch_script"]
partitions = ["batch"]
[[policy.rules]]
accounts = ["chem"]
read = ["s3://datasets/chem/"]
write = ["s3://results/chem/"]
"""


class Scripts:
    """The one backend method admission calls."""

    def __init__(self, script: str) -> None:
        self.script = script

    async def batch_script(self, job_id: int) -> str | None:
        return self.script


def _info(partition: str = "batch") -> JobInfo:
    return JobInfo(
        job_id=7,
        array_job_id=None,
        array_task_id=None,
        name="run",
        user="bob",
        uid=1000,
        account="chem",
        partition=partition,
        state="PENDING",
        state_reason="",
        priority=1,
        submit_time=None,
        start_time=None,
        end_time=None,
        nodes=(),
        planned_nodes=(),
        batch_host="",
        admin_comment="",
        comment="",
        work_dir="/tmp",
        exit_code=None,
    )


def _admit(script: str, info: JobInfo) -> tuple[Any, list[tuple[str, dict[str, Any]]]]:
    settings: Settings = parse_config(SETTINGS)
    audited: list[tuple[str, dict[str, Any]]] = []

    def record(event: str, **fields: Any) -> None:
        audited.append((event, fields))

    admission = Admission(settings, cast(SlurmBackend, Scripts(script)), record)
    return asyncio.run(admission.directives(info)), audited


def test_allowed_directives_are_kept_and_audited() -> None:
    script = "#!/bin/sh\n#HPCSTAGE --stage-in=s3://datasets/chem/x/\n"
    found, audited = _admit(script, _info())
    assert (found.source, found.error) == ("batch_script", "")
    assert [d["src"] for d in found.stage_in] == ["s3://datasets/chem/x/"]
    who = {"job": 7, "user": "bob", "account": "chem"}
    assert audited == [("stage-in", who | {"src": "s3://datasets/chem/x/", "dest": "x"})]


def test_a_directive_the_policy_refuses_refuses_the_job_and_is_audited() -> None:
    script = "#!/bin/sh\n#HPCSTAGE --stage-out=out:s3://results/other/\n"
    found, audited = _admit(script, _info())
    assert found.stage_in == found.stage_out == []
    assert found.error.startswith("#HPCSTAGE --stage-out=out:s3://results/other/: refused: ")
    assert [event for event, _ in audited] == ["refused"]


def test_a_job_outside_the_watched_partitions_is_not_ours() -> None:
    found, audited = _admit("#HPCSTAGE --stage-in=s3://datasets/chem/x/\n", _info("debug"))
    assert (found.source, found.any, audited) == ("none", False, [])
