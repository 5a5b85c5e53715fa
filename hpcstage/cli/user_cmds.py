"""``hpcstage env``, ``status`` and ``warmup``: what scientists type. Thin: all via the API."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from hpcstage.cli.client import Client, ClientSettings, client_for
from hpcstage.cli.common import bytes_bar, config_option, load_client
from hpcstage.core.nodes import cache_dir_for
from hpcstage.core.units import format_size
from hpcstage.errors import ApiError, HpcstageError
from hpcstage.watch.slurm.hostlist import expand_hostlist

ENSURE_EVERY = 5.0  # seconds between nudges to the daemon while waiting
SAY_EVERY = 5.0  # seconds between progress lines on stderr
ENV_WAIT = 5.0  # seconds `hpcstage env` lets the daemon hold a request with no news
# Answers `hpcstage env` waits out instead of failing the job: the daemon unreachable (0: a
# restart, an HA takeover, a timeout) or a proxy in front of it without it (502-504).
RETRY_STATUSES = frozenset({0, 502, 503, 504})
RETRY_MAX = 15.0  # seconds between attempts at most

WARMUP_REFRESH = 0.5  # seconds between redraws of `hpcstage warmup`'s bar with no news
QUIET_WAIT = 10.0  # seconds `hpcstage warmup --json` lets the daemon hold a request


def _client(config_path: Path | None) -> tuple[Client, ClientSettings]:
    settings = load_client(config_path)
    return client_for(settings), settings


# ---------------------------------------------------------------------------- env


@click.command()
@config_option
@click.option(
    "--job",
    "job_id",
    type=int,
    envvar="SLURM_JOB_ID",
    show_envvar=True,
    help="Slurm job id (inside a job: taken from the environment).",
)
@click.option(
    "--node",
    envvar="SLURMD_NODENAME",
    show_envvar=True,
    help="This node's Slurm name (inside a job: taken from the environment).",
)
@click.option(
    "--timeout",
    type=float,
    default=3600,
    show_default=True,
    help="Seconds to wait for the inputs before failing the job.",
)
def env(config_path: Path | None, job_id: int | None, node: str | None, timeout: float) -> None:
    """Wait until this job's inputs are on this node, then print shell exports.

    Use it as the first line of a batch script on sites without the SPANK plugin:

    \b
      #HPCSTAGE --stage-in=s3://datasets/ligands/
      eval "$(hpcstage env || echo exit 1)"
      python dock.py "$HPCSTAGE_DIR/ligands"

    It asks the daemon to fetch whatever is missing on this node and waits, printing progress
    on stderr. A daemon that cannot be reached (restarting, an HA takeover) is asked again
    until the timeout. On failure (a missing object, a malformed directive, timeout) it prints
    `exit 1` for the shell, so the job stops instead of running without its data
    (`|| echo exit 1` does the same if hpcstage itself cannot run, e.g. no module loaded).
    """
    try:
        if job_id is None or not node:
            raise HpcstageError(
                "not inside a Slurm job: give --job and --node "
                "(or SLURM_JOB_ID and SLURMD_NODENAME)"
            )
        client, settings = _client(config_path)
        view = Path(cache_dir_for(settings.cache_dir, node)) / "jobs" / str(job_id)
        _wait_ready(client, job_id, node, timeout)
    except HpcstageError as exc:
        message = f"hpcstage: job {job_id} cannot start: {exc}"
        click.echo(message, err=True)
        click.echo(f"echo {shlex.quote(message)} >&2; exit 1")
        sys.exit(1)
    click.echo(f"export HPCSTAGE_DIR={shlex.quote(str(view))}")


def _wait_ready(client: Client, job_id: int, node: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_said = 0.0
    said = ""
    ask = _Patient(client, deadline)
    doc = ask.post(f"/api/v1/jobs/{job_id}/ensure")
    last_nudge = time.monotonic()
    while True:
        state = _node_state(doc, node)
        if state == "ready":
            return
        if state == "failed":
            raise HpcstageError(_first_error(doc, node))
        if time.monotonic() > deadline:
            raise HpcstageError(
                f"inputs not ready on {node} after {timeout:.0f}s ({_progress_line(doc, node)})"
            )
        line = f"hpcstage: waiting for inputs on {node}: {_progress_line(doc, node)}"
        # Progress when it changes, at most every few seconds: job logs stay readable.
        if line != said and time.monotonic() - last_said > SAY_EVERY:
            click.echo(line, err=True)
            said, last_said = line, time.monotonic()
        if time.monotonic() - last_nudge > ENSURE_EVERY:
            doc = ask.post(f"/api/v1/jobs/{job_id}/ensure")
            last_nudge = time.monotonic()
        else:
            left = max(0.1, deadline - time.monotonic())
            doc = ask.next(f"/api/v1/jobs/{job_id}", doc, min(ENV_WAIT, left))


class _Patient:
    """Calls to the daemon that wait out its absence until ``deadline`` (a restart or an HA
    takeover must not fail the jobs waiting for their inputs), saying so once on stderr."""

    def __init__(self, client: Client, deadline: float) -> None:
        self.client, self.deadline = client, deadline
        self._said = False

    def post(self, path: str) -> Any:
        return self._retried(lambda: self.client.post(path))

    def next(self, path: str, doc: dict[str, Any], wait: float) -> Any:
        return self._retried(lambda: _next(self.client, path, doc, wait))

    def _retried(self, call: Callable[[], Any]) -> Any:
        delay = 1.0
        while True:
            try:
                answer = call()
            except ApiError as exc:
                if exc.status not in RETRY_STATUSES or time.monotonic() + delay > self.deadline:
                    raise
                if not self._said:
                    click.echo(f"hpcstage: {exc}; asking again until it answers", err=True)
                    self._said = True
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            if self._said:
                click.echo("hpcstage: the daemon answers again", err=True)
                self._said = False
            return answer


def _next(client: Client, path: str, doc: dict[str, Any], wait: float) -> Any:
    """The next answer about ``path``: as soon as the daemon commits a change to it after
    ``doc``, else after ``wait`` seconds (long polling)."""
    if "changes" not in doc:  # a daemon from before long polling: poll
        time.sleep(min(wait, 1.0))
        return client.get(path)
    return client.get(f"{path}?since={doc['changes']}&wait={wait}")


def _node_state(doc: dict[str, Any], node: str) -> str:
    if doc.get("failure"):
        return "failed"
    return str(doc.get("staging", {}).get(node, "staging"))


def _first_error(doc: dict[str, Any], node: str) -> str:
    if doc.get("failure"):
        return str(doc["failure"])
    for req in doc.get("requests", []):
        st = req.get("nodes", {}).get(node, {})
        if st.get("state") == "failed":
            return str(st.get("error") or f"{req['text']}: failed")
    return "staging failed"


def _progress_line(doc: dict[str, Any], node: str) -> str:
    files = total_files = size = 0
    for req in doc.get("requests", []):
        st = req.get("nodes", {}).get(node)
        if st:
            files += st["files_done"]
            total_files += st["files_total"] or 0
            size += st["bytes_done"]
    total = str(total_files) if total_files else "?"
    return f"{files}/{total} files, {format_size(size)}"


# ---------------------------------------------------------------------------- status


@click.command()
@config_option
@click.argument("job_id", type=int, required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON document.")
@click.option("--all", "show_all", is_flag=True, help="Include jobs whose staging is over.")
@click.option(
    "--for-uid",
    type=click.IntRange(min=0),
    metavar="UID",
    help="Admins: answer as user UID would be answered (burst_buffer.lua's bbstat uses it).",
)
def status(
    config_path: Path | None, job_id: int | None, as_json: bool, show_all: bool, for_uid: int | None
) -> None:
    """Show staging of one job (JOBID) or of every job the daemon tracks.

    For one job: each input with files and bytes done/total per node, its state and error,
    then the daemon's recent events for the job. Users see their own jobs only.
    """
    client, _ = _client(config_path)
    client.for_uid = for_uid
    if job_id is None:
        jobs = client.get(f"/api/v1/jobs?all={'true' if show_all else 'false'}")
        click.echo(json.dumps(jobs, indent=2) if as_json else _jobs_table(jobs))
        return
    try:
        doc = client.get(f"/api/v1/jobs/{job_id}")
    except ApiError as exc:
        if exc.status == 404:
            raise HpcstageError(str(exc)) from exc
        raise
    click.echo(json.dumps(doc, indent=2) if as_json else _job_text(doc))


def _printable(value: Any) -> Any:
    """The API's answer with every non-printable character of its text escaped (``\\x1b``,
    ``\\n``): a job names itself and its files, and an admin reads ``hpcstage status`` on a
    terminal, which acts on escape sequences, and where a name must not forge a line."""
    if isinstance(value, str):
        return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in value)
    if isinstance(value, list):
        return [_printable(item) for item in value]
    if isinstance(value, dict):
        return {key: _printable(item) for key, item in value.items()}
    return value


def _jobs_table(jobs: list[dict[str, Any]]) -> str:
    jobs = _printable(jobs)
    if not jobs:
        return "no jobs with staging directives"
    head = f"{'JOBID':>10}  {'USER':<10} {'STATE':<11} {'NODES':<14} {'STAGE-OUT':<9} STAGING"
    lines = [head]
    for j in jobs:
        ident = str(j["job_id"]) if j["kind"] == "job" else f"warmup-{j['id']}"
        nodes = ",".join(j["nodes"] or j["planned_nodes"]) or "-"
        staging = " ".join(f"{n}:{s}" for n, s in sorted(j["staging"].items())) or "-"
        if j["failure"]:
            staging += "  FAILED: " + j["failure"]
        out = j.get("stage_out", "none")  # absent from a daemon older than the column
        out = "-" if out == "none" else out
        lines.append(
            f"{ident:>10}  {j['user']:<10} {j['state']:<11} {nodes:<14} {out:<9} {staging}"
        )
    return "\n".join(lines)


def _job_text(doc: dict[str, Any]) -> str:
    doc = _printable(doc)
    out = [
        f"job {doc['job_id'] or 'warmup-' + str(doc['id'])} ({doc['name']}) user {doc['user']}"
        f" account {doc['account'] or '-'}: {doc['state']} {doc['reason'] or ''}".rstrip(),
        f"  planned nodes: {','.join(doc['planned_nodes']) or '-'}   "
        f"nodes: {','.join(doc['nodes']) or '-'}   directives from: {doc['directive_source']}",
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


def _request_lines(req: dict[str, Any]) -> list[str]:
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


def _file_lines(files: list[dict[str, Any]], limit: int = 20) -> list[str]:
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


def _counts(st: dict[str, Any]) -> str:
    total = st["files_total"] if st["files_total"] is not None else "?"
    size_total = format_size(st["bytes_total"]) if st["bytes_total"] is not None else "?"
    peers = f"  from peers {st['peer_files']}" if st.get("peer_files") else ""
    return (
        f"{st['files_done']}/{total} files  {format_size(st['bytes_done'])}/{size_total}"
        f"  fetched {st['fetched_files']}{peers}"
    )


# ---------------------------------------------------------------------------- warmup


@click.command()
@config_option
@click.argument("src")
@click.option(
    "--nodes", required=True, help="Nodes to warm, in Slurm's hostlist form, e.g. n[1-3],gpu01."
)
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Wait and show a progress bar until every node holds SRC.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the final status as JSON.")
def warmup(config_path: Path | None, src: str, nodes: str, wait: bool, as_json: bool) -> None:
    """Prefetch SRC into the node-local cache of NODES, ahead of any job.

    SRC is s3://bucket/key, s3://bucket/prefix/ or an absolute shared-filesystem path. Warm data
    stays in the caches (shared by every later job that needs it) until evicted by policy.

    \b
    Example:
      hpcstage warmup s3://datasets/ligands/ --nodes n[1-3]
    """
    client, _ = _client(config_path)
    node_list = list(expand_hostlist(nodes))
    user = os.environ.get("USER", "")
    warm_id = client.post("/api/v1/warmups", {"src": src, "nodes": node_list, "user": user})["id"]
    if not wait:
        click.echo(json.dumps({"id": warm_id}) if as_json else f"warmup {warm_id} queued")
        return
    doc = _follow(client, warm_id, node_list, show_bar=not as_json)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    failed = [n for n in node_list if doc["staging"].get(n) == "failed"]
    if failed:
        raise HpcstageError(f"warmup failed on {','.join(failed)}: {_first_error(doc, failed[0])}")
    if not as_json:
        click.echo(f"warm on {','.join(node_list)}: {src}")


def _follow(client: Client, warm_id: int, nodes: list[str], show_bar: bool) -> Any:
    path = f"/api/v1/warmups/{warm_id}"
    doc = client.get(path)
    if not show_bar:  # --json: nothing to redraw, so no need for rich (its import is slow)
        while not _settled(doc, nodes):
            doc = _next(client, path, doc, QUIET_WAIT)
        return doc
    with bytes_bar(transient=False) as bar:
        tasks = {n: bar.add_task(f"warm {n}", total=None) for n in nodes}
        while True:
            for node in nodes:
                files, size, files_total, size_total = _node_totals(doc, node)
                label = f"{node} {files}/{files_total or '?'} files"
                bar.update(tasks[node], description=label, completed=size, total=size_total or None)
            if _settled(doc, nodes):
                return doc
            doc = _next(client, path, doc, WARMUP_REFRESH)


def _node_totals(doc: dict[str, Any], node: str) -> tuple[int, int, int, int]:
    files = files_total = size = size_total = 0
    for req in doc["requests"]:
        st = req["nodes"].get(node)
        if st:
            files += st["files_done"]
            files_total += st["files_total"] or 0
            size += st["bytes_done"]
            size_total += st["bytes_total"] or 0
    return files, size, files_total, size_total


def _settled(doc: dict[str, Any], nodes: list[str]) -> bool:
    """Every input on every node finished (ready or failed)."""
    return bool(doc["requests"]) and all(
        req["nodes"].get(n, {}).get("finished_at") for req in doc["requests"] for n in nodes
    )


# ---------------------------------------------------------------------------- dashboard


@click.command()
@config_option
def dashboard(config_path: Path | None) -> None:
    """Print a link that opens the dashboard in a browser, as you.

    Browsers cannot make MUNGE credentials, so this command asks the daemon (with one) for
    a login link. It is valid for a minute and for one use; opening it sets a session
    cookie for some hours. The page shows your own jobs (admins: everyone's): their inputs'
    progress per node, how long they waited for them at start, their errors, and the nodes'
    caches; it updates itself every few seconds (docs/dashboard.md).
    """
    client, _ = _client(config_path)
    token = client.post("/api/v1/dashboard/login")["token"]
    click.echo(f"{client.base_url}/login?token={token}" if token else f"{client.base_url}/")
