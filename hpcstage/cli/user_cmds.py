"""``hpcstage env``, ``status`` and ``warmup``: what scientists type. Thin: all via the API."""

from __future__ import annotations

import json
import os
import pwd
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from hpcstage.cli import cache_view
from hpcstage.cli import status_view as view
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
    "--restarts",
    type=click.IntRange(0, 2**16 - 1),
    default=0,
    envvar="SLURM_RESTART_COUNT",
    show_envvar=True,
    help="Times Slurm requeued this job (inside a job: taken from the environment); a re-run "
    "waits until the daemon has seen it, so it never gets the earlier run's directory.",
)
@click.option(
    "--timeout",
    type=float,
    default=3600,
    show_default=True,
    help="Seconds to wait for the inputs before failing the job.",
)
def env(
    config_path: Path | None, job_id: int | None, node: str | None, restarts: int, timeout: float
) -> None:
    """Wait until this job's inputs are on this node, then print shell exports.

    Use it as the first line of a batch script on sites without the SPANK plugin:

    \b
      #HPCSTAGE --stage-in=s3://datasets/ligands/
      eval "$(hpcstage env || echo exit 1)"
      python dock.py "$HPCSTAGE_DIR/ligands"

    It prints HPCSTAGE_DIR, and HPCSTAGE_MOUNTS: the paths a container must bind to read the
    inputs inside it (docs/containers.md), e.g.
    `apptainer exec --bind "$HPCSTAGE_MOUNTS" image.sif ...`.

    It asks the daemon to fetch whatever is missing on this node and waits, printing progress
    on stderr. A daemon that cannot be reached (restarting, an HA takeover) is asked again
    until the timeout. On failure (a missing object, a malformed directive, timeout) it says
    why on stderr and prints `exit 1` for the shell, so the job stops instead of running
    without its data (`|| echo exit 1` does the same if hpcstage itself cannot run, e.g. no
    module loaded).
    """
    try:
        if job_id is None or not node:
            raise HpcstageError(
                "not inside a Slurm job: give --job and --node "
                "(or SLURM_JOB_ID and SLURMD_NODENAME)"
            )
        client, settings = _client(config_path)
        view = Path(cache_dir_for(settings.cache_dir, node)) / "jobs" / str(job_id)
        _wait_ready(client, job_id, node, restarts, timeout)
    except HpcstageError as exc:
        # Said once, on stderr (the job's output, the SPANK plugin's and burst_buffer.lua's
        # reason); the shell that evals stdout only exits.
        click.echo(f"hpcstage: job {job_id} cannot start: {exc}", err=True)
        click.echo("exit 1")
        sys.exit(1)
    click.echo(f"export HPCSTAGE_DIR={shlex.quote(str(view))}")
    click.echo(f"export HPCSTAGE_MOUNTS={shlex.quote(','.join(container_mounts(view)))}")


def container_mounts(view: Path) -> list[str]:
    """What a container must bind (read-only) for the job to read its inputs inside it: the
    job directory, and the node's packed trees, which a packed input's symlink points into
    (docs/containers.md). Comma-separated, as Apptainer's --bind and pyxis's
    --container-mounts take them."""
    packed = view.parent.parent / "packed"
    return [str(view), *([str(packed)] if packed.is_dir() else [])]


def _wait_ready(client: Client, job_id: int, node: str, restarts: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last_said = 0.0
    said = ""
    ask = _Patient(client, deadline)
    ensure = f"/api/v1/jobs/{job_id}/ensure" + (f"?restarts={restarts}" if restarts else "")
    doc = ask.post(ensure)
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
            doc = ask.post(ensure)
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


def _parsed(parse: Callable[[str], list[Any]]) -> Callable[..., list[Any] | None]:
    """A click callback: ``parse`` the option's text, its ValueError a usage error."""

    def callback(ctx: click.Context, param: click.Parameter, text: str | None) -> list[Any] | None:
        try:
            return None if text is None else parse(text)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from exc

    return callback


def _checked_format(ctx: click.Context, param: click.Parameter, spec: str | None) -> str | None:
    """-o: refused before the daemon is asked if it names a field there is not."""
    if spec is not None:
        _parsed(view.parse_format)(ctx, param, spec)
    return spec


STATUS_EPILOG = f"""\b
FORMAT (-o), as squeue's: %[.][SIZE]FIELD; SIZE pads and cuts, '.' right-justifies.
  %i JOBID (A_a for array tasks)  %A job id   %F array job id  %K array task id
  %j name  %u user  %a account  %P partition  %T state  %t state code  %r reason
  %D node count  %N nodelist  %R nodelist (and why staging failed)  %% a '%'
  %{{staging}} READY n/N: target nodes holding every input   %{{stage_out}} stage-out
\b
default: -o "{view.DEFAULT_FORMAT}"
"""


# -h is squeue's --noheader here, as users type it; help is --help alone.
@click.command(epilog=STATUS_EPILOG, context_settings={"help_option_names": ["--help"]})
@config_option
@click.argument("job_id", metavar="[JOBID]", required=False, callback=_parsed(view.parse_job_id))
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON document.")
@click.option("--all", "show_all", is_flag=True, help="Include jobs whose staging is over.")
@click.option("--me", is_flag=True, help="Only your own jobs (the --for-uid user's, if given).")
@click.option(
    "-u",
    "--user",
    "users",
    metavar="USER[,USER]",
    callback=_parsed(view.parse_users),
    help="Only these users' jobs (users see only their own anyway).",
)
@click.option(
    "-t",
    "--states",
    "states",
    metavar="STATE[,STATE]",
    callback=_parsed(view.parse_states),
    help="Only jobs in these Slurm states, long or short (PD,R,CG,CD,...; all).",
)
@click.option(
    "-o",
    "--format",
    "spec",
    metavar="FORMAT",
    callback=_checked_format,
    help="Columns, as squeue -o (below).",
)
@click.option("-h", "--noheader", is_flag=True, help="No header line.")
@click.option("--parsable", is_flag=True, help="Fields joined by '|', not padded.")
@click.option("-v", "--verbose", is_flag=True, help="Each job's nodes on lines under it.")
@click.option(
    "--for-uid",
    type=click.IntRange(min=0),
    metavar="UID",
    help="Admins: answer as user UID would be answered (burst_buffer.lua's bbstat uses it).",
)
def status(
    config_path: Path | None,
    job_id: list[int] | None,
    as_json: bool,
    show_all: bool,
    me: bool,
    users: list[str] | None,
    states: list[str] | None,
    spec: str | None,
    noheader: bool,
    parsable: bool,
    verbose: bool,
    for_uid: int | None,
) -> None:
    """Show staging of one job (JOBID, or A_a: task a of array A) or list the jobs the daemon
    tracks, as squeue does.

    The list has a line per job: its id (A_a for an array task), name, user, account, Slurm
    state, how many of its nodes hold every input (READY 2/3) and its nodes as a hostlist
    (n[1-3]); -v adds a line per node. For one job: each input with files and bytes
    done/total per node, its state and error, then the daemon's recent events for the job.
    Users see their own jobs only.
    """
    listing = {"--me": me, "-u": users, "-t": states, "-o": spec, "-h": noheader}
    listing |= {"--parsable": parsable, "-v": verbose and job_id is None}
    _check_status_options(job_id, as_json, [name for name, given in listing.items() if given])
    client, _ = _client(config_path)
    client.for_uid = for_uid
    if job_id is not None:
        _one_job(client, job_id, as_json)
        return
    who = [_user_name(for_uid)] if me else (users or [])
    jobs = view.kept(client.get(view.jobs_query(show_all, who, states or [])), who, states or [])
    if as_json:
        click.echo(json.dumps(jobs, indent=2))
        return
    table = view.jobs_table(
        jobs, spec or view.DEFAULT_FORMAT, header=not noheader, parsable=parsable, verbose=verbose
    )
    if table:
        click.echo(table)


def _check_status_options(job_id: list[int] | None, as_json: bool, given: list[str]) -> None:
    """One job's page and JSON have no columns to choose; --me and -u name the same thing."""
    if job_id is not None and given:
        raise click.UsageError(f"{', '.join(given)}: for listings; JOBID shows one job whole")
    if as_json and set(given) - {"--me", "-u", "-t"}:
        raise click.UsageError(f"{', '.join(given)}: not with --json, which prints every field")
    if {"--me", "-u"} <= set(given):
        raise click.UsageError("--me and -u: give one of them")


def _one_job(client: Client, ident: list[int], as_json: bool) -> None:
    """JOBID, or an array task as squeue names it (A_a): that task's own job id is asked for."""
    job_id = ident[0]
    if len(ident) == 2:
        found = view.array_task(client.get(view.jobs_query(True, [], [])), *ident)
        if found is None:
            raise HpcstageError(f"array task {ident[0]}_{ident[1]} is not known to hpcstage")
        job_id = found
    try:
        doc = client.get(f"/api/v1/jobs/{job_id}")
    except ApiError as exc:
        if exc.status == 404:
            raise HpcstageError(str(exc)) from exc
        raise
    click.echo(json.dumps(doc, indent=2) if as_json else view.job_text(doc))


def _user_name(uid: int | None) -> str:
    """--me: the name of this process's user, or of the uid an admin answers for."""
    uid = os.getuid() if uid is None else uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        raise HpcstageError(f"--me: uid {uid} has no user name on this host") from None


# ---------------------------------------------------------------------------- warmup

LISTING_TIMEOUT = 900.0  # seconds for an answer that lists a source (10^6 keys: minutes)


@click.command()
@config_option
@click.argument("src")
@click.option(
    "--nodes",
    required=True,
    help="Nodes to warm (or check), in Slurm's hostlist form, e.g. n[1-3],gpu01.",
)
@click.option(
    "--wait/--no-wait",
    default=True,
    show_default=True,
    help="Wait and show a progress bar until every node holds SRC.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the final status as JSON.")
@click.option(
    "--check",
    is_flag=True,
    help="Warm nothing: show how many of SRC's objects and bytes each node's cache holds.",
)
@click.option(
    "--complete",
    is_flag=True,
    help="With --check: exit with status 2 unless every node holds all of SRC.",
)
def warmup(
    config_path: Path | None,
    src: str,
    nodes: str,
    wait: bool,
    as_json: bool,
    check: bool,
    complete: bool,
) -> None:
    """Prefetch SRC into the node-local cache of NODES, ahead of any job.

    SRC is s3://bucket/key, s3://bucket/prefix/ or an absolute shared-filesystem path, as in
    --stage-in: a prefix may take filters (SRC::include=GLOB,exclude=GLOB; globs relative to
    the prefix, '*' within one path component, '**' across any number, an exclude wins) and
    an object a version (s3://bucket/key?versionId=V). Warm data stays in the caches (shared
    by every later job that needs it) until evicted by policy.

    With --check nothing is warmed: the daemon lists SRC in the store once and shows, per node
    and in total, how many of its objects and bytes (as the store holds them now: a changed
    object counts as missing) the node's cache holds (S3 sources only). Exit status 0 when
    every node answered, however much it holds (with --complete: 2 unless every node holds
    all of SRC); 1 when a node could not be asked or the check was refused. Like a warmup, a
    check needs read access to SRC by the site policy.

    \b
    Examples:
      hpcstage warmup s3://datasets/ligands/ --nodes n[1-3]
      hpcstage warmup --check s3://datasets/ligands/ --nodes n[1-3]
      hpcstage warmup 's3://datasets/climate/::include=**/*.nc,exclude=tmp/**' --nodes n1
    """
    if complete and not check:
        raise click.UsageError("--complete goes with --check")
    client, settings = _client(config_path)
    node_list = list(expand_hostlist(nodes))
    if check:
        # The daemon answers once it has listed all of SRC: as long as a listing takes.
        _check(client_for(settings, LISTING_TIMEOUT), src, node_list, as_json, complete)
        return
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


def _check(client: Client, src: str, nodes: list[str], as_json: bool, complete: bool) -> None:
    """``warmup --check``: print what each node holds of SRC; exit 1 if a node could not be
    asked, 2 with ``complete`` unless every node holds all of it."""
    doc = client.post("/api/v1/cache/check", {"src": src, "nodes": nodes})
    click.echo(json.dumps(doc, indent=2) if as_json else cache_view.check_table(doc))
    failed = cache_view.failed_nodes(doc)
    if failed:
        raise HpcstageError(f"cannot tell what {','.join(failed)} hold: see above")
    if complete and not cache_view.complete_everywhere(doc):
        sys.exit(2)


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
