#!/usr/bin/env python3
"""Packed datasets against the unpacked peers (issue 17), on the dev cluster.

``small``: the small-file benchmark's data (20,000 x 4 KiB) uploaded twice, as plain objects
and packed with ``hpcstage pack`` (timed on its own). Then, into tmpfs (``/dev/shm``, as on
diskless nodes; the node cache is a tmpfs mount) and into this machine's ext4:

    hpcstage   ``hpcstage warmup s3://.../small.hpack/`` until the daemon reports the files
               materialised on the node (readable; then a ``sync`` is timed: durable)
    s5cmd      ``s5cmd cp`` of the unpacked prefix
    rclone     ``rclone copy`` of the unpacked prefix
    cp         ``cp -r`` of a local copy (the file system's own limit)

``million``: 10^6 files of 1 byte: ``hpcstage pack`` of the directory (peak RSS), then
``hpcstage warmup`` of the packed dataset onto one node (the agent's peak RSS), then a job
staging the same dataset on that node (the attach: its staging time), and ``hpcstage pack
--slurm --tasks 4`` against the single-process pack (speed-up; the two manifests compared).

Run as root on an otherwise idle machine, from the repository:

    .venv/bin/python benchmarks/packed.py --repeat 3
    .venv/bin/python benchmarks/packed.py --only million

Prints the table and writes benchmarks/results/packed-<time>.json; docs/benchmarks.md's
"Packed datasets" section quotes a run by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pwd
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stagein as sb

from devcluster import users
from devcluster.cluster import DevCluster
from devcluster.site import hpcstage_bin, write_site_config

BUCKET = sb.BUCKET
SHM = Path("/dev/shm/hpcstage-bench")
NODE = "n1"


def say(text: str = "") -> None:
    print(text, flush=True)


def user_env(ctx: sb.Context) -> dict[str, str]:
    """A user's environment for ``hpcstage pack``: their own credentials, the site's endpoint."""
    return {**sb.peer_env(ctx), "AWS_ENDPOINT_URL": ctx.dev.info.s3_endpoint}


def pack(ctx: sb.Context, src: str, dest: str, log: str, *extra: str) -> sb.Timed:
    argv = [hpcstage_bin(), "pack", src, dest, "--json", *extra]
    timed = sb.run_timed(argv, env=user_env(ctx), log=ctx.logs / log, timeout=ctx.args.timeout)
    if timed.rc != 0:
        raise RuntimeError(
            f"hpcstage pack exited {timed.rc}: {(ctx.logs / log).read_text()[-2000:]}"
        )
    return timed


# ---------------------------------------------------------------------------- node cache


def cache_on(ctx: sb.Context, target: str) -> Path:
    """A fresh, empty node cache for NODE on ``target`` (tmpfs: a tmpfs mounted on it)."""
    cache = sb.node_cache(ctx, NODE)
    unmount(cache)
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    if target == "tmpfs":
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=12g,mode=0755", "tmpfs", str(cache)], check=True
        )
    svc = pwd.getpwnam(users.SERVICE.name)
    os.chown(cache, svc.pw_uid, svc.pw_gid)
    return cache


def unmount(path: Path) -> None:
    if os.path.ismount(path):
        subprocess.run(["umount", str(path)], check=True)


def packed_trees(cache: Path) -> list[Path]:
    return sorted(p / "root" for p in (cache / "packed").iterdir() if (p / "root").is_dir())


def check_tree(root: Path, ds: sb.Dataset) -> None:
    files, size = sb.tree_size(root)
    if (files, size) != (ds.files, ds.bytes):
        raise RuntimeError(f"tree {root}: {files} files/{size} B, expected {ds.files}/{ds.bytes}")
    sb.check_sample(ds, lambda name: root / name, "hpcstage")


def run_hpcstage(
    ctx: sb.Context, ds: sb.Dataset, src: str, target: str, keep: bool = False
) -> sb.Run:
    cache = cache_on(ctx, target)
    ctx.daemon_pid = 0
    with sb.daemon(ctx, f"daemon-{ds.name}-{target}.log"):
        ping = ctx.logs / f"{ds.name}-ping.json"
        cold = sb.run_timed(
            sb.warmup_argv(ctx, f"s3://{BUCKET}/{sb.PING_KEY}", NODE), log=ping, timeout=120
        )
        if cold.rc != 0:
            raise RuntimeError(f"warmup (ping) exited {cold.rc}: {ping.read_text()}")
        agent = sb.find_agent(NODE, cache)
        cpu0 = sb.proc_cpu_s(agent), sb.proc_cpu_s(ctx.daemon_pid, True), sb.s3_server_cpu(ctx)
        log = ctx.logs / f"{ds.name}-hpcstage-{target}.json"
        timed = sb.run_timed(sb.warmup_argv(ctx, src, NODE), log=log, timeout=ctx.args.timeout)
        cpu = sb.proc_cpu_s(agent) - cpu0[0] + sb.proc_cpu_s(ctx.daemon_pid, True) - cpu0[1]
        server = sb.s3_server_cpu(ctx) - cpu0[2]
        hwm = sb.proc_status_kib(agent, "VmHWM")
        synced = sb.sync_seconds()
        if timed.rc != 0:
            raise RuntimeError(f"warmup exited {timed.rc}: {log.read_text()[-2000:]}")
        doc = json.loads(log.read_text())
    st = doc["requests"][0]["nodes"][NODE]
    trees = packed_trees(cache)
    if len(trees) != 1:
        raise RuntimeError(f"expected one materialised tree in {cache}/packed, found {trees}")
    if ds.name != "million":
        check_tree(trees[0], ds)
    run = sb.Run(
        ds.name,
        "hpcstage",
        timed.seconds,
        ds.files,
        ds.bytes,
        hwm,
        cpu + timed.cpu_s,
        server,
        synced,
    )
    run.extra.update(
        target=target,
        agent_stage_s=st["finished_at"] - st["started_at"],
        fetched=st.get("fetched_files"),
    )
    if not keep:
        unmount(cache)
    return run


def run_peer(ctx: sb.Context, tool: str, ds: sb.Dataset, target: str) -> sb.Run:
    dest = SHM if target == "tmpfs" else ctx.base / "dest"
    dest.mkdir(parents=True, exist_ok=True)
    run = sb.run_peer(dataclasses.replace(ctx, dest=dest), tool, ds)
    run.extra["target"] = target
    return run


# ---------------------------------------------------------------------------- scenarios


def small(ctx: sb.Context, pack_runs: list[dict[str, Any]]) -> None:
    a = ctx.args
    local = ctx.base / "data" / "small"
    sb.make_small(local, a.small_count, a.small_size)
    prefix = "bench/small/"
    import asyncio

    listed = asyncio.run(sb.upload(ctx.dev, local, prefix, a.concurrency))
    if listed != a.small_count:
        raise RuntimeError(f"uploaded {a.small_count}, listed {listed}")
    ds = sb.Dataset("small", local, prefix, a.small_count, a.small_count * a.small_size)
    dataset = f"s3://{BUCKET}/bench/small.hpack/"
    timed = pack(ctx, f"{local}/", dataset, "pack-small.json")
    pack_runs.append(
        {
            "what": "pack small (20,000 x 4 KiB, from a local directory)",
            "seconds": timed.seconds,
            "rss_kib": timed.maxrss_kib,
        }
    )
    say(
        f"  packed {ds.files} files in {timed.seconds:.2f} s,"
        f" peak RSS {timed.maxrss_kib / 1024:.0f} MiB"
    )
    for rep in range(a.repeat):
        for target in a.targets:
            for tool in a.tools:
                if tool == "cp" and target == "tmpfs" and not a.cp_tmpfs:
                    continue
                sb.wait_quiet(a.max_busy, a.quiet_timeout)
                if tool == "hpcstage":
                    run = run_hpcstage(ctx, ds, dataset, target)
                else:
                    run = run_peer(ctx, tool, ds, target)
                run.extra["repeat"] = rep
                ctx.runs.append(run)
                say(f"  [{target}] {show(run)}")
                time.sleep(2)


def million(ctx: sb.Context, pack_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """10^6 files: pack (one process, then a 4-task array), stage, attach."""
    import pyarrow.parquet as pq

    a, out = ctx.args, {}
    # On tmpfs: creating 10^6 files on this VM's ext4 costs ~0.7 ms of kernel time each (cp -r
    # of 20,000 files: 14 s), which would measure the disk, not the pack.
    local = SHM / "million-src"
    shutil.rmtree(local, ignore_errors=True)
    local.parent.mkdir(parents=True, exist_ok=True)
    sb.make_million(local, a.million_count)
    local.chmod(0o755)
    one = f"s3://{BUCKET}/bench/million.hpack/"
    arr = f"s3://{BUCKET}/bench/million-array.hpack/"
    sb.wait_quiet(a.max_busy, a.quiet_timeout)
    timed = pack(ctx, f"{local}/", one, "pack-million.json")
    pack_runs.append(
        {
            "what": f"pack {a.million_count:,} x 1 B, one process",
            "seconds": timed.seconds,
            "rss_kib": timed.maxrss_kib,
        }
    )
    say(f"  pack, one process: {timed.seconds:.1f} s, peak RSS {timed.maxrss_kib / 1024:.0f} MiB")
    sb.wait_quiet(a.max_busy, a.quiet_timeout)
    env = {
        **user_env(ctx),
        **ctx.dev.info.env(),
        "PATH": f"{Path(hpcstage_bin()).parent}:/usr/bin:/bin",
    }
    argv = [hpcstage_bin(), "pack", f"{local}/", arr, "--slurm", "--tasks", "4", "--wait", "--json"]
    argv += ["--log-dir", str(ctx.logs)]
    arr_timed = sb.run_timed(
        argv, env=env, log=ctx.logs / "pack-million-array.json", timeout=a.timeout
    )
    if arr_timed.rc != 0:
        raise RuntimeError(
            f"pack --slurm exited {arr_timed.rc}:"
            f" {(ctx.logs / 'pack-million-array.json').read_text()[-2000:]}"
        )
    pack_runs.append(
        {
            "what": f"pack {a.million_count:,} x 1 B, 4-task Slurm array (3 nodes on 2 cores)",
            "seconds": arr_timed.seconds,
        }
    )
    say(
        f"  pack, 4-task array: {arr_timed.seconds:.1f} s"
        f" (x{timed.seconds / arr_timed.seconds:.2f})"
    )
    out["identical_manifest"] = same_manifest(
        ctx, "bench/million.hpack/", "bench/million-array.hpack/", pq
    )
    say(f"  manifests identical: {out['identical_manifest']}")
    # Stage the packed dataset onto NODE (ext4 cache), the agent's peak RSS.
    ds = sb.Dataset("million", local, "", a.million_count, a.million_count)
    sb.wait_quiet(a.max_busy, a.quiet_timeout)
    run = run_hpcstage(ctx, ds, one, "tmpfs", keep=True)
    ctx.runs.append(run)
    out["stage_s"] = run.seconds
    out["agent_rss_kib"] = run.rss_kib
    say(
        f"  staged onto {NODE} (tmpfs cache): {run.seconds:.1f} s,"
        f" agent peak RSS {run.rss_kib / 1024:.0f} MiB"
    )
    out["attach_s"] = attach(ctx, one)
    say(f"  a job attaching the cached dataset: {out['attach_s']:.3f} s (the agent's staging)")
    return out


def same_manifest(ctx: sb.Context, a: str, b: str, pq: Any) -> bool:
    """The two datasets' version-1 manifests hold the same rows, and their records the same
    segments (names, sizes, SHA-256)."""
    import asyncio

    from hpcstage.packed.dataset import PackedDataset

    async def read(prefix: str) -> tuple[Any, Any]:
        async with sb.make_store(ctx.dev, 8) as store:
            ds = PackedDataset(store, prefix)
            info = await ds.record(1)
            ref = await ds.manifest_ref(info)
            body = await store.read_range(ref, 0, ref.size)
            return info.segments, body

    (seg_a, body_a), (seg_b, body_b) = asyncio.run(read(a)), asyncio.run(read(b))
    import io

    return seg_a == seg_b and pq.read_table(io.BytesIO(body_a)).equals(
        pq.read_table(io.BytesIO(body_b))
    )


def attach(ctx: sb.Context, dataset: str) -> float:
    """A job of alice's on NODE staging the dataset the node holds: the agent's staging time."""
    script = (
        f"#!/bin/bash\n#HPCSTAGE --stage-in={dataset}:m\n"
        'eval "$(hpcstage env || echo exit 1)"\nls $HPCSTAGE_DIR/m/ | head -3\n'
    )
    env = {
        "HPCSTAGE_CONFIG": str(ctx.config),
        "PATH": f"{Path(hpcstage_bin()).parent}:/usr/bin:/bin",
    }
    with sb.daemon(ctx, "daemon-attach.log"):
        # The agent session open first (as on a site, where the daemon keeps it): the attach,
        # not the agent's cold start, is what is measured.
        ping = ctx.logs / "attach-ping.json"
        sb.run_timed(
            sb.warmup_argv(ctx, f"s3://{BUCKET}/{sb.PING_KEY}", NODE), log=ping, timeout=120
        )
        job = ctx.dev.sbatch(
            "alice",
            script,
            f"--nodelist={NODE}",
            f"--output={ctx.dev.workdir('alice')}/%j.out",
            env=env,
        )
        state = ctx.dev.wait_job(job, timeout=600)
        if state != "COMPLETED":
            raise RuntimeError(f"attach job {job} ended {state}")
        doc = json.loads(
            subprocess.run(
                [hpcstage_bin(), "status", str(job), "--json", "--config", str(ctx.config)],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, **env},
            ).stdout
        )
    st = (
        doc["requests"][0]["nodes"][NODE]
        if "requests" in doc
        else doc["jobs"][0]["requests"][0]["nodes"][NODE]
    )
    return float(st["finished_at"] - st["started_at"])


def show(run: sb.Run) -> str:
    text = (
        f"{run.tool:<8} {run.seconds:7.2f} s  {run.files / run.seconds:9,.0f} files/s"
        f"  peak RSS {run.rss_kib / 1024:6.0f} MiB  CPU {run.cpu_s:5.1f} s"
        f"  S3 server CPU {run.server_cpu_s:5.1f} s  sync after {run.sync_s:.2f} s"
    )
    if "agent_stage_s" in run.extra:
        text += f"  (agent {run.extra['agent_stage_s']:.2f} s, GETs {run.extra['fetched']})"
    return text


def table(runs: list[sb.Run]) -> str:
    lines = [
        "| target | tool | median s | files/s | + sync s | vs s5cmd |",
        "|---|---|---|---|---|---|",
    ]
    for target in ("tmpfs", "ext4"):
        med: dict[str, float] = {}
        syncs: dict[str, float] = {}
        for tool in ("hpcstage", "s5cmd", "rclone", "cp"):
            got = [r for r in runs if r.tool == tool and r.extra.get("target") == target]
            if got:
                med[tool] = statistics.median(r.seconds for r in got)
                syncs[tool] = statistics.median(r.sync_s for r in got)
        for tool, secs in med.items():
            files = next(r.files for r in runs if r.tool == tool)
            ratio = med.get("s5cmd", 0) / secs if "s5cmd" in med else 0
            lines.append(
                f"| {target} | {tool} | {secs:.2f} | {files / secs:,.0f}"
                f" | {syncs[tool]:.2f} | {ratio:.1f}x |"
            )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, default=Path("/var/tmp/hpcstage-bench-packed"))
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--small-count", type=int, default=20_000)
    p.add_argument("--small-size", type=int, default=4096)
    p.add_argument("--million-count", type=int, default=1_000_000)
    p.add_argument("--only", action="append", choices=("small", "million"))
    p.add_argument("--targets", nargs="+", default=["tmpfs", "ext4"])
    p.add_argument("--tools", nargs="+", default=["hpcstage", "s5cmd", "rclone", "cp"])
    p.add_argument("--cp-tmpfs", action="store_true", help="also cp -r into tmpfs")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--timeout", type=float, default=7200)
    p.add_argument("--max-busy", type=float, default=0.10)
    p.add_argument("--quiet-timeout", type=float, default=600)
    args = p.parse_args()
    args.scenarios = args.only or ["small", "million"]
    args.s5cmd_workers = args.rclone_transfers = args.rclone_checkers = args.concurrency
    args.profile = None
    return args


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the dev cluster starts Slurm and sshd, and tmpfs is mounted")
    base: Path = args.base.resolve()
    shutil.rmtree(base / "data", ignore_errors=True)
    for path in (base, base / "data", base / "dest", base / "logs"):
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o755)
    dev = DevCluster(base / "cluster", name="benchp")
    dev.down(purge=True)
    dev.up(progress=lambda m: say(f"  starting {m}"))
    ctx: sb.Context | None = None
    pack_runs: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    try:
        config = write_site_config(dev, concurrency=args.concurrency, name="bench.toml")
        rclone = str(Path(sys.executable).parent / "rclone")
        ctx = sb.Context(
            args, dev, base, config, sb.s5cmd_binary(), rclone, base / "logs", base / "dest"
        )
        ping = base / "data" / "ping"
        ping.mkdir()
        (ping / "one").write_bytes(b"1")
        import asyncio

        asyncio.run(sb.upload(dev, ping, "bench/ping/", 1))
        if "small" in args.scenarios:
            small(ctx, pack_runs)
        if "million" in args.scenarios:
            extra = million(ctx, pack_runs)
        say("\n" + table(ctx.runs))
        for p in pack_runs:
            say(f"  {p}")
        out = (
            Path(__file__).resolve().parent
            / "results"
            / f"packed-{time.strftime('%Y%m%d-%H%M%S')}.json"
        )
        out.write_text(
            json.dumps(
                {
                    "runs": [dataclasses.asdict(r) for r in ctx.runs],
                    "pack": pack_runs,
                    "million": extra,
                },
                indent=2,
            )
            + "\n"
        )
        say(f"raw results: {out}")
        return 0
    finally:
        if ctx is not None and ctx.daemon_pid:
            sb.stop_daemon(ctx.daemon_pid)
        with contextlib.suppress(Exception):
            unmount(dev.info.node_cache(NODE))
        dev.down(purge=True)
        shutil.rmtree(base / "data", ignore_errors=True)
        shutil.rmtree(SHM, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
