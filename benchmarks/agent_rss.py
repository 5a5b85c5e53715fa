#!/usr/bin/env python3
"""The agent's own memory while staging N one-byte files, with no daemon around it.

``stagein.py --million`` measures the agent as the daemon drives it, which includes the calls
the daemon makes on its own schedule (the periodic eviction pass). This script separates the
staging itself: it starts ``hpcstage agent`` as a plain subprocess, speaks its JSON-lines
protocol on stdin/stdout exactly as the daemon does (``hello``, then one ``stage`` of a
shared-filesystem prefix) and samples the agent's VmRSS/VmHWM every few seconds. No SSH, S3,
Slurm or root needed.

    .venv/bin/python benchmarks/agent_rss.py --count 1000000
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from stagein import make_million  # the same 1,000-per-directory layout as its --million

from hpcstage.agent.context import DEFAULT_CACHE, DEFAULT_TRANSFER
from hpcstage.core.directives import SourceKind
from hpcstage.protocol.messages import (
    NO_LIMITS,
    AgentStoreSettings,
    HelloRequest,
    SourceSpec,
    StageItem,
    StageRequest,
)
from hpcstage.protocol.wire import to_wire


def status_mib(pid: int) -> tuple[int, int]:
    """VmRSS and VmHWM of ``pid`` in MiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024


def call(stdin: IO[bytes], stdout: IO[bytes], call_id: int, op: str, params: Any) -> Any:
    """One call; progress events are skipped; returns the result or raises on an error."""
    stdin.write((json.dumps({"id": call_id, "op": op, "params": params}) + "\n").encode())
    stdin.flush()
    while line := stdout.readline():
        message = json.loads(line)
        if message.get("id") != call_id or message["event"] == "progress":
            continue
        if message["event"] == "error":
            raise RuntimeError(f"{op}: {message['message']}")
        return message["data"]
    raise RuntimeError(f"{op}: the agent exited")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=1_000_000)
    p.add_argument("--base", type=Path, default=Path("/var/tmp/hpcstage-agent-rss"))
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    args = p.parse_args()
    base = args.base.resolve()
    shutil.rmtree(base, ignore_errors=True)
    src, cache = base / "src", base / "cache"
    try:
        start = time.perf_counter()
        make_million(src, args.count)
        print(f"{args.count} files in {time.perf_counter() - start:.0f} s", flush=True)
        agent_bin = str(Path(sys.executable).parent / "hpcstage")
        argv = [agent_bin, "agent", "--node", "bench", "--cache-dir", str(cache)]
        agent = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert agent.stdin is not None
        assert agent.stdout is not None
        # The store is unused: the source is a path.
        store = AgentStoreSettings(
            "http://127.0.0.1:9", "us-east-1", "path", True, "", 128, 10, 60, None
        )
        transfer = dataclasses.replace(DEFAULT_TRANSFER, concurrency=args.concurrency)
        call(
            agent.stdin,
            agent.stdout,
            1,
            "hello",
            to_wire(HelloRequest(store, transfer, DEFAULT_CACHE, None)),
        )
        samples: list[tuple[float, int, int]] = []
        done = threading.Event()
        t0 = time.perf_counter()

        def sample() -> None:
            while not done.wait(args.every):
                samples.append((time.perf_counter() - t0, *status_mib(agent.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        source = SourceSpec(SourceKind.PATH, "", "", str(src), [], [], "")
        item = StageItem(1, source, "data", None, "", None, "")
        # Staged for this user (a path source is read as the job's user would read it).
        stage = StageRequest("bench", getpass.getuser(), view=True, items=[item], rates=NO_LIMITS)
        result = call(agent.stdin, agent.stdout, 2, "stage", to_wire(stage))
        seconds = time.perf_counter() - t0
        rss, hwm = status_mib(agent.pid)
        done.set()
        sampler.join()
        agent.stdin.close()
        agent.wait(timeout=600)
        files = result["items"][0]["files_done"]
        print(f"staged {files} files in {seconds:.0f} s ({files / seconds:.0f} files/s)")
        print(f"agent peak RSS (VmHWM) {hwm} MiB, RSS at the end {rss} MiB")
        step = max(1, len(samples) // 30)
        curve = ", ".join(f"{t:.0f} s: {r}/{h}" for t, r, h in samples[::step])
        print(f"RSS / peak so far (MiB): {curve}")
        return 0 if files == args.count else 1
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
