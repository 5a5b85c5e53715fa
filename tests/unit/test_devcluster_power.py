"""The dev cluster's ResumeProgram under the way Slurm 24.11 runs it.

24.11's slurmscriptd starts ResumeProgram in a process group of its own and, once the program
has exited, kills that whole group (src/common/run_command.c, run_command_waitpid_timeout:
``_kill_pg(pid); /* kill children too */``). 22.05's slurmctld forked it and only reaped it.
A "boot" left running in the background of resume.sh (waiting for BASE/power/hold, then
starting slurmd) must therefore live outside that group, or it dies with the script.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from devcluster import render


def _layout(base: Path) -> render.SlurmLayout:
    return render.SlurmLayout(
        name="t",
        base=base,
        hostname="vm",
        ctld_port=1,
        node_ports={"n1": 2},
        munge_socket=base / "munge.socket",
        slurm_version=(24, 11),
        cloud_ports={"c1": 3, "c2": 4},
    )


def _install(base: Path) -> Path:
    """resume.sh with stand-ins for scontrol (show hostnames) and slurmd (records its args)."""
    lay = _layout(base)
    for d in ("etc", "power", "log", "bin"):
        (base / d).mkdir()
    tools = {
        "scontrol": '#!/bin/sh\n[ "$2" = hostnames ] && echo "$3" | tr , "\\n"\n',
        "slurmd": f'#!/bin/sh\necho "$@" >> {base}/slurmd.calls\n',
    }
    for name, text in tools.items():
        (base / "bin" / name).write_text(text)
        (base / "bin" / name).chmod(0o755)
    script = lay.etc / "resume.sh"
    script.write_text(
        render.resume_script(
            lay, f"MARK={base}", str(base / "bin" / "slurmd"), str(base / "bin" / "scontrol")
        )
    )
    script.chmod(0o755)
    return script


def _run_like_slurmscriptd(script: Path, hosts: str) -> None:
    """Run ``script hosts`` as 24.11's run_command() does: own process group, a bare
    environment, output to a pipe read to its end, then the group killed once it exited."""
    child = subprocess.Popen(
        [str(script), hosts],
        env={"SLURM_CONF": "/nonexistent"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        process_group=0,
    )
    out, _ = child.communicate(timeout=30)
    assert child.returncode == 0, out
    for sig in (signal.SIGTERM, signal.SIGKILL):  # _kill_pg(): TERM, 10 ms, KILL
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, sig)
        time.sleep(0.01)


def _wait_for(path: Path, lines: int, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(found := path.read_text().splitlines()) >= lines:
            return found
        time.sleep(0.05)
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("held", [False, True])
def test_a_boot_outlives_the_process_group_slurm_24_11_kills(tmp_path: Path, held: bool) -> None:
    script = _install(tmp_path)
    hold = tmp_path / "power" / "hold"
    if held:
        hold.touch()  # the test holds the boot: the script exits long before it happens
    _run_like_slurmscriptd(script, "c1,c2")
    if held:
        time.sleep(1.0)  # the boots wait (and, before the fix, died here with the group)
        assert not (tmp_path / "slurmd.calls").exists()
        hold.unlink()
    calls = sorted(_wait_for(tmp_path / "slurmd.calls", 2))
    conf = tmp_path / "etc" / "slurm.conf"
    assert calls == [f"-b -f {conf} -N c1", f"-b -f {conf} -N c2"]
    events = (tmp_path / "power" / "events").read_text().split("\n")
    assert sorted(e.split(" ", 1)[1] for e in events if e) == ["boot c1", "boot c2"]
