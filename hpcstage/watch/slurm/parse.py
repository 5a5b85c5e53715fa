"""Pure parsers for Slurm command output: text in, frozen records out.

Two JSON schemas are understood, told apart by ``meta.plugin``:

- ``openapi/v0.0.36``-``v0.0.38`` (Slurm <= 22.05): ``job_state`` is a string, times are integers
  where 0 means unset, and there are no planned nodes (read them with ``squeue --start``).
- ``data_parser/v0.0.4x`` (23.11+, written against 24.11's v0.0.42): ``job_state`` is a list of
  the base state and its flags; numbers are ``{"set", "infinite", "number"}``; jobs carry
  ``scheduled_nodes``.

Anything else, and any malformed value, raises SlurmError with a short excerpt: callers never see
KeyError or TypeError from here.  Text times (``scontrol``, ``squeue --start``) are the
controller's local time in ISO form (SLURM_TIME_FORMAT=standard); pass ``tz`` when the daemon's
local time zone is not the cluster's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, tzinfo

from hpcstage.errors import SlurmError
from hpcstage.watch.slurm.hostlist import expand_hostlist
from hpcstage.watch.slurm.model import (
    BASE_STATES,
    FINISHED_STATES,
    STATE_FLAG_PRECEDENCE,
    JobInfo,
    NodeInfo,
    QueueSnapshot,
    StartEstimate,
)

_OPENAPI_PLUGIN = re.compile(r"openapi/v0\.0\.3[6-8]")
_DATA_PARSER_PLUGIN = re.compile(r"data_parser/v0\.0\.4\d(?:\+\S*)?")
# Slurm's 32-bit sentinels (NO_VAL, INFINITE) leak into integer fields of the old schema.
_SENTINELS = frozenset({0xFFFFFFFE, 0xFFFFFFFF})
_NULL_WORDS = frozenset({"", "(null)", "N/A", "None", "Unknown"})
_KEY = re.compile(r"(?:^|(?<=\s))([A-Z][A-Za-z0-9_]*(?:[:/][A-Za-z0-9_]+)*)=")
_USER = re.compile(r"(.*)\((\d+)\)")
_STATE_WORD = re.compile(r"[A-Z][A-Z_]*")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"


@dataclass(frozen=True)
class Schema:
    """The JSON dialect of one document: its plugin string and the Slurm release it came from."""

    plugin: str
    release: str

    @property
    def has_planned_nodes(self) -> bool:
        """Whether job records carry ``scheduled_nodes`` (22.05's openapi schema does not)."""
        return self.plugin.startswith("data_parser/")


# --- JSON documents -----------------------------------------------------------------------


def detect_schema(doc: Mapping[str, object]) -> Schema:
    """Tell the schema of a decoded ``--json`` document from ``meta``; SlurmError if unknown."""
    meta = _mapping(doc.get("meta"), "meta")
    plugin = _mapping(meta.get("plugin"), "meta.plugin")
    parser, kind = plugin.get("data_parser"), plugin.get("type")
    if isinstance(parser, str) and _DATA_PARSER_PLUGIN.fullmatch(parser):
        return Schema(parser, _release(meta.get("slurm")))
    if isinstance(kind, str) and _OPENAPI_PLUGIN.fullmatch(kind):
        return Schema(kind, _release(meta.get("Slurm")))
    raise SlurmError(f"unsupported Slurm JSON schema: meta.plugin={_excerpt(plugin)}")


@dataclass
class SqueueMemo:
    """The job records of the last ``squeue --json`` parsed, per job id: the values of the keys a
    JobInfo is made of, and that JobInfo. A queue of thousands of jobs changes in few of them
    between two snapshots; a record whose values equal the remembered ones gives the remembered
    JobInfo without being read again. Equal as Python values: a number written where a
    boolean was (1 for true) would be taken for it, but slurmctld writes each key with one
    JSON type."""

    jobs: dict[int, tuple[tuple[object, ...], JobInfo]] = field(default_factory=dict)


# Every key of a job record that _job_from_json reads (its JobInfo is made of these alone).
_JOB_KEYS = (
    "job_id",
    "array_job_id",
    "array_task_id",
    "name",
    "user_name",
    "user_id",
    "account",
    "partition",
    "job_state",
    "state_reason",
    "priority",
    "submit_time",
    "start_time",
    "end_time",
    "nodes",
    "scheduled_nodes",
    "batch_host",
    "admin_comment",
    "comment",
    "current_working_directory",
    "exit_code",
    "restart_cnt",
    "het_job_id",
    "het_job_offset",
)


def parse_squeue_json(
    text: str, *, taken_at: float | None = None, memo: SqueueMemo | None = None
) -> QueueSnapshot:
    """Parse ``squeue --json`` (22.05 or 24.11) into a snapshot.

    ``taken_at`` is the wall time the command ran; without it the document's ``last_update``
    (24.11) or 0.0 is used. ``memo`` (kept by the caller across snapshots) skips reading
    records that did not change. The job records are decoded one at a time, so a large queue
    never exists as a whole tree of JSON objects (24.11 writes ~70 of them per job).
    """
    memo = memo if memo is not None else SqueueMemo()
    walked: _Walked | None
    whole: object
    try:
        whole, walked = _walk_squeue(text, memo)
    except (ValueError, RecursionError):  # not well-formed: the whole document's error
        whole, walked = _load_json(text, "squeue --json"), None
    doc = _checked(whole, "squeue --json", text)
    schema = detect_schema(doc)
    if walked is None:
        records = _sequence(doc.get("jobs"), "jobs")
        jobs = tuple(_job_from_json(record) for record in records)
    else:
        found, error, remembered = walked
        if error is not None:
            raise error
        jobs = tuple(found)
        memo.jobs = remembered
    when = taken_at if taken_at is not None else _Record(doc, "squeue").time("last_update")
    return QueueSnapshot(when or 0.0, schema.release, jobs, schema.has_planned_nodes)


_Walked = tuple[list[JobInfo], SlurmError | None, dict[int, tuple[tuple[object, ...], JobInfo]]]
_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def _walk_squeue(text: str, memo: SqueueMemo) -> tuple[dict[str, object], _Walked | None]:
    """The document's top-level object but ``jobs``, and its job records read one at a time
    (None when ``jobs`` is not a list); ValueError where it is not well-formed JSON. The first
    bad record's SlurmError is returned, not raised: the document's own errors come first."""
    doc: dict[str, object] = {}
    walked: _Walked | None = None
    pos = _expect(text, 0, "{")
    if text.startswith("}", pos):
        if _skip(text, pos + 1) != len(text):
            raise ValueError("extra data after the document")
        return doc, None
    while True:
        key, pos = _DECODER.raw_decode(text, pos)
        if not isinstance(key, str):
            raise ValueError("a key is not a string")
        pos = _expect(text, pos, ":")
        if key == "jobs" and text.startswith("[", pos):
            walked, pos = _walk_jobs(text, pos, memo)
            doc.pop("jobs", None)
        else:
            doc[key], pos = _DECODER.raw_decode(text, pos)
            walked = None if key == "jobs" else walked
        pos = _skip(text, pos)
        if text.startswith(",", pos):
            pos = _skip(text, pos + 1)
            continue
        pos = _expect(text, pos, "}")
        break
    if pos != len(text):
        raise ValueError("extra data after the document")
    return doc, walked


def _walk_jobs(text: str, pos: int, memo: SqueueMemo) -> tuple[_Walked, int]:
    """The records of the ``jobs`` array starting at ``pos``, and the index after it."""
    found: list[JobInfo] = []
    error: SlurmError | None = None
    remembered: dict[int, tuple[tuple[object, ...], JobInfo]] = {}
    pos = _expect(text, pos, "[")
    if text.startswith("]", pos):
        return (found, error, remembered), _skip(text, pos + 1)
    while True:
        record, pos = _DECODER.raw_decode(text, pos)
        if error is None:
            try:
                found.append(_remembered_job(record, memo, remembered))
            except SlurmError as exc:
                error = exc
        pos = _skip(text, pos)
        if text.startswith(",", pos):
            pos = _skip(text, pos + 1)
            continue
        return (found, error, remembered), _expect(text, pos, "]")


def _remembered_job(
    record: object, memo: SqueueMemo, remembered: dict[int, tuple[tuple[object, ...], JobInfo]]
) -> JobInfo:
    if not isinstance(record, dict) or type(record.get("job_id")) is not int:
        return _job_from_json(record)
    job_id = record["job_id"]
    values = tuple(map(record.get, _JOB_KEYS))
    last = memo.jobs.get(job_id)
    info = last[1] if last is not None and last[0] == values else _job_from_json(record)
    remembered[job_id] = (values, info)
    return info


def _skip(text: str, pos: int) -> int:
    """The index of the first character at or after ``pos`` that is not JSON whitespace."""
    match = _WS.match(text, pos)
    return match.end() if match else pos


def _expect(text: str, pos: int, char: str) -> int:
    """The index after ``char`` (whitespace around it skipped); ValueError if it is not next."""
    pos = _skip(text, pos)
    if not text.startswith(char, pos):
        raise ValueError(f"expected {char!r} at {pos}")
    return _skip(text, pos + 1)


def parse_nodes_json(text: str) -> tuple[NodeInfo, ...]:
    """Parse a ``{"nodes": [...]}`` document: 22.05 ``sinfo --json`` or ``scontrol --json show
    nodes`` (23.02+)."""
    doc = _load_json(text, "node JSON")
    detect_schema(doc)
    return tuple(_node_from_json(item) for item in _sequence(doc.get("nodes"), "nodes"))


def _job_from_json(item: object) -> JobInfo:
    record = _Record(_mapping(item, "job record"), "job record")
    job_id = record.required_int("job_id")
    record = _Record(record.data, f"job {job_id}")
    state, flags = normalize_job_state(record.data.get("job_state"), record.where)
    het_job_id, het_offset = _het_json(record)
    return JobInfo(
        job_id=job_id,
        array_job_id=record.integer("array_job_id") or None,  # 0 means "not an array job"
        array_task_id=record.integer("array_task_id"),
        name=record.text("name"),
        user=record.text("user_name"),
        uid=record.integer("user_id"),
        account=record.text("account"),
        partition=record.text("partition"),
        state=state,
        state_reason=record.text("state_reason"),
        priority=record.integer("priority") or 0,
        submit_time=record.time("submit_time"),
        start_time=record.time("start_time"),
        end_time=record.time("end_time"),
        nodes=record.hosts("nodes"),
        planned_nodes=record.hosts("scheduled_nodes"),
        batch_host=record.text("batch_host"),
        admin_comment=record.text("admin_comment"),
        comment=record.text("comment"),
        work_dir=record.text("current_working_directory"),
        exit_code=_json_exit_code(record, state),
        state_flags=flags,
        restarts=record.integer("restart_cnt") or 0,
        array_tasks=record.text("array_task_string").strip("[]"),
        het_job_id=het_job_id,
        het_job_offset=het_offset,
    )


def _het_json(record: _Record) -> tuple[int | None, int | None]:
    """A het job component's leader id and offset; (None, None) for a job that is not one
    (both write 0 then: 22.05 as a number, 24.11 as a set number)."""
    leader = record.integer("het_job_id") or None
    return (leader, record.integer("het_job_offset") or 0) if leader else (None, None)


def _json_exit_code(record: _Record, state: str) -> int | None:
    if state not in FINISHED_STATES:
        return None
    value = record.data.get("exit_code")
    if not isinstance(value, Mapping):  # 22.05: a raw wait(2) status
        return _wait_status(record.integer("exit_code"))
    verbose = _Record(value, f"{record.where} exit_code")
    signal = verbose.data.get("signal")
    signal_id = (
        _Record(signal, verbose.where).integer("id") if isinstance(signal, Mapping) else None
    )
    return 128 + signal_id if signal_id else verbose.integer("return_code")


def _wait_status(status: int | None) -> int | None:
    if status is None:
        return None
    return 128 + (status & 0x7F) if status & 0x7F else (status >> 8) & 0xFF


def _node_from_json(item: object) -> NodeInfo:
    record = _Record(_mapping(item, "node record"), "node record")
    name = record.required_text("name")
    record = _Record(record.data, f"node {name}")
    state = record.data.get("state")
    # 22.05: "state": "idle", "state_flags": ["DRAIN"]; 24.11: "state": ["IDLE", "DRAIN"].
    words = [
        *([state] if isinstance(state, str) else _sequence(state, f"{record.where} state")),
        *_sequence(record.data.get("state_flags", []), f"{record.where} state_flags"),
    ]
    if not words or not all(isinstance(word, str) and word for word in words):
        raise SlurmError(f"{record.where}: bad state {_excerpt(state)}")
    return NodeInfo(
        name=name,
        addr=record.text("address") or name,
        hostname=record.text("hostname") or name,
        state="+".join(str(word).upper() for word in words),
        cpus=record.integer("cpus") or 0,
    )


def normalize_job_state(value: object, where: str = "job") -> tuple[str, tuple[str, ...]]:
    """Reduce a ``job_state`` (22.05 string or 24.11 list) to (state as squeue shows it, flags).

    >>> normalize_job_state(["COMPLETED", "COMPLETING"])
    ('COMPLETING', ('COMPLETING',))
    """
    words = [value] if isinstance(value, str) else value
    if not isinstance(words, list) or not words:
        raise SlurmError(f"{where}: bad job_state {_excerpt(value)}")
    names = [word.upper() for word in words if isinstance(word, str)]
    if len(names) != len(words) or not all(_STATE_WORD.fullmatch(name) for name in names):
        raise SlurmError(f"{where}: bad job_state {_excerpt(value)}")
    flags = tuple(name for name in names if name not in BASE_STATES)
    shown = next((flag for flag in STATE_FLAG_PRECEDENCE if flag in flags), None)
    base = next((name for name in names if name in BASE_STATES), None)
    # An unknown word alone is kept as is: a newer Slurm may add states.
    return shown or base or names[0], flags


# --- squeue --start -----------------------------------------------------------------------


def parse_squeue_start(
    text: str, *, tz: tzinfo | None = None, memo: dict[str, StartEstimate | None] | None = None
) -> tuple[StartEstimate, ...]:
    """Parse ``squeue --start -h -o "%A|%S|%Y"``: job id, expected start, SchedNodeList.

    ``%i`` output is accepted too; its array forms (``12_3``, ``12_[4-9]``) do not name a job
    record and are skipped.  ``N/A`` start and ``(null)`` nodes mean "not planned yet".
    ``memo`` (kept by the caller across calls, with the same ``tz``) maps the lines of the last
    call to what they gave: a line seen then is not read again.
    """
    last = memo.copy() if memo is not None else {}
    if memo is not None:
        memo.clear()
    estimates = []
    for number, line in enumerate(text.splitlines(), 1):
        if line in last:
            found = last[line]
        elif not line.strip():
            continue
        else:
            found = _start_line(number, line, tz)
        if memo is not None:
            memo[line] = found
        if found is not None:
            estimates.append(found)
    return tuple(estimates)


def _start_line(number: int, line: str, tz: tzinfo | None) -> StartEstimate | None:
    fields = [field.strip() for field in line.split("|")]
    where = f"squeue --start line {number}"
    if len(fields) != 3:
        raise SlurmError(f"{where}: expected ID|START|NODES, got {_excerpt(line)}")
    if re.fullmatch(r"[0-9]+_(?:[0-9]+|\[.*\])", fields[0]):
        return None
    if not re.fullmatch(r"[0-9]+", fields[0]):
        raise SlurmError(f"{where}: bad job id {_excerpt(fields[0])}")
    start = _clock(fields[1], tz, where)
    return StartEstimate(int(fields[0]), start, _hosts(fields[2], where))


def merge_planned(snapshot: QueueSnapshot, starts: tuple[StartEstimate, ...]) -> QueueSnapshot:
    """Fill planned nodes and expected starts from ``squeue --start`` into a snapshot."""
    by_id = {estimate.job_id: estimate for estimate in starts}
    jobs = tuple(_with_estimate(job, by_id.get(job.job_id)) for job in snapshot.jobs)
    return replace(snapshot, jobs=jobs, planned_nodes_known=True)


def _with_estimate(job: JobInfo, estimate: StartEstimate | None) -> JobInfo:
    if estimate is None:
        return job
    start = estimate.start_time if estimate.start_time is not None else job.start_time
    return replace(job, planned_nodes=estimate.planned_nodes, start_time=start)


# --- scontrol show job / node -o ----------------------------------------------------------


def parse_scontrol_show_job(text: str, *, tz: tzinfo | None = None) -> tuple[JobInfo, ...]:
    """Parse ``scontrol show job -o`` (one job per line; multi-line output works too).

    Values may contain spaces (``Command=/a b``); a value is cut only where a space is followed
    by ``Key=`` with an upper-case key, so free text containing `` Word=`` is split there.
    """
    if text.strip() == "No jobs in the system":
        return ()
    return tuple(_job_from_fields(fields, tz) for fields in _scontrol_records(text))


def parse_scontrol_show_node(text: str) -> tuple[NodeInfo, ...]:
    """Parse ``scontrol show node -o`` into nodes with their NodeAddr."""
    if text.strip() == "No nodes in the system":
        return ()
    return tuple(_node_from_fields(fields) for fields in _scontrol_records(text))


def _job_from_fields(fields: dict[str, str], tz: tzinfo | None) -> JobInfo:
    job_id = _text_int(fields.get("JobId"), "scontrol job record JobId")
    where = f"job {job_id}"
    state, flags = normalize_job_state(fields.get("JobState"), where)
    user, uid = _user(fields.get("UserId", ""))
    return JobInfo(
        job_id=job_id,
        array_job_id=_optional_int(fields.get("ArrayJobId")),
        array_task_id=_optional_int(fields.get("ArrayTaskId")),  # None for "[4-9]" remainders
        name=_value(fields, "JobName"),
        user=user,
        uid=uid,
        account=_value(fields, "Account"),
        partition=_value(fields, "Partition"),
        state=state,
        state_reason=_value(fields, "Reason"),
        priority=_optional_int(fields.get("Priority")) or 0,
        submit_time=_clock(fields.get("SubmitTime", ""), tz, where),
        start_time=_clock(fields.get("StartTime", ""), tz, where),
        end_time=_clock(fields.get("EndTime", ""), tz, where),
        nodes=_hosts(_value(fields, "NodeList"), where),
        planned_nodes=_hosts(_value(fields, "SchedNodeList"), where),
        batch_host=_value(fields, "BatchHost"),
        admin_comment=_value(fields, "AdminComment"),
        comment=_value(fields, "Comment"),
        work_dir=_value(fields, "WorkDir"),
        exit_code=_text_exit_code(fields.get("ExitCode", ""), state, where),
        state_flags=flags,
        restarts=_optional_int(fields.get("Restarts")) or 0,
        array_tasks=_array_tasks(fields.get("ArrayTaskId")),
        het_job_id=_optional_int(fields.get("HetJobId")),
        het_job_offset=_optional_int(fields.get("HetJobOffset")),
    )


def _array_tasks(text: str | None) -> str:
    """The tasks an array's record still holds (``4-9``), or "" for one task or no array."""
    return "" if text is None or _optional_int(text) is not None else text.strip("[]")


def _node_from_fields(fields: dict[str, str]) -> NodeInfo:
    name = _value(fields, "NodeName")
    if not name:
        raise SlurmError(f"scontrol node record without NodeName: {_excerpt(fields)}")
    state = _value(fields, "State")
    if not state:
        raise SlurmError(f"node {name}: no State")
    return NodeInfo(
        name=name,
        addr=_value(fields, "NodeAddr") or name,
        hostname=_value(fields, "NodeHostName") or name,
        state=state.upper(),
        cpus=_optional_int(fields.get("CPUTot")) or 0,
    )


def _text_exit_code(text: str, state: str, where: str) -> int | None:
    match = re.fullmatch(r"([0-9]+):([0-9]+)", text)
    if text and match is None:
        raise SlurmError(f"{where}: bad ExitCode {_excerpt(text)}")
    if match is None or state not in FINISHED_STATES:
        return None
    code, signal = int(match.group(1)), int(match.group(2))
    return 128 + signal if signal else code


def _scontrol_records(text: str) -> Iterator[dict[str, str]]:
    """Group lines into records (indented lines continue one) and split each into fields."""
    record: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line[:1].isspace() and line.strip() and record:
            record.append(line.strip())
            continue
        if record:
            yield _key_values(" ".join(record))
        record = [line.strip()] if line.strip() else []


def _key_values(line: str) -> dict[str, str]:
    keys = list(_KEY.finditer(line))
    if not keys or keys[0].start() != 0:
        raise SlurmError(f"not a scontrol key=value record: {_excerpt(line)}")
    fields: dict[str, str] = {}
    for match, following in zip(keys, [*keys[1:], None], strict=True):
        end = following.start() if following else len(line)
        fields.setdefault(match.group(1), line[match.end() : end].rstrip())
    return fields


def _user(text: str) -> tuple[str, int | None]:
    """``alice(1001)`` -> ("alice", 1001)."""
    match = _USER.fullmatch(text)
    return (match.group(1), int(match.group(2))) if match else (text, None)


def _value(fields: Mapping[str, str], key: str) -> str:
    value = fields.get(key, "")
    return "" if value == "(null)" else value


# --- version ------------------------------------------------------------------------------


def parse_version_output(text: str) -> str:
    """``slurm 24.11.1`` or Debian's ``slurm-wlm 22.05.8`` -> the release string."""
    match = re.search(r"(?<![\w.])([0-9]+\.[0-9]+\.[0-9]+\S*)", text)
    if match is None:
        raise SlurmError(f"no Slurm version in {_excerpt(text)}")
    return match.group(1)


def release_tuple(release: str) -> tuple[int, int]:
    """``"24.11.1"`` -> (24, 11), for feature checks by Slurm major release."""
    match = re.match(r"([0-9]+)\.([0-9]+)", release)
    if match is None:
        raise SlurmError(f"not a Slurm release: {_excerpt(release)}")
    return int(match.group(1)), int(match.group(2))


# --- helpers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Record:
    """Typed, checked access to one JSON object; errors name ``where`` and the key."""

    data: Mapping[str, object]
    where: str

    def text(self, key: str) -> str:
        value = self.data.get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise SlurmError(f"{self.where}: {key} is not a string: {_excerpt(value)}")
        return value

    def required_text(self, key: str) -> str:
        value = self.text(key)
        if not value:
            raise SlurmError(f"{self.where}: missing {key}")
        return value

    def integer(self, key: str) -> int | None:
        """An integer, a {set, infinite, number} struct, or null; None when unset/infinite."""
        value = self.data.get(key)
        if isinstance(value, Mapping):
            if value.get("infinite") is True or value.get("set") is False:
                return None
            value = value.get("number")
        if value is None or value == "Infinity":
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise SlurmError(f"{self.where}: {key} is not an integer: {_excerpt(value)}")
        return value

    def required_int(self, key: str) -> int:
        value = self.integer(key)
        if value is None:
            raise SlurmError(f"{self.where}: missing {key}")
        return value

    def time(self, key: str) -> float | None:
        """Unix time; None for 0 (unset) and for Slurm's NO_VAL/INFINITE sentinels."""
        value = self.integer(key)
        return None if not value or value in _SENTINELS else float(value)

    def hosts(self, key: str) -> tuple[str, ...]:
        return _hosts(self.text(key), self.where)


def _load_json(text: str, what: str) -> Mapping[str, object]:
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise SlurmError(f"{what}: output is not JSON: {_excerpt(text)}") from err
    return _checked(doc, what, text)


def _checked(doc: object, what: str, text: str) -> Mapping[str, object]:
    """``doc`` if it is an object without Slurm's errors."""
    if not isinstance(doc, dict):
        raise SlurmError(f"{what}: expected a JSON object, got {_excerpt(text)}")
    errors = doc.get("errors")
    if isinstance(errors, list) and errors:
        raise SlurmError(f"{what}: Slurm reported {_excerpt(errors[0])}")
    return doc


def _release(value: object) -> str:
    if not isinstance(value, Mapping):
        return ""
    release = value.get("release")
    return release if isinstance(release, str) else ""


def _mapping(value: object, what: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise SlurmError(f"{what}: expected an object, got {_excerpt(value)}")
    return value


def _sequence(value: object, what: str) -> list[object]:
    if not isinstance(value, list):
        raise SlurmError(f"{what}: expected a list, got {_excerpt(value)}")
    return value


def _hosts(text: str, where: str) -> tuple[str, ...]:
    if text in ("", "(null)", "N/A"):
        return ()
    try:
        return expand_hostlist(text)
    except SlurmError as err:
        raise SlurmError(f"{where}: {err}") from err


def _clock(text: str, tz: tzinfo | None, where: str) -> float | None:
    """Slurm's ISO local time -> unix seconds; None for Unknown/N/A/None."""
    if text in _NULL_WORDS:
        return None
    try:
        moment = datetime.strptime(text, _TIME_FORMAT)
    except ValueError as err:
        raise SlurmError(f"{where}: bad time {_excerpt(text)}") from err
    # A naive datetime's timestamp() reads it as the local time zone.
    return (moment.replace(tzinfo=tz) if tz else moment).timestamp()


def _text_int(text: str | None, what: str) -> int:
    value = _optional_int(text)
    if value is None:
        raise SlurmError(f"{what}: expected an integer, got {_excerpt(text)}")
    return value


def _optional_int(text: str | None) -> int | None:
    return int(text) if text is not None and re.fullmatch(r"[0-9]+", text) else None


def _excerpt(value: object, limit: int = 120) -> str:
    """A short quotable rendering of ``value`` for error messages."""
    text = value if isinstance(value, str) else repr(value)
    text = text if len(text) <= limit else text[:limit] + "..."
    return repr(text) if isinstance(value, str) else text
