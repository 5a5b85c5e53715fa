"""examples/slurm/job_submit.lua run by lua5.1 (the Lua Debian 12's Slurm links), its
admin_comment read back by the daemon's decoder: what reaches the daemon is what the script
said, and a typo on a #HPCSTAGE line fails the job instead of vanishing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from hpcstage.core.directives import (
    ParsedDirectives,
    decode_admin_comment,
    parse_args,
    parse_script,
)

LUA = shutil.which("lua5.1")
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "slurm" / "job_submit.lua"

pytestmark = pytest.mark.skipif(LUA is None, reason="lua5.1 is not installed (scripts/bootstrap)")

DRIVER = """
slurm = {SUCCESS = 0, ERROR = -1}
function slurm.log_debug() end
function slurm.log_info() end
function slurm.log_user() end
dofile(arg[1])
local f = io.open(arg[2], "rb")
local job = {script = f:read("*a"), admin_comment = "site note"}
f:close()
assert(slurm_job_submit(job, {}, 1000) == slurm.SUCCESS)
io.write(job.admin_comment or "")
"""


def submitted(tmp_path: Path, script: str) -> str:
    """The admin_comment job_submit.lua writes for a batch script."""
    driver, batch = tmp_path / "driver.lua", tmp_path / "job.sh"
    driver.write_text(DRIVER)
    batch.write_text(script)
    assert LUA is not None
    done = subprocess.run(
        [LUA, str(driver), str(SCRIPT), str(batch)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_directives_reach_the_daemon_as_written(tmp_path: Path) -> None:
    script = (
        "#!/bin/bash\n"
        "#SBATCH -N 1 --stage-in=s3://datasets/a%20b/:in\n"
        "#HPCSTAGE --stage-in s3://datasets/ref/genome.fa\n"
        "  # an indented comment does not end the block\n"
        "#HPCSTAGE --stage-out=results:s3://results/%j/\n"
        "srun true\n"
        "#HPCSTAGE --stage-in=s3://datasets/after-the-command/\n"
    )
    comment = submitted(tmp_path, script)
    assert comment.startswith("site note hpcstage:v1:")  # the site's own text is kept
    decoded = decode_admin_comment(comment)
    assert decoded == [
        "--stage-in=s3://datasets/a%20b/:in",
        "--stage-in=s3://datasets/ref/genome.fa",
        "--stage-out=results:s3://results/%j/",
    ]
    # The daemon reading the script itself finds the same.
    parsed, from_script = parse_args(decoded), parse_script(script)

    def what(p: ParsedDirectives) -> list[tuple[object, object]]:
        return [(d.src, d.dest) for d in (*p.stage_in, *p.stage_out)]

    assert what(parsed) == what(from_script) and len(what(parsed)) == 3
    assert not parsed.errors


@pytest.mark.parametrize(
    "typo", ["--stage_in=s3://datasets/x/", "--stagein=s3://datasets/x/", "stage-in=s3://d/x/"]
)
def test_a_typo_on_a_hpcstage_line_fails_the_job_by_name(tmp_path: Path, typo: str) -> None:
    script = f"#!/bin/bash\n#HPCSTAGE --stage-in=s3://datasets/ok/ {typo}\nsrun true\n"
    decoded = decode_admin_comment(submitted(tmp_path, script))
    assert decoded is not None
    parsed = parse_args(decoded)
    assert [str(s.src.url) for s in parsed.stage_in] == ["s3://datasets/ok/"]
    assert len(parsed.errors) == 1 and parsed.errors[0].text == typo
    assert "expected --stage-in=VALUE or --stage-out=VALUE" in parsed.errors[0].message
    # As the daemon would say reading the script itself: the job does not run without it.
    assert parse_script(script).errors


def test_sbatch_options_on_sbatch_lines_are_not_directives(tmp_path: Path) -> None:
    script = "#!/bin/bash\n#SBATCH --time=5 -N 2 --gres=gpu:1\nsrun true\n"
    assert submitted(tmp_path, script) == "site note"


def readme_job() -> str:
    """The batch script README.md shows users ("What users write")."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## What users write") :]
    start = section.index("```bash\n") + len("```bash\n")
    return section[start : section.index("\n```", start)] + "\n"


def test_the_readmes_job_reaches_the_daemon_with_its_comments_left_out(tmp_path: Path) -> None:
    script = readme_job()
    assert "#HPCSTAGE --stage-in=s3://datasets/docking/ligands/ " in script
    assert "# a prefix" in script  # the trailing comments this is about
    decoded = decode_admin_comment(submitted(tmp_path, script))
    assert decoded is not None
    parsed, from_script = parse_args(decoded), parse_script(script)
    assert not parsed.errors and not from_script.errors
    assert [d.text for d in parsed.stage_in + parsed.stage_out] == [
        "--stage-in=s3://datasets/docking/ligands/",
        "--stage-in=s3://datasets/docking/receptor.pdb:inputs/",
        "--stage-out=results:s3://results/docking/%u/%j/",
    ]


def test_quotes_and_backslashes_as_sbatch_reads_them(tmp_path: Path) -> None:
    script = (
        "#!/bin/bash\n"
        "#HPCSTAGE --stage-in='s3://datasets/q/#not-a-comment/' \"--stage-in=s3://d/b/\"\n"
        "#HPCSTAGE --stage-in=s3://datasets/e/\\#x/:in\n"
        "srun true\n"
    )
    decoded = decode_admin_comment(submitted(tmp_path, script))
    assert decoded == [
        "--stage-in=s3://datasets/q/#not-a-comment/",
        "--stage-in=s3://d/b/",
        "--stage-in=s3://datasets/e/#x/:in",
    ]
    assert [(s.src, s.dest) for s in parse_script(script).stage_in] == [
        (s.src, s.dest) for s in parse_args(decoded).stage_in
    ]


def test_an_open_quote_fails_the_job_with_the_line(tmp_path: Path) -> None:
    script = "#!/bin/bash\n#HPCSTAGE --stage-in='s3://datasets/x/\nsrun true\n"
    decoded = decode_admin_comment(submitted(tmp_path, script))
    # Returned as the line, so that it cannot pass for a directive (see below).
    assert decoded == ["#HPCSTAGE --stage-in='s3://datasets/x/"]
    assert parse_args(decoded).errors and parse_script(script).errors


def found(parsed: ParsedDirectives) -> tuple[bool, list[tuple[object, ...]]]:
    """(refused, what is staged): a refused job stages nothing."""
    if parsed.errors:
        return True, []
    return False, [(d.src, d.dest) for d in (*parsed.stage_in, *parsed.stage_out)]


# Minimal scripts on which tests/unit/test_fuzz_directives.py found job_submit.lua and the
# daemon's reading of the script at odds (4f7f2a1).
DISAGREED = [
    # The daemon reads '#HPCSTAGE' as a bare prefix, as sbatch reads '#SBATCH'; Lua wanted a
    # blank after it and dropped the line: the job ran without its input.
    "#!/bin/bash\n#HPCSTAGE--stage-in=s3://bucket/x/\n",
    "#!/bin/bash\n#HPCSTAGEfoo\n",  # refused by the daemon; Lua saw no directive at all
    # An open quote: Lua passed the line on whole as bad=..., which the daemon then read as a
    # directive (DEST "x '") instead of refusing the line.
    "#!/bin/bash\n#HPCSTAGE --stage-in=s3://bucket/k:x '\n",
    '#!/bin/bash\n#HPCSTAGE --stage-out=r:s3://bucket/o/a" b\n',
    # Lua dropped a final '\r' before splitting; the daemon keeps it (escaped, it is a
    # control character in the value).
    "#!/bin/bash\n#HPCSTAGE --stage-in=s3://bucket/k\\\r\n",
    # After the first command no line is a directive, not even a broken one (Lua stops
    # reading there; the daemon refused the job for it).
    "#!/bin/bash\nsrun true\n#HPCSTAGE --stage_in=s3://bucket/x\n",
    "#!/bin/bash\ncat > next.sh <<EOF\n#HPCSTAGE --stage-in='s3://bucket/$X\nEOF\n",
]


@pytest.mark.parametrize("script", DISAGREED, ids=repr)
def test_job_submit_lua_and_the_daemon_agree_on_odd_lines(tmp_path: Path, script: str) -> None:
    by_daemon = found(parse_script(script))
    decoded = decode_admin_comment(submitted(tmp_path, script)) or []
    assert found(parse_args(decoded)) == by_daemon


def test_a_bad_item_is_never_read_as_a_directive() -> None:
    # What an older job_submit.lua writes for '#HPCSTAGE --stage-in=s3://bucket/k:x ' (an
    # open quote): sites keep their copy of the script, so the daemon must refuse it too.
    decoded = decode_admin_comment("hpcstage:v1:bad=--stage-in=s3://bucket/k:x%20%27;end")
    assert decoded is not None
    parsed = parse_args(decoded)
    assert parsed.stage_in == ()
    assert "--stage-in=s3://bucket/k:x '" in str(parsed.errors[0])
