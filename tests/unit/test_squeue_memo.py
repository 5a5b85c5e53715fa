"""``squeue --json`` read one job record at a time, with the records of the last snapshot
remembered (parse.SqueueMemo): the same snapshot, and the same errors in the same order, as
reading the whole document at once (the reference below, the parser before the memo). And
``squeue --start`` with the lines of the last call remembered."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hpcstage.errors import SlurmError
from hpcstage.watch.slurm import parse
from hpcstage.watch.slurm.model import QueueSnapshot, StartEstimate
from hpcstage.watch.slurm.parse import SqueueMemo, parse_squeue_json, parse_squeue_start

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
SHAPES = {"22.05": "slurm-22.05", "24.11": "slurm-24.11-recorded"}


def golden(shape: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((GOLDEN / SHAPES[shape] / "squeue.json").read_text())
    return loaded


def reference(text: str) -> QueueSnapshot:
    """The whole document decoded, then every record read (the parser before the memo)."""
    doc = parse._load_json(text, "squeue --json")
    schema = parse.detect_schema(doc)
    jobs = tuple(parse._job_from_json(r) for r in parse._sequence(doc.get("jobs"), "jobs"))
    when = parse._Record(doc, "squeue").time("last_update")
    return QueueSnapshot(when or 0.0, schema.release, jobs, schema.has_planned_nodes)


def outcome(read: Any, text: str) -> QueueSnapshot | str:
    try:
        snapshot: QueueSnapshot = read(text)
    except SlurmError as exc:
        return f"SlurmError: {exc}"
    return snapshot


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_an_unchanged_record_is_not_read_again_and_a_changed_one_is(shape: str) -> None:
    doc = golden(shape)
    memo = SqueueMemo()
    first = parse_squeue_json(json.dumps(doc), memo=memo)
    doc["jobs"][0]["name"] = "renamed"
    second = parse_squeue_json(json.dumps(doc, indent=2), memo=memo)
    assert second == reference(json.dumps(doc))
    assert second.jobs[0].name == "renamed"
    # The others are the very JobInfo objects of the first snapshot: not read again.
    assert all(a is b for a, b in zip(first.jobs[1:], second.jobs[1:], strict=True))
    assert len(first.jobs) > 1


@pytest.mark.parametrize(
    "text",
    [
        "garbage",
        "",
        "[]",
        "{}",
        '{"jobs": []} x',
        '{"jobs": [1,]}',
        '{"jobs": [], "jobs": null, "meta": {"plugin": {"type": "openapi/v0.0.38"}}}',
        '{"jobs": null, "jobs": [], "meta": {"plugin": {"type": "openapi/v0.0.38"}}}',
        # A bad record is reported after Slurm's own errors and after an unknown schema.
        '{"jobs": [{"job_id": "x"}], "meta": {"plugin": {"type": "openapi/v0.0.38"}},'
        ' "errors": [{"error": "Unable to contact slurm controller"}]}',
        '{"jobs": [{"job_id": "x"}], "meta": {"plugin": {"type": "openapi/v9"}}}',
        '{"jobs": [{"job_id": 1, "job_state": "RUNNING"}, {"job_id": 2}, {"job_id": true}],'
        ' "meta": {"plugin": {"type": "openapi/v0.0.38"}}}',
        '\ufeff{"jobs": []}',
    ],
)
def test_odd_documents_give_what_the_whole_document_gave(text: str) -> None:
    assert outcome(parse_squeue_json, text) == outcome(reference, text)


def conflates(value: object) -> bool:
    """Whether ``value`` holds a number Python finds equal to a boolean (true == 1): the memo
    takes such a value for the remembered one (SqueueMemo), slurmctld never writes one for
    the other."""
    if isinstance(value, dict):
        return any(conflates(v) for v in value.values())
    if isinstance(value, list):
        return any(conflates(v) for v in value)
    return isinstance(value, bool | int | float) and value in (0, 1)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["set", "infinite", "number", "id", "x"]), children)
    ),
    max_leaves=8,
)


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=60)
@given(
    st.sampled_from(sorted(SHAPES)),
    st.integers(0, 3),
    st.dictionaries(st.sampled_from(parse._JOB_KEYS), json_values),
)
def test_a_changed_record_after_a_remembered_one_reads_as_a_fresh_parse(
    shape: str, which: int, fields: dict[str, Any]
) -> None:
    doc = golden(shape)
    memo = SqueueMemo()
    parse_squeue_json(json.dumps(doc), memo=memo)
    doc["jobs"][which % len(doc["jobs"])].update(fields)
    text = json.dumps(doc)
    assume(not conflates(fields))
    assert outcome(lambda t: parse_squeue_json(t, memo=memo), text) == outcome(reference, text)


def test_squeue_start_lines_seen_last_time_are_not_read_again() -> None:
    memo: dict[str, StartEstimate | None] = {}
    lines = ["4|2026-12-03T10:00:00|n[1-2]", "5|N/A|(null)", "12_[4-9]|N/A|(null)"]
    first = parse_squeue_start("\n".join(lines), tz=UTC, memo=memo)
    lines[1] = "5|2026-12-03T11:00:00|n3"
    second = parse_squeue_start("\n".join(lines) + "\n\n", tz=UTC, memo=memo)
    assert second == parse_squeue_start("\n".join(lines), tz=UTC)
    assert second[0] is first[0]  # the same object: the line was not read again
    assert second[1] == StartEstimate(5, datetime(2026, 12, 3, 11, tzinfo=UTC).timestamp(), ("n3",))
    assert set(memo) == set(lines)  # only the last call's lines are kept
    with pytest.raises(SlurmError, match="line 2: bad job id"):
        parse_squeue_start(lines[0] + "\nx|N/A|(null)", tz=UTC, memo=memo)
