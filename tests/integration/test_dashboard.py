"""The dashboard in a real browser: headless Chromium logs in through `hpcstage dashboard`'s
link and reads what the page shows about a job the daemon staged on the dev cluster."""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devcluster.cluster import DevCluster

from .staging import Stager, make_dataset, running_stager, small_files, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stager(cluster: DevCluster) -> Iterator[Stager]:
    yield from running_stager(cluster, "dashboard")


def chromium(tmp: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on ``url``, with a profile of its own and nothing but loopback."""
    browser = shutil.which("chromium")
    assert browser, "no chromium: ./scripts/bootstrap --tests installs it (Debian's package)"
    command = [
        browser,
        "--headless",
        "--no-sandbox",  # the tests run as root
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        "--window-size=1400,1000",
        *args,
        url,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=True)


def sections(dom: str) -> dict[str, str]:
    """The page's sections by their <h2> heading."""
    parts = re.split(r"<h2>(.*?)</h2>", dom)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def row(table: str, *cells: str) -> str:
    """The one table row that starts with ``cells``."""
    start = "".join(f"<td>{c}</td>" for c in cells)
    rows: list[str] = re.findall(r"<tr>.*?</tr>", table, re.S)
    found = [r for r in rows if r.startswith("<tr>" + start)]
    assert len(found) == 1, (start, table)
    return found[0]


def test_the_dashboard_shows_a_staged_job_its_node_and_its_wait_in_chromium(
    stager: Stager, tmp_path: Path
) -> None:
    def node_rows() -> dict[str, dict[str, Any]]:  # as an admin (root) sees them
        return {n["node"]: n for n in stager.client.get("/api/v1/dashboard")["nodes"]}

    # A first answer from every node before the job: throughput is the growth between two.
    wait_until(
        "every node's cache usage",
        lambda: all(n["age"] is not None for n in node_rows().values()),
        60,
        stager.log,
    )
    src, _ = make_dataset(stager.dev, small_files(8, size=4096))
    script = f'#!/bin/bash\n#HPCSTAGE --stage-in={src}:data\neval "$(hpcstage env)"\nsleep 600\n'
    job = stager.submit("alice", script, "--job-name=dash-demo")
    missing = f"s3://datasets/nothing-{uuid.uuid4().hex[:6]}/gone.bin"
    failing = f'#!/bin/bash\n#HPCSTAGE --stage-in={missing}\neval "$(hpcstage env)"\n'
    broken = stager.submit("alice", failing, "--job-name=dash-missing")
    bobs = stager.submit("bob", f"#!/bin/bash\n#HPCSTAGE --stage-in={src}\n", "--hold")
    doc = stager.wait_doc(
        job,
        "running with its inputs ready",
        lambda d: (
            d["state"] == "RUNNING"
            and bool(d["nodes"])
            and d["staging"] == {d["nodes"][0]: "ready"}
        ),
    )
    node = doc["nodes"][0]
    stager.wait_doc(broken, "failed: a missing object", lambda d: bool(d["failure"]))
    stager.wait_doc(bobs, "known to the daemon", lambda d: d["job_id"] == bobs)

    # A second answer (after FRESH_SECONDS), counting the job's 32 KiB.
    wait_until(
        f"{node}'s throughput", lambda: bool(node_rows()[node]["bytes_per_s"]), 60, stager.log
    )

    link = stager.cli("alice", "dashboard").stdout.strip()
    # The login redirects to the page; in 5 s of the browser's virtual time, the page's
    # script has refreshed it in place twice (what is checked below is the refreshed page).
    dom = chromium(tmp_path, link, "--virtual-time-budget=5000", "--dump-dom").stdout
    assert "as seen by alice (your jobs)" in dom, dom
    assert re.search(r'<body data-refreshes="[1-9]', dom), dom[:300]
    page = sections(dom)
    staging = row(page["Staging now"], str(job), "alice", "dash-demo", "RUNNING")
    assert f"{node}: " in staging and "8/8 files, 32.0 KiB of 32.0 KiB" in staging, staging
    assert re.search(
        r"(waited [0-9.]+ s|ready [0-9.]+ s before start)",
        row(page["Waits at job start"], str(job), "alice", node),
    )
    assert (
        missing in page["Recent errors"]
        and f"<td>{broken}</td><td>alice</td>" in page["Recent errors"]
    )
    cache = row(page["Node caches"], node)
    # Other tests' data may share the node's cache: the job's 32 KiB at least.
    assert re.search(r"<td>.*[0-9.]+ [KMGT]iB of [0-9.]+ [KMGT]iB</td><td>[0-9]+</td>", cache)
    assert re.search(r"<td>[0-9.]+ (B|KiB|MiB)/s</td>", cache), cache
    assert "<td>bob</td>" not in dom  # bob's job: not alice's to see

    shot = tmp_path / "dashboard.png"
    again = stager.cli("alice", "dashboard").stdout.strip()
    chromium(tmp_path, again, f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"\ndashboard screenshot: {shot}")  # pytest -s shows where to look
