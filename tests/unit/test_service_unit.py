"""The daemon's systemd unit (hpcstage.service.unit, `hpcstage config systemd-unit`) and the
exit statuses it relies on. Checked by systemd's own parser where systemd-analyze exists."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hpcstage import cli as cli_module
from hpcstage.service.unit import EX_CONFIG, exec_argument, render_unit

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ANALYZE = shutil.which("systemd-analyze")


def directives(unit: str) -> dict[str, list[str]]:
    """Key -> values of a unit file's directives (comments and sections left out)."""
    found: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def verify(unit_file: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, "verify", str(unit_file)], capture_output=True, text=True, check=False
    )


def test_the_example_is_what_the_command_writes() -> None:
    example = (EXAMPLES / "systemd" / "hpcstage-daemon.service").read_text()
    assert example == render_unit(
        "/opt/hpcstage/bin/hpcstage",
        "/etc/hpcstage/site.toml",
        "hpcstage",
        "/opt/hpcstage/share/doc/hpcstage/install.md",
    )


def test_the_unit_restarts_on_errors_and_a_lost_lock_but_not_on_a_bad_config() -> None:
    unit = directives(render_unit("/sw/hpcstage/bin/hpcstage", "/etc/site.toml", "stager"))
    assert unit["ExecStart"] == ['"/sw/hpcstage/bin/hpcstage" daemon --config "/etc/site.toml"']
    assert unit["User"] == ["stager"]
    assert unit["Restart"] == ["on-failure"]  # any non-zero status: 1 and 3 included
    assert unit["RestartPreventExitStatus"] == [str(EX_CONFIG)]
    assert "Documentation" not in unit


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("/opt/hpcstage/bin/hpcstage", '"/opt/hpcstage/bin/hpcstage"'),
        ("/sw/my apps/hpcstage", '"/sw/my apps/hpcstage"'),
        ("/etc/100%/site.toml", '"/etc/100%%/site.toml"'),
        ("/etc/$HOME/a.toml", '"/etc/$$HOME/a.toml"'),
        ('/etc/say "hi"\\x', '"/etc/say \\"hi\\"\\\\x"'),
    ],
)
def test_exec_arguments_are_quoted_for_systemd(value: str, written: str) -> None:
    assert exec_argument(value) == written
    # The command itself: no variables are expanded in it, so its $ stays single.
    assert exec_argument(value, command=True) == written.replace("$$", "$")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("bin/hpcstage", "/etc/site.toml", "hpcstage"), "must be an absolute path"),
        (("/opt/bin/hpcstage", "site.toml", "hpcstage"), "must be an absolute path"),
        (("/opt/bin/hpcstage", "/etc/site.toml", "Root; rm"), "not a valid user name"),
        (("/opt/bin/hpcstage", "/etc/site.toml", ""), "not a valid user name"),
        (("/opt/bin/hpc\nstage", "/etc/site.toml", "hpcstage"), "control characters"),
    ],
)
def test_bad_values_are_refused(args: tuple[str, str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_unit(*args)


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_parses_the_unit_and_finds_the_command_through_odd_paths(
    tmp_path: Path,
) -> None:
    # A path with a space, % and $: only quoted and escaped right does systemd find it.
    odd = tmp_path / "my apps %i $HOME" / "bin"
    odd.mkdir(parents=True)
    command = odd / "hpcstage"
    command.write_text("#!/bin/sh\nexit 0\n")
    command.chmod(0o755)
    unit_file = tmp_path / "hpcstage-daemon.service"
    unit_file.write_text(render_unit(str(command), "/etc/100% site.toml", "root", str(tmp_path)))
    done = verify(unit_file)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    # The same check fails when the command is not where the unit says.
    command.unlink()
    done = verify(unit_file)
    assert done.returncode != 0 and "hpcstage" in done.stderr, done.stderr


def test_the_cli_prints_the_unit(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text("")
    runner = CliRunner()
    args = ["config", "systemd-unit", str(config), "--user", "svc", "--exec", "/sw/bin/hpcstage"]
    result = runner.invoke(cli_module.cli, args)
    assert result.exit_code == 0, result.output
    assert directives(result.stdout)["ExecStart"] == [
        f'"/sw/bin/hpcstage" daemon --config "{config}"'
    ]
    assert result.stderr == ""
    # A file that does not exist yet is named with a warning; a bad user name is refused.
    missing = tmp_path / "later.toml"
    result = runner.invoke(cli_module.cli, ["config", "systemd-unit", str(missing)])
    assert result.exit_code == 0
    assert f"{missing} does not exist (yet)" in result.stderr
    assert f'--config "{missing}"' in result.stdout
    result = runner.invoke(cli_module.cli, ["config", "systemd-unit", str(config), "--user", "A"])
    assert result.exit_code == 2
    assert "not a valid user name: 'A'" in result.stderr
    assert result.stdout == ""


def test_the_daemon_exits_78_on_an_invalid_configuration(tmp_path: Path) -> None:
    broken = tmp_path / "site.toml"
    broken.write_text("[transfer]\nconcurrency = 'lots'\n")
    for config in (broken, tmp_path / "missing.toml"):
        done = _daemon(config)
        assert done.returncode == EX_CONFIG, done.stderr
        assert done.stderr.startswith("hpcstage: error: "), done.stderr
        assert str(config) in done.stderr
        assert "Traceback" not in done.stderr


def _daemon(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hpcstage", "daemon", "--config", str(config), "--no-api"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _site(tmp_path: Path, state_dir: Path, state_url: str = "") -> Path:
    text = (EXAMPLES / "site.toml").read_text()
    assert 'state_dir = "/var/lib/hpcstage"' in text and 'state_url = ""' in text
    config = tmp_path / "site.toml"
    config.write_text(
        text.replace('state_dir = "/var/lib/hpcstage"', f'state_dir = "{state_dir}"').replace(
            'state_url = ""', f'state_url = "{state_url}"'
        )
    )
    return config


def test_the_daemon_creates_its_state_dir_or_says_how(tmp_path: Path) -> None:
    # Missing: created, private to the service account. (The unreachable state database
    # then stops the daemon with exit 1, an error worth restarting after.)
    state_dir = tmp_path / "var" / "lib" / "hpcstage"
    done = _daemon(_site(tmp_path, state_dir, "postgresql+psycopg://nobody@127.0.0.1:9/none"))
    assert done.returncode == 1, done.stderr
    assert "cannot reach the state database none" in done.stderr
    assert state_dir.is_dir() and state_dir.stat().st_mode & 0o777 == 0o700
    # Cannot be created: exit 78 (not restarted) with what to do.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = _daemon(_site(tmp_path, blocker / "state"))
    assert done.returncode == EX_CONFIG, done.stderr
    assert f"site.state_dir {blocker / 'state'}: cannot create it (Not a directory)" in done.stderr
    assert "install -d -o " in done.stderr and "Traceback" not in done.stderr


def test_agents_run_the_daemons_own_command_unless_one_is_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hpcstage.staging.pool import agent_command, own_command

    # Run as /sw/.../bin/hpcstage (a module's prefix, or systemd's ExecStart=): that path.
    monkeypatch.setattr(sys, "argv", ["/sw/hpcstage/0.1.0/bin/hpcstage", "daemon"])
    assert agent_command("") == "/sw/hpcstage/0.1.0/bin/hpcstage agent"
    monkeypatch.setattr(sys, "argv", ["/sw/my apps/bin/hpcstage", "daemon"])
    assert agent_command("") == "'/sw/my apps/bin/hpcstage' agent"  # one word for the shell
    # python -m hpcstage: the hpcstage next to this interpreter.
    monkeypatch.setattr(sys, "argv", ["/x/hpcstage/__main__.py", "daemon"])
    assert own_command() == str(Path(sys.executable).parent / "hpcstage")
    assert agent_command("/opt/hs/bin/hpcstage agent") == "/opt/hs/bin/hpcstage agent"
