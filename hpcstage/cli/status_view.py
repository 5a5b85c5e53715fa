"""What ``hpcstage status`` prints: pure text from the API's job documents, in squeue's idiom.

A listing is one line per job whose columns a format string chooses, as ``squeue -o`` does:
``%[.][SIZE]FIELD`` with FIELD one of squeue's letters below or one of hpcstage's own in braces
(``%{staging}``). A SIZE pads the value to that width and cuts a longer one (``.``: right
justified); no SIZE prints it whole. Other text is printed as written. ``--parsable`` joins the
values alone with ``|`` (a ``|`` inside one is written ``\\x7c``). One job's document, or a
listing's ``-v`` lines, show each node.

Everything a job chose (its name, its files, errors about them) is escaped before it is printed:
an admin reads these lines on a terminal, where an escape sequence would act and a newline could
forge a line.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from hpcstage.core.units import format_size
from hpcstage.errors import SlurmError
from hpcstage.watch.slurm.hostlist import compress_hostlist

Doc = Mapping[str, Any]

# squeue's default shape, with hpcstage's staging columns in place of time and node count:
# a 3-node job and each task of an array fit in 80 columns, node lists get the rest.
DEFAULT_FORMAT = "%.16i %.10j %.8u %.8a %.11T %.11{staging} %.9{stage_out} %R"

# squeue -t: each state's compact code (%t). GONE, WARMUP, PINNED and UNPINNED are hpcstage's: a
# job that left the queue unseen, a warmup the daemon runs, a dataset kept warm (hpcstage pin).
STATE_CODES = {
    "PENDING": "PD", "RUNNING": "R", "SUSPENDED": "S", "COMPLETING": "CG", "COMPLETED": "CD",
    "CONFIGURING": "CF", "CANCELLED": "CA", "FAILED": "F", "TIMEOUT": "TO", "PREEMPTED": "PR",
    "NODE_FAIL": "NF", "BOOT_FAIL": "BF", "DEADLINE": "DL", "OUT_OF_MEMORY": "OOM",
    "REQUEUED": "RQ", "REQUEUE_HOLD": "RH", "REQUEUE_FED": "RF", "SPECIAL_EXIT": "SE",
    "STOPPED": "ST", "REVOKED": "RV", "STAGE_OUT": "SO", "RESIZING": "RS", "SIGNALING": "SI",
    "RESV_DEL_HOLD": "RD", "GONE": "GONE", "WARMUP": "WARMUP", "PINNED": "PINNED",
    "UNPINNED": "UNPINNED",
}  # fmt: skip
_BY_CODE = {code: state for state, code in STATE_CODES.items()}


# --------------------------------------------------------------------------- filters


def parse_states(text: str) -> list[str]:
    """``-t``: comma-separated states as squeue takes them (PD, running, ...); [] for "all"."""
    states = []
    for word in (w.strip().upper() for w in text.split(",")):
        if word == "ALL":
            return []
        state = _BY_CODE.get(word, word)
        if state not in STATE_CODES:
            raise ValueError(f"unknown job state {word!r}; known: {', '.join(STATE_CODES)}, all")
        states.append(state)
    return states


def parse_users(text: str) -> list[str]:
    """``-u``: comma-separated user names."""
    users = [u.strip() for u in text.split(",") if u.strip()]
    if not users or any(len(u) > 64 or not u.isprintable() for u in users):
        raise ValueError(f"expected USER[,USER...], got {text!r}")
    return users


def parse_job_id(text: str) -> list[int]:
    """JOBID as squeue takes it: ``[A]`` for a job, ``[A, a]`` for task a of array A (A_a)."""
    match = re.fullmatch(r"([0-9]{1,18})(?:_([0-9]{1,9}))?", text.strip())
    if match is None:
        raise ValueError(f"expected a job id (1234) or an array task (1234_5), got {text!r}")
    return [int(g) for g in match.groups() if g is not None]


def array_task(jobs: Iterable[Doc], array: int, task: int) -> int | None:
    """The job id of task ``task`` of array ``array``, if it is among ``jobs``."""
    for job in jobs:
        if job.get("array_job_id") == array and job.get("array_task_id") == task:
            return int(job["job_id"])
    return None


def jobs_query(show_all: bool, users: Iterable[str], states: Iterable[str]) -> str:
    """The API path of a listing: the daemon filters, so only the jobs shown cross the wire."""
    params = [("all", "true" if show_all else "false")]
    params += [("user", u) for u in users] + [("state", s) for s in states]
    return "/api/v1/jobs?" + urllib.parse.urlencode(params)


def kept(jobs: list[Doc], users: Iterable[str], states: Iterable[str]) -> list[Doc]:
    """The jobs a listing asked for, again: a daemon older than ``jobs_query``'s filters
    ignores them and answers every job."""
    users, states = set(users), set(states)
    return [
        job
        for job in jobs
        if (not users or job["user"] in users) and (not states or job["state"] in states)
    ]


# --------------------------------------------------------------------------- fields


def job_ident(job: Doc) -> str:
    """squeue's %i: ``A_a`` for an array task, ``A_[4-19]`` for its tasks not started yet."""
    if job["kind"] != "job":
        return f"{job['kind']}-{job['id']}"
    array, task = job.get("array_job_id"), job.get("array_task_id")
    if array is None:
        return str(job["job_id"])
    if task is not None:
        return f"{array}_{task}"
    return f"{array}_[{job.get('array_tasks') or '?'}]"


def target_nodes(job: Doc) -> list[str]:
    """Where the job runs, or else where the scheduler plans it (what staging aims at)."""
    return list(job["nodes"] or job["planned_nodes"])


def node_list(job: Doc) -> str:
    """squeue's %N: the target nodes as a compressed hostlist (``n[1-3]``)."""
    nodes = target_nodes(job)
    try:
        return compress_hostlist(nodes) or "-"
    except SlurmError:  # a name a hostlist cannot hold: shown as it is
        return ",".join(nodes)


def staging_summary(job: Doc) -> str:
    """``READY 2/3``: the target nodes with every input there, of all target nodes."""
    staging: Mapping[str, str] = job["staging"]
    if not staging:
        return "-"
    nodes = target_nodes(job) or sorted(staging)
    states = [staging.get(node, "staging") for node in nodes]
    if all(s == "released" for s in states):
        return "RELEASED"
    if "failed" in states:
        return f"FAILED {states.count('failed')}/{len(nodes)}"
    return f"READY {sum(s in ('ready', 'released') for s in states)}/{len(nodes)}"


def _reason_list(job: Doc) -> str:
    failure = f" (FAILED: {job['failure']})" if job["failure"] else ""
    return node_list(job) + failure


def _array_task(job: Doc) -> str:
    if job.get("array_task_id") is not None:
        return str(job["array_task_id"])
    return job.get("array_tasks") or "N/A"


def _stage_out(summary: str) -> str:
    return "-" if summary == "none" else summary


@dataclass(frozen=True)
class Field:
    """One column a format may name: its header and how a job's value is written."""

    header: str
    value: Callable[[Doc], str]


FIELDS: dict[str, Field] = {
    "i": Field("JOBID", job_ident),
    "A": Field("JOBID", lambda j: str(j["job_id"]) if j["kind"] == "job" else job_ident(j)),
    "F": Field("ARRAY_JOB_ID", lambda j: str(j.get("array_job_id") or FIELDS["A"].value(j))),
    "K": Field("ARRAY_TASK_ID", _array_task),
    "j": Field("NAME", lambda j: j["name"]),
    "u": Field("USER", lambda j: j["user"]),
    "a": Field("ACCOUNT", lambda j: j["account"] or "-"),
    "P": Field("PARTITION", lambda j: j.get("partition") or "-"),
    "T": Field("STATE", lambda j: j["state"]),
    "t": Field("ST", lambda j: str(STATE_CODES.get(j["state"], j["state"]))),
    "r": Field("REASON", lambda j: j["reason"] or "None"),
    "D": Field("NODES", lambda j: str(len(target_nodes(j)))),
    "N": Field("NODELIST", node_list),
    "R": Field("NODELIST(REASON)", _reason_list),
    "{staging}": Field("STAGING", staging_summary),
    "{stage_out}": Field("STAGE-OUT", lambda j: _stage_out(j["stage_out"])),
}

_SPEC = re.compile(r"%(?:(%)|(\.)?(\d*)([A-Za-z]|\{[a-z_]+\})|(.?))", re.DOTALL)


# --------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class Column:
    """One ``%[.][SIZE]FIELD`` of a format: the field, its width (None: as wide as its value)."""

    field: Field
    width: int | None
    right: bool

    def fit(self, text: str) -> str:
        if self.width is None:
            return text
        text = text[: self.width]
        return text.rjust(self.width) if self.right else text.ljust(self.width)


Piece = Column | str  # a column, or literal text between columns


def parse_format(spec: str) -> list[Piece]:
    """Read a squeue-style format; ValueError naming the fault (an unknown field, a lone %)."""
    pieces: list[Piece] = []
    position = 0
    for match in _SPEC.finditer(spec):
        pieces.append(spec[position : match.start()])
        position = match.end()
        percent, dot, size, name, bad = match.groups()
        if percent:
            pieces.append("%")
        elif name is None or name not in FIELDS:
            wrong = f"%{name or bad}" if name or bad else "a lone % at the end"
            raise ValueError(f"unknown field {wrong!r} in format; known: {_known()}")
        else:
            if dot and not size:
                raise ValueError(f"'%.' needs a size, as in %.8{name} (in {spec!r})")
            width = min(int(size), 1000) if size else None
            pieces.append(Column(FIELDS[name], width, bool(dot)))
    pieces.append(spec[position:])
    pieces = [p for p in pieces if p != ""]
    if not any(isinstance(p, Column) for p in pieces):
        raise ValueError(f"format {spec!r} names no field; known: {_known()}")
    return pieces


def _known() -> str:
    return " ".join(f"%{name}" for name in FIELDS)


def jobs_table(
    jobs: list[Doc],
    spec: str = DEFAULT_FORMAT,
    *,
    header: bool = True,
    parsable: bool = False,
    verbose: bool = False,
) -> str:
    """The listing: a header (unless ``header`` is False) and one line per job, with each
    node's readiness under it when ``verbose``; ``parsable``: values joined by ``|``."""
    pieces = parse_format(spec)
    if not jobs:  # a person is told; a script (-h, --parsable) reads no line, as from squeue
        return "no jobs with staging directives" if header and not parsable else ""
    jobs = [printable(job) for job in jobs]
    lines = []
    if header:
        lines.append(_line(pieces, {c: c.field.header for c in _columns(pieces)}, parsable))
    for job in jobs:
        lines.append(_line(pieces, {c: c.field.value(job) for c in _columns(pieces)}, parsable))
        if verbose:
            lines.extend(node_lines(job))
    return "\n".join(lines)


def _columns(pieces: list[Piece]) -> list[Column]:
    return [p for p in pieces if isinstance(p, Column)]


def _line(pieces: list[Piece], values: Mapping[Column, str], parsable: bool) -> str:
    if parsable:
        return "|".join(values[c].replace("|", "\\x7c") for c in _columns(pieces))
    return "".join(p.fit(values[p]) if isinstance(p, Column) else p for p in pieces).rstrip()


def node_lines(job: Doc) -> list[str]:
    """``-v``: each node the job is staged on or aimed at, its readiness and since when."""
    staging: Mapping[str, str] = job["staging"]
    targets = target_nodes(job)
    lines = []
    for node in targets + sorted(set(staging) - set(targets)):
        state = staging.get(node, "waiting")
        when = job.get("ready_at", {}).get(node)
        since = f" since {time.strftime('%H:%M:%S', time.localtime(when))}" if when else ""
        aside = "" if node in targets else "  (no longer a target)"
        lines.append(f"    node {node:<16} {state}{since}{aside}")
    return lines


# --------------------------------------------------------------------------- one job


def printable(value: Any) -> Any:
    """The API's answer with every non-printable character of its text escaped (``\\x1b``,
    ``\\n``): a job names itself and its files, and an admin reads ``hpcstage status`` on a
    terminal, which acts on escape sequences, and where a name must not forge a line."""
    if isinstance(value, str):
        return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in value)
    if isinstance(value, list):
        return [printable(item) for item in value]
    if isinstance(value, dict):
        return {key: printable(item) for key, item in value.items()}
    return value


def job_text(doc: Doc) -> str:
    """One job in full: Slurm state, each input per node with progress and errors, events."""
    doc = printable(doc)
    nodes = ", ".join(f"{n} {s}" for n, s in sorted(doc["staging"].items())) or "-"
    out = [
        f"job {job_ident(doc)} ({doc['name']}) user {doc['user']}"
        f" account {doc['account'] or '-'}: {doc['state']} {doc['reason'] or ''}".rstrip(),
        f"  planned nodes: {_hosts(doc['planned_nodes'])}   nodes: {_hosts(doc['nodes'])}"
        f"   directives from: {doc['directive_source']}",
        f"  staging: {staging_summary(doc)} ({nodes})",
    ]
    if doc["error"]:
        out.append(f"  REFUSED: {doc['error']}")
    for req in doc["requests"]:
        out.extend(_request_lines(req))
    if doc.get("stage_out", "none") != "none":
        out.append(f"  stage-out: {doc['stage_out']}")
    if doc.get("events"):
        out.append("  events:")
        for e in doc["events"]:
            when = time.strftime("%H:%M:%S", time.localtime(e["ts"]))
            out.append(f"    {when} {e['node'] or '-':<6} {e['level']:<7} {e['message']}")
    return "\n".join(out)


def _hosts(nodes: list[str]) -> str:
    try:
        return compress_hostlist(nodes) or "-"
    except SlurmError:
        return ",".join(nodes)


def _request_lines(req: Doc) -> list[str]:
    line = f"line {req['line']}: " if req["line"] else ""
    if req["direction"] == "dir":
        head = "  job directory"
    elif req["direction"] == "in":
        head = f"  stage-in {req['src']} -> $HPCSTAGE_DIR/{req['dest']}   ({line}{req['text']})"
    else:
        head = f"  stage-out $HPCSTAGE_DIR/{req['src']} -> {req['dest']}   ({line}{req['text']})"
    lines = [head]
    for node, st in sorted(req["nodes"].items()):
        error = f"  ERROR: {st['error']}" if st["error"] else ""
        lines.append(f"    {node:<8} {st['state']:<9} {_counts(st)}{error}")
        lines.extend(_file_lines(st.get("files", [])))
    return lines


def _file_lines(files: list[Doc], limit: int = 20) -> list[str]:
    """Stage-out files worth a line: skipped, failed, or an old object sent to the trash."""
    notable = [f for f in files if f["state"] in ("skipped", "failed") or f["trash_key"]]
    lines = []
    for f in notable[:limit]:
        if f["trash_key"]:
            lines.append(
                f"      {f['path']}: replaced {f['key']}; old object kept as {f['trash_key']}"
            )
        else:
            lines.append(f"      {f['path']}: {f['state']}: {f['error']}")
    if len(notable) > limit:
        lines.append(f"      ... {len(notable) - limit} more (see --json)")
    return lines


def _counts(st: Doc) -> str:
    total = st["files_total"] if st["files_total"] is not None else "?"
    size_total = format_size(st["bytes_total"]) if st["bytes_total"] is not None else "?"
    peers = f"  from peers {st['peer_files']}" if st.get("peer_files") else ""
    return (
        f"{st['files_done']}/{total} files  {format_size(st['bytes_done'])}/{size_total}"
        f"  fetched {st['fetched_files']}{peers}"
    )
