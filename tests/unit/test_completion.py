"""Shell completion through the real ``hpcstage`` command and click's protocol (the shell
sets ``_HPCSTAGE_COMPLETE``, COMP_WORDS and COMP_CWORD and reads the candidates), with the
commands' modules loaded lazily."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HPCSTAGE = Path(sys.executable).parent / "hpcstage"


def _complete(words: str, shell: str = "bash") -> list[str]:
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    env = {
        **os.environ,
        "_HPCSTAGE_COMPLETE": f"{shell}_complete",
        "COMP_WORDS": words,
        "COMP_CWORD": str(cword),
    }
    done = subprocess.run(
        [str(HPCSTAGE)], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    return [line for line in done.stdout.splitlines() if line]


@pytest.mark.parametrize(
    ("words", "candidates"),
    [
        ("hpcstage st", ["plain,status"]),
        ("hpcstage a", []),  # the agent is internal (hidden)
        ("hpcstage trash ", ["plain,ls", "plain,restore"]),
        ("hpcstage config s", ["plain,show", "plain,systemd-unit"]),
        ("hpcstage status --j", ["plain,--json"]),
        (
            "hpcstage daemon --log-format ",
            ["plain,auto", "plain,text", "plain,json", "plain,journal"],
        ),
        ("hpcstage config check ", ["file,"]),  # a FILE argument: the shell completes paths
    ],
)
def test_bash_candidates(words: str, candidates: list[str]) -> None:
    assert _complete(words) == candidates


def test_every_visible_command_is_offered() -> None:
    names = [line.removeprefix("plain,") for line in _complete("hpcstage ")]
    assert "env" in names and "daemon" in names and "pack" in names
    assert "agent" not in names and "pack-step" not in names


def test_zsh_gets_the_help_too() -> None:
    kind, name, summary = _complete("hpcstage war", "zsh")
    assert (kind, name) == ("plain", "warmup")
    assert summary.startswith("Prefetch SRC into the node-local cache")


def test_bash_source_defines_the_completion() -> None:
    env = {**os.environ, "_HPCSTAGE_COMPLETE": "bash_source"}
    done = subprocess.run([str(HPCSTAGE)], env=env, capture_output=True, text=True, check=True)
    assert "complete -o nosort -F _hpcstage_completion hpcstage" in done.stdout
