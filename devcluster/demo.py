"""The README's first command: hpcstage end to end on a real local cluster.

Brings up the dev cluster, puts an example docking campaign into S3, starts the daemon as
the service account, fills every node with busy jobs, submits the example jobs as two
scientists, shows their staging as it happens and closes with a summary per job: were the
inputs on the node before the job started, and how long did the job wait for data?
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
from aiobotocore.session import get_session

from devcluster import proc
from devcluster.cluster import DevCluster
from devcluster.errors import ClusterError
from devcluster.site import hpcstage_bin, start_daemon, stop_daemon, write_site_config
from hpcstage.cli.client import Client, client_for
from hpcstage.errors import ApiError, HpcstageError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "jobs"
LIGANDS = 2000  # 4 KiB each: the small-file shape of the docking campaign
# The same ligands, packed (docs/packed-datasets.md):
PACKED = "s3://datasets/docking/ligands.hpack/"
RECEPTOR_BYTES = 8 * 1024 * 1024


def say(text: str = "") -> None:
    click.echo(text)
    sys.stdout.flush()


def step(text: str) -> None:
    say(f"\n==> {text}")


async def upload_dataset(dev: DevCluster) -> dict[str, str]:
    """The example campaign in S3: ligands/ (many small files) and one receptor."""
    info = dev.info
    sums: dict[str, str] = {}
    async with get_session().create_client(
        "s3",
        endpoint_url=info.s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=info.s3_access_key,
        aws_secret_access_key=info.s3_secret_key,
    ) as s3:
        sem = asyncio.Semaphore(32)

        async def put(key: str, body: bytes) -> None:
            async with sem:
                await s3.put_object(Bucket="datasets", Key=key, Body=body)
            sums[key] = hashlib.sha256(body).hexdigest()

        bodies = {f"docking/ligands/lig{i:05d}.sdf": _ligand(i) for i in range(LIGANDS)}
        bodies["docking/receptor.pdb"] = _receptor()
        await asyncio.gather(*(put(k, b) for k, b in bodies.items()))
    return sums


def _ligand(i: int) -> bytes:
    seed = hashlib.sha256(f"ligand {i}".encode()).hexdigest()
    line = f"LIG{i:05d} {seed}\n".encode()
    return (line * (4096 // len(line) + 1))[:4096]


def _receptor() -> bytes:
    block = hashlib.sha256(b"receptor").digest() * 2048  # 64 KiB
    return block * (RECEPTOR_BYTES // len(block))


def pack_library(dev: DevCluster) -> str:
    """``hpcstage pack`` of the ligands, as a scientist runs it on a login node: their own
    S3 credentials, no daemon. A one-line account of the version written."""
    info = dev.info
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": info.s3_access_key,
        "AWS_SECRET_ACCESS_KEY": info.s3_secret_key,
        "AWS_ENDPOINT_URL": info.s3_endpoint,
    }
    env.pop("HPCSTAGE_CONFIG", None)
    argv = [hpcstage_bin(), "pack", "s3://datasets/docking/ligands/", PACKED, "--json"]
    done = proc.run(argv, env=env)
    last = json.loads(done.stdout.strip().splitlines()[-1])
    return (
        f"version {last['version']}: {last['files']} files in {last['segments']} segment(s),"
        f" {last['files_per_s']:,.0f} files/s; jobs stage it with --stage-in={PACKED}"
    )


def submit_examples(dev: DevCluster, env: dict[str, str]) -> dict[str, int]:
    """Busy jobs on every node first, then the example jobs that need staging."""
    wd = {u: dev.workdir(u) for u in ("alice", "bob")}
    jobs: dict[str, int] = {}
    busy = (EXAMPLES / "busy.sh").read_text()
    for i, _node in enumerate(dev.info.nodes):
        seconds = str(15 + 5 * i)  # nodes free up one after another
        jobs[f"busy-{i + 1}"] = dev.sbatch(
            "bob",
            busy,
            "--account=bio",
            f"--output={wd['bob']}/%j.out",
            env={**env, "BUSY_SECONDS": seconds},
        )
    for name, user, account in (
        ("docking.sh", "alice", "chem"),
        ("docking-rerun.sh", "alice", "chem"),
        ("missing-input.sh", "bob", "bio"),
    ):
        jobs[name] = dev.sbatch(
            user,
            (EXAMPLES / name).read_text(),
            f"--account={account}",
            f"--output={wd[user]}/%j.out",
            env=env,
        )
    return jobs


def watch(dev: DevCluster, client: Client, jobs: dict[str, int], timeout: float) -> None:
    """Print each change of a job's Slurm state or staging until every job has ended."""
    seen: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = 0
        for name, job_id in jobs.items():
            line, done = _line(dev, client, name, job_id)
            if seen.get(job_id) != line:
                seen[job_id] = line
                say(f"  {time.strftime('%H:%M:%S')}  {line}")
            if not done:
                pending += 1
        if pending == 0:
            return
        time.sleep(1)
    raise ClusterError(f"jobs did not finish within {timeout:.0f}s")


def _line(dev: DevCluster, client: Client, name: str, job_id: int) -> tuple[str, bool]:
    """The job's line, and whether both Slurm and the daemon are done with it (the daemon
    sees a job end a poll after Slurm does, and then writes its outputs back)."""
    fields = dev.job_state(job_id)
    state = fields.get("JobState", "?")
    where = fields.get("NodeList", "") if state != "PENDING" else ""
    planned = fields.get("SchedNodeList", "")
    text = f"{job_id:>4} {name:<18} {state:<10}"
    text += f" on {where}" if where and where != "(null)" else ""
    text += f" planned {planned}" if state == "PENDING" and planned not in ("", "(null)") else ""
    slurm_done = state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
    try:
        doc = client.get(f"/api/v1/jobs/{job_id}")
    except ApiError:
        return text, slurm_done
    if doc["error"]:
        return text + f"  refused: {doc['error']}", slurm_done
    done = slurm_done and doc["state"] not in ("PENDING", "RUNNING")
    done = done and doc["stage_out"] not in ("pending", "running")
    staging = ", ".join(f"{n} {s}" for n, s in sorted(doc["staging"].items()))
    errors = [st["error"] for r in doc["requests"] for st in r["nodes"].values() if st["error"]]
    line = (
        text
        + (f"  staging: {staging}" if staging else "")
        + (f"  error: {errors[0]}" if errors else "")
    )
    return line, done


def summary(dev: DevCluster, client: Client, jobs: dict[str, int]) -> list[dict[str, Any]]:
    """Per staged job: where it ran, inputs ready before start?, seconds waited for data."""
    rows = []
    for name, job_id in jobs.items():
        if name.startswith("busy"):
            continue
        doc = client.get(f"/api/v1/jobs/{job_id}")
        out = dev.workdir(doc["user"]) / f"{job_id}.out"
        text = out.read_text(errors="replace") if out.exists() else ""
        node = (doc["nodes"] or ["-"])[0]
        ready_at = doc["ready_at"].get(node)
        started = doc["started_at"]
        waited = _field(text, "waited=")
        rows.append(
            {
                "job": job_id,
                "name": name,
                "user": doc["user"],
                "state": doc["state"],
                "node": node,
                "ready_before_start": bool(ready_at and started and ready_at <= started),
                "ready_s_before_start": round(started - ready_at, 1)
                if ready_at and started
                else None,
                "waited_for_data_s": waited,
                "error": _first_error(doc),
                "stage_out": doc["stage_out"],
                "outputs": _outputs(doc),
                "fetched": _inputs_sum(doc, node, "fetched_files"),
                "files": _inputs_sum(doc, node, "files_done"),
                "files_per_s": _files_per_s(doc, node),
                "from_peers": _inputs_sum(doc, node, "peer_files"),
            }
        )
    return rows


def _inputs_sum(doc: dict[str, Any], node: str, counter: str) -> int:
    """A staging counter summed over the job's inputs on ``node``."""
    return sum(
        int(r["nodes"].get(node, {}).get(counter, 0))
        for r in doc["requests"]
        if r["direction"] == "in"
    )


def _files_per_s(doc: dict[str, Any], node: str) -> float | None:
    """Input files made visible on ``node`` per second of its staging (None: not staged)."""
    spans = [
        (st["started_at"], st["finished_at"], int(st.get("files_done", 0)))
        for r in doc["requests"]
        if r["direction"] == "in"
        for n, st in r["nodes"].items()
        if n == node and st.get("started_at") and st.get("finished_at")
    ]
    if not spans:
        return None
    took = max(end for _, end, _ in spans) - min(start for start, _, _ in spans)
    return float(sum(files for _, _, files in spans) / max(took, 1e-3))


def _outputs(doc: dict[str, Any]) -> list[str]:
    return [
        f"s3://{r['dest'].removeprefix('s3://').split('/', 1)[0]}/{f['key']}"
        for r in doc["requests"]
        if r["direction"] == "out"
        for st in r["nodes"].values()
        for f in st["files"]
        if f["state"] in ("uploaded", "present")
    ]


def _field(text: str, key: str) -> str | None:
    for word in text.split():
        if word.startswith(key):
            return word[len(key) :].rstrip("s")
    return None


def _first_error(doc: dict[str, Any]) -> str:
    return str(doc["failure"])


def print_summary(rows: list[dict[str, Any]]) -> None:
    say(
        f"{'job':>4}  {'name':<18} {'user':<6} {'state':<10} {'node':<5} "
        f"{'inputs ready before start':<26} {'waited for data':<16} {'input files/s':<14}"
        "objects from S3 / from other nodes' caches"
    )
    for r in rows:
        ready = "yes" if r["ready_before_start"] else "no"
        if r["ready_s_before_start"] is not None and r["ready_before_start"]:
            ready += f" ({r['ready_s_before_start']:.0f}s ahead)"
        waited = f"{r['waited_for_data_s']}s" if r["waited_for_data_s"] else "-"
        rate = f"{r['files_per_s']:,.0f}" if r["files_per_s"] else "-"
        say(
            f"{r['job']:>4}  {r['name']:<18} {r['user']:<6} {r['state']:<10} {r['node']:<5} "
            f"{ready:<26} {waited:<16} {rate:<14}{r['fetched']} / {r['from_peers']}"
        )
        if r["error"]:
            say(f"      error shown to the user: {r['error']}")
        if r["stage_out"] != "none":
            say(f"      stage-out {r['stage_out']}: " + (", ".join(r["outputs"]) or "-"))


def check(rows: list[dict[str, Any]]) -> list[str]:
    """What the demo promises; each broken promise is a line."""
    by_name = {r["name"]: r for r in rows}
    problems = []
    dock = by_name["docking.sh"]
    if dock["state"] != "COMPLETED" or not dock["ready_before_start"]:
        problems.append(f"docking.sh: expected COMPLETED with inputs staged ahead: {dock}")
    if dock["stage_out"] != "done" or len(dock["outputs"]) != 2:
        problems.append(f"docking.sh: expected its 2 results written back: {dock}")
    if by_name["docking-rerun.sh"]["state"] != "COMPLETED":
        problems.append(f"docking-rerun.sh did not complete: {by_name['docking-rerun.sh']}")
    missing = by_name["missing-input.sh"]
    if missing["state"] != "FAILED" or "no-such-receptor" not in missing["error"]:
        problems.append(f"missing-input.sh should fail naming its directive: {missing}")
    return problems


def run(base: Path, keep: bool, timeout: float) -> int:
    dev = DevCluster(base, name="demo")
    step(f"Local Slurm cluster under {base} (munge, slurmctld, slurmd n1-n3, S3, sshd)")
    dev.down(purge=True)
    info = dev.up(progress=lambda m: say(f"  starting {m}"))
    daemon_pid = 0
    try:
        say(f"  Slurm {info.slurm_version}, S3 at {info.s3_endpoint}")
        step(
            f"Example docking campaign into s3://datasets/docking/ ({LIGANDS} x 4 KiB ligands"
            f" + {RECEPTOR_BYTES // 2**20} MiB receptor)"
        )
        asyncio.run(upload_dataset(dev))
        step(f"Packing the ligand library: hpcstage pack s3://datasets/docking/ligands/ {PACKED}")
        say("  " + pack_library(dev))
        step("Site configuration, checked")
        config = write_site_config(dev)
        say("  " + proc.run([hpcstage_bin(), "config", "check", str(config)]).stdout.strip())
        step("hpcstage daemon, as the unprivileged service account 'hpcstage'")
        daemon_pid = start_daemon(dev, config)
        client = _wait_api(config, dev)
        say(f"  pid {daemon_pid}, API at {client.base_url}/ (dashboard: `hpcstage dashboard`)")
        step("Jobs: busy jobs fill n1-n3, then alice's and bob's staged jobs queue behind them")
        env = {
            "HPCSTAGE_CONFIG": str(config),
            "PATH": f"{Path(hpcstage_bin()).parent}:/usr/local/bin:/usr/bin:/bin",
        }
        jobs = submit_examples(dev, env)
        for name, job_id in jobs.items():
            say(f"  submitted {job_id:>4} {name}")
        step("Watching: Slurm state, planned node, and staging per node")
        watch(dev, client, jobs, timeout)
        step("Summary")
        rows = summary(dev, client, jobs)
        print_summary(rows)
        (base / "demo-summary.json").write_text(json.dumps(rows, indent=2))
        problems = check(rows)
        for p in problems:
            say(f"  PROBLEM: {p}")
        say("\nDemo " + ("FAILED" if problems else "succeeded") + f"; logs in {base}/log/.")
        return 1 if problems else 0
    finally:
        if daemon_pid:
            stop_daemon(daemon_pid)
        if keep:
            say(f"Cluster left running: source {base}/env.sh; scripts/devcluster down")
        else:
            dev.down()
            say("Cluster stopped (run with --keep to leave it up).")


def _wait_api(config: Path, dev: DevCluster) -> Client:
    from hpcstage.config.load import load_config

    client = client_for(load_config(config), timeout=5)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            client.get("/api/v1/health")
            return client
        except ApiError:
            time.sleep(0.3)
    raise ClusterError(
        "the daemon's API did not come up"
        + proc.log_tail(Path(dev.info.base) / "log" / "daemon.log")
    )


@click.command()
@click.option(
    "--base",
    type=click.Path(path_type=Path),
    default=Path("/var/tmp/hpcstage-demo"),
    show_default=True,
)
@click.option("--keep", is_flag=True, help="Leave the cluster running afterwards.")
@click.option("--timeout", type=float, default=300, show_default=True)
def main(base: Path, keep: bool, timeout: float) -> None:
    """Run hpcstage end to end on a local cluster (as root)."""
    if os.geteuid() != 0:
        raise click.ClickException("run the demo as root (it starts Slurm and sshd)")
    try:
        sys.exit(run(base, keep, timeout))
    except HpcstageError as exc:
        click.echo(f"demo: error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
