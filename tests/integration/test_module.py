"""No-root install through Lmod: an unprivileged user runs scripts/install-prefix, then uses
hpcstage through `module load`, and `module unload` gives the environment back unchanged.

Runs as root (it creates the dev users and switches to them with `runuser -l`, a real login
shell, so that /etc/profile.d/lmod.sh defines `module`). The install builds from this checkout,
which alice can read but not write, and installs the dependencies from the machine's pip index
into a fresh venv, so the module fixture takes about half a minute per prefix.
"""

from __future__ import annotations

import base64
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devcluster.users import ensure_all

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
INSTALL_PREFIX = REPO / "scripts" / "install-prefix"
USER = "alice"
LMOD_PROFILE = Path("/etc/profile.d/lmod.sh")
INSTALL_TIMEOUT = 500  # below pytest-timeout (600 s) so the failure shows the command

# Variables that Lmod itself writes on every `module` command and keeps after the last module is
# unloaded and the last directory unused (seen with Debian 12's lmod 8.6.19). They are Lmod's
# bookkeeping, not our module's doing, so they are the only ones exempt from the exact comparison;
# their contents are still checked not to mention hpcstage or the prefix (_check_bookkeeping).
#   _ModuleTable_Sz_            number of chunks of the saved module table
#   _ModuleTable001_, 002_, ... base64 chunks of that table; how many depends on its length, and
#                               Lmod leaves chunks beyond _ModuleTable_Sz_ behind, stale.
#   __LMOD_REF_COUNT_PATH       per-directory reference counts of PATH / MODULEPATH / MANPATH;
#   __LMOD_REF_COUNT_MODULEPATH created by the first prepend/`module use` and never removed.
#   __LMOD_REF_COUNT_MANPATH
# MANPATH itself: Lmod's profile sets it to "DIR:" (the empty entry: "and the system's
# pages"); a prepend and its removal leave "DIR::", which means the same to man(1). So
# MANPATH is compared without its empty entries, and must keep one if it had one.
LMOD_TABLE_SIZE = "_ModuleTable_Sz_"
LMOD_TABLE_CHUNK = re.compile(r"_ModuleTable(\d{3})_")
LMOD_REF_COUNTS = {
    "__LMOD_REF_COUNT_PATH": "PATH",
    "__LMOD_REF_COUNT_MODULEPATH": "MODULEPATH",
    "__LMOD_REF_COUNT_MANPATH": "MANPATH",
}


def _is_lmod_bookkeeping(name: str, extra: frozenset[str] = frozenset()) -> bool:
    return (
        name == LMOD_TABLE_SIZE
        or LMOD_TABLE_CHUNK.fullmatch(name) is not None
        or name in LMOD_REF_COUNTS
        or name in extra
    )


# --------------------------------------------------------------------------------------------
# helpers


def _show(proc: subprocess.CompletedProcess[str]) -> str:
    return (
        f"$ {shlex.join(proc.args)}\nexit status {proc.returncode}\n"
        f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )


def as_user(script: str, *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a login bash of USER (the environment a user gets on a login node)."""
    return subprocess.run(
        ["runuser", "-l", USER, "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd="/",
    )


def read_env(path: Path) -> dict[str, str]:
    """Parse `env -0` output (exported bash functions span several lines, hence -0)."""
    env: dict[str, str] = {}
    for entry in path.read_bytes().split(b"\0"):
        if entry:
            name, _, value = entry.decode().partition("=")
            env[name] = value
    return env


def _normpath_list(value: str) -> list[str]:
    return [os.path.normpath(p) if p else p for p in value.split(":")]


def _man_entries(value: str) -> tuple[list[str], bool]:
    """MANPATH's directories, and whether it has an empty entry (the system's pages)."""
    entries = value.split(":")
    return [e for e in entries if e], "" in entries


def env_differences(
    before: dict[str, str], after: dict[str, str], *, exempt: frozenset[str] = frozenset()
) -> list[str]:
    """Every variable that differs between ``before`` and ``after``, except Lmod's bookkeeping.

    MODULEPATH is compared directory by directory after normalisation: Debian's
    /etc/lmod/modulespath lists `/usr/share/lmod/lmod/modulefiles/` and Lmod writes it back
    without the trailing slash the first time it rewrites MODULEPATH (here: `module use`). Order
    and content must still be identical.
    """
    problems = []
    for name in sorted(before.keys() | after.keys()):
        if _is_lmod_bookkeeping(name, exempt):
            continue
        old, new = before.get(name), after.get(name)
        if name == "MODULEPATH" and old is not None and new is not None:
            if _normpath_list(old) != _normpath_list(new):
                problems.append(f"MODULEPATH: before {old!r}, after {new!r}")
        elif name == "MANPATH" and old is not None and new is not None:
            if _man_entries(old) != _man_entries(new):
                problems.append(f"MANPATH: before {old!r}, after {new!r}")
        elif old != new:
            problems.append(f"{name}: before {old!r}, after {new!r}")
    return problems


def _check_bookkeeping(env: dict[str, str], *, prefix: Path) -> list[str]:
    """Lmod's leftover variables must not remember hpcstage or the prefix."""
    problems = []
    for counts_name, path_name in LMOD_REF_COUNTS.items():
        if counts_name not in env:
            continue
        dirs = [item.rpartition(":")[0] for item in env[counts_name].split(";") if item]
        if str(prefix) in env[counts_name]:
            problems.append(f"{counts_name} still mentions {prefix}: {env[counts_name]!r}")
        # MANPATH's empty entries ("and the system's pages") are counted by some Lmods
        # (8.7: ':1') and doubled by others: compare the directories only.
        listed = [d for d in _normpath_list(env.get(path_name, "")) if d]
        if [d for d in _normpath_list(":".join(dirs)) if d] != listed:
            problems.append(
                f"{counts_name} {env[counts_name]!r} does not match {path_name}"
                f" {env.get(path_name)!r}"
            )
    if LMOD_TABLE_SIZE in env:
        size = int(env[LMOD_TABLE_SIZE])
        try:
            chunks = [env[f"_ModuleTable{i:03d}_"] for i in range(1, size + 1)]
        except KeyError as exc:
            return [*problems, f"{LMOD_TABLE_SIZE}={size} but {exc} is missing"]
        table = base64.b64decode("".join(chunks)).decode()
        if "hpcstage" in table or str(prefix) in table:
            problems.append(f"Lmod's saved module table still mentions hpcstage:\n{table}")
    return problems


@dataclass(frozen=True)
class Install:
    prefix: Path
    proc: subprocess.CompletedProcess[str]


def run_install(prefix: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = shlex.join([str(INSTALL_PREFIX), *args, str(prefix)])
    return as_user(cmd, timeout=INSTALL_TIMEOUT)


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def alice_dir() -> Iterator[Path]:
    """A fresh directory under /tmp owned by alice, removed at the end."""
    if os.geteuid() != 0:
        pytest.fail("needs root: creates the dev users and runs commands as alice")
    for tool in ("runuser", "bash"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found")
    if not LMOD_PROFILE.exists():
        pytest.fail(f"{LMOD_PROFILE} missing: Lmod is not installed (run scripts/bootstrap)")
    ensure_all()
    script = shlex.quote(str(INSTALL_PREFIX))
    readable = as_user(f"test -r {script} && test -x {script}")
    if readable.returncode != 0:
        pytest.fail(f"{USER} cannot read/execute {INSTALL_PREFIX}: the checkout must be readable")
    path = Path(tempfile.mkdtemp(prefix="hpcstage-module-test."))
    try:
        shutil.chown(path, USER, USER)
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def installed(alice_dir: Path) -> Install:
    """hpcstage installed by alice with no site config."""
    prefix = alice_dir / "prefix"
    proc = run_install(prefix)
    assert proc.returncode == 0, f"install-prefix failed:\n{_show(proc)}"
    return Install(prefix, proc)


@pytest.fixture(scope="module")
def installed_with_config(alice_dir: Path) -> tuple[Install, Path]:
    """A second prefix, installed with --config pointing to a site config."""
    config = alice_dir / "site" / "hpcstage.toml"
    prefix = alice_dir / "prefix-with-config"
    proc = run_install(prefix, "--config", str(config))
    assert proc.returncode == 0, f"install-prefix --config failed:\n{_show(proc)}"
    return Install(prefix, proc), config


@pytest.fixture(scope="module")
def package_version() -> str:
    return importlib.metadata.version("hpcstage")


@dataclass(frozen=True)
class Session:
    """What one login shell saw around `module load` / `module unload`."""

    prefix: Path
    workdir: Path
    proc: subprocess.CompletedProcess[str]

    def env(self, name: str) -> dict[str, str]:
        return read_env(self.workdir / f"env-{name}")

    def step(self, name: str) -> tuple[int, str]:
        rc_file, out_file = self.workdir / f"{name}.rc", self.workdir / f"{name}.out"
        assert rc_file.exists(), f"step {name!r} did not run:\n{_show(self.proc)}"
        return int(rc_file.read_text()), out_file.read_text()


def module_session(install: Install, workdir: Path, preamble: str = "") -> Session:
    """In ONE login shell of alice: env before, module use + load, the checks, module unload +
    unuse, env after. Each step's exit status and output go to files in ``workdir``."""
    workdir.mkdir()
    shutil.chown(workdir, USER, USER)
    w = shlex.quote(str(workdir))
    mp = shlex.quote(str(install.prefix / "modulefiles"))
    # Only shell variables (not exported) and functions are defined here: they don't show in env.
    script = f"""
{preamble}
step() {{ local name=$1; shift; "$@" >{w}/$name.out 2>&1; echo $? >{w}/$name.rc; }}
# What bash-completion does on the first Tab after a command: source the file named after it
# from the first DIR/bash-completion/completions of XDG_DATA_DIRS; then press Tab.
tab_complete() {{
  local d f
  for d in ${{XDG_DATA_DIRS//:/ }}; do
    f=$d/bash-completion/completions/$1
    if [ -r "$f" ]; then . "$f"; break; fi
  done
  COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMPREPLY=()
  "$(complete -p "$1" | sed -E 's/.* -F ([^ ]+) .*/\\1/')" "$1"
  printf '%s\n' "${{COMPREPLY[@]}}"
}}
env -0 > {w}/env-before
step module-function type module
step which-before command -v hpcstage
step python-before command -v python3
step use module use {mp}
step load module load hpcstage
env -0 > {w}/env-loaded
step version hpcstage --version
step python-loaded command -v python3
step man man -w hpcstage-status
step complete tab_complete hpcstage tra
step help module help hpcstage
step whatis module whatis hpcstage
step unload module unload hpcstage
step which-after command -v hpcstage
step version-after hpcstage --version
step unuse module unuse {mp}
env -0 > {w}/env-after
"""
    proc = as_user(script)
    assert proc.returncode == 0, f"module session failed:\n{_show(proc)}"
    return Session(install.prefix, workdir, proc)


@pytest.fixture(scope="module")
def session(installed: Install, alice_dir: Path) -> Session:
    s = module_session(installed, alice_dir / "session")
    rc, out = s.step("module-function")
    assert rc == 0, f"`module` is not defined in {USER}'s login shell:\n{out}"
    return s


# --------------------------------------------------------------------------------------------
# install-prefix


def test_install_layout(installed: Install, package_version: str) -> None:
    prefix = installed.prefix
    modulefile = prefix / "modulefiles" / "hpcstage" / f"{package_version}.lua"
    assert modulefile.is_file(), (
        f"no modulefile {modulefile}; found {sorted(prefix.rglob('*.lua'))}\n"
        + _show(installed.proc)
    )
    leftover = re.findall(r"@[A-Z][A-Z_]*@", modulefile.read_text())
    assert not leftover, f"unreplaced placeholders {leftover} in {modulefile}"
    # PATH gets only the hpcstage command, not the venv's python or pip.
    assert sorted(p.name for p in (prefix / "bin").iterdir()) == ["hpcstage"]
    link = prefix / "bin" / "hpcstage"
    assert link.is_symlink(), f"{link} is not a symlink"
    assert link.resolve() == (prefix / "venv" / "bin" / "hpcstage").resolve()
    assert (prefix / "install.log").is_file(), "no install.log under the prefix"
    # Everything in the prefix belongs to alice: nothing was done as root.
    not_alice = [p for p in prefix.rglob("*") if p.lstat().st_uid != (prefix.stat().st_uid)]
    assert prefix.owner() == USER
    assert not not_alice, f"files not owned by {USER}: {not_alice[:10]}"


def test_install_is_idempotent(installed: Install, package_version: str) -> None:
    modulefile = installed.prefix / "modulefiles" / "hpcstage" / f"{package_version}.lua"
    first = modulefile.read_text()
    venv_cfg = (installed.prefix / "venv" / "pyvenv.cfg").stat().st_ino
    again = run_install(installed.prefix)
    assert again.returncode == 0, f"second install-prefix failed:\n{_show(again)}"
    assert "reusing" in again.stderr, f"the venv was not reused:\n{_show(again)}"
    assert (installed.prefix / "venv" / "pyvenv.cfg").stat().st_ino == venv_cfg
    assert modulefile.read_text() == first, "a re-run with the same arguments changed the module"
    assert sorted(p.name for p in (installed.prefix / "bin").iterdir()) == ["hpcstage"]


def test_install_prefix_help_and_bad_usage() -> None:
    helped = subprocess.run(
        [str(INSTALL_PREFIX), "--help"], capture_output=True, text=True, check=False
    )
    assert helped.returncode == 0, _show(helped)
    assert "Usage:" in helped.stdout, _show(helped)
    assert "PREFIX" in helped.stdout, _show(helped)
    missing = subprocess.run([str(INSTALL_PREFIX)], capture_output=True, text=True, check=False)
    assert missing.returncode != 0, _show(missing)
    assert "missing PREFIX" in missing.stderr, _show(missing)


# --------------------------------------------------------------------------------------------
# module load / unload


def test_not_on_path_before_load(session: Session) -> None:
    rc, out = session.step("which-before")
    assert rc != 0, (
        f"hpcstage is on {USER}'s PATH before `module load` ({out.strip()}): "
        "the checks after unload would prove nothing"
    )


def test_load_gives_hpcstage(session: Session, package_version: str) -> None:
    for name in ("use", "load"):
        rc, out = session.step(name)
        assert rc == 0, f"`module {name}` failed:\n{out}"
    rc, out = session.step("version")
    assert rc == 0, f"hpcstage --version failed after module load:\n{out}"
    assert re.search(rf"(?<![\w.]){re.escape(package_version)}(?![\w.])", out), (
        f"hpcstage --version does not print {package_version}: {out!r}"
    )


def test_loaded_environment(session: Session) -> None:
    before, loaded = session.env("before"), session.env("loaded")
    bin_dir = str(session.prefix / "bin")
    assert loaded["PATH"] == f"{bin_dir}:{before['PATH']}", loaded["PATH"]
    assert loaded.get("HPCSTAGE_HOME") == str(session.prefix)
    assert "HPCSTAGE_CONFIG" not in loaded, "HPCSTAGE_CONFIG set although no --config was given"
    # The venv's interpreter does not shadow the user's python3.
    python_loaded, python_before = session.step("python-loaded"), session.step("python-before")
    assert python_loaded == python_before, "module load changed which python3 the user gets"


def test_man_pages_and_completion(session: Session) -> None:
    before, loaded = session.env("before"), session.env("loaded")
    share = session.prefix / "share"
    assert loaded["MANPATH"].split(":")[0] == str(share / "man"), loaded["MANPATH"]
    # The rest as before, and still with the empty entry that means "and the system's pages"
    # (Lmod's profile puts it there; Lmod itself may double it).
    rest, old = loaded["MANPATH"].split(":")[1:], before.get("MANPATH", "").split(":")
    assert [p for p in rest if p] == [p for p in old if p], loaded["MANPATH"]
    assert ("" in rest) == ("" in old), loaded["MANPATH"]
    assert loaded["XDG_DATA_DIRS"].split(":")[0] == str(share), loaded["XDG_DATA_DIRS"]
    rc, out = session.step("man")
    assert (rc, out.strip()) == (0, str(share / "man" / "man1" / "hpcstage-status.1")), out
    rc, out = session.step("complete")
    assert (rc, out) == (0, "trash\n"), out
    assert (share / "zsh" / "site-functions" / "_hpcstage").read_text().startswith("#compdef")


def test_help_and_whatis(session: Session, package_version: str) -> None:
    rc, help_text = session.step("help")
    assert rc == 0, f"module help failed:\n{help_text}"
    for needle in (
        "stage",
        package_version,
        "hpcstage env",
        "hpcstage status",
        "hpcstage warmup",
        "#SBATCH --stage-in=",
        "#HPCSTAGE --stage-in=",
        str(session.prefix / "share" / "doc" / "hpcstage"),
    ):
        assert needle in help_text, f"{needle!r} not in `module help hpcstage`:\n{help_text}"
    rc, whatis = session.step("whatis")
    assert rc == 0, f"module whatis failed:\n{whatis}"
    assert re.search(r"Name: hpcstage\b", whatis), whatis
    assert f"Version: {package_version}" in whatis, whatis
    assert re.search(r"Description: .*stag", whatis), whatis


def test_unload_restores_environment(session: Session) -> None:
    for name in ("unload", "unuse"):
        rc, out = session.step(name)
        assert rc == 0, f"`module {name}` failed:\n{out}"
    before, after = session.env("before"), session.env("after")
    problems = env_differences(before, after)
    assert not problems, "environment differs after unload + unuse:\n" + "\n".join(problems)
    problems = _check_bookkeeping(after, prefix=session.prefix)
    assert not problems, "\n".join(problems)


def test_command_gone_after_unload(session: Session) -> None:
    rc, out = session.step("which-after")
    assert rc != 0, f"hpcstage still on PATH after module unload: {out.strip()}"
    rc, out = session.step("version-after")
    assert rc == 127, f"hpcstage --version ran after module unload (exit {rc}):\n{out}"
    assert "command not found" in out, out


def _unit(install: Install) -> tuple[Path, dict[str, str]]:
    unit = install.prefix / "share" / "hpcstage" / "systemd" / "hpcstage-daemon.service"
    assert unit.is_file(), f"no systemd unit {unit}\n" + _show(install.proc)
    found = {}
    for line in unit.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found[key] = value
    return unit, found


def test_install_writes_the_daemons_systemd_unit(
    installed: Install, installed_with_config: tuple[Install, Path]
) -> None:
    unit, found = _unit(installed)
    prefix = installed.prefix
    assert found["ExecStart"] == (
        f'"{prefix}/bin/hpcstage" daemon --config "/etc/hpcstage/site.toml"'
    ), "without --config the unit reads the documented default"
    assert found["User"] == "hpcstage"
    assert found["Documentation"] == f"file://{prefix}/share/doc/hpcstage/install.md"
    assert (prefix / "share" / "doc" / "hpcstage" / "install.md").is_file()
    assert (found["Restart"], found["RestartPreventExitStatus"]) == ("on-failure", "78")
    if shutil.which("systemd-analyze"):  # systemd's own parser: the command is there, too
        done = subprocess.run(
            ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
        )
        assert (done.returncode, done.stderr) == (0, ""), done.stderr
    install, config = installed_with_config
    _, found = _unit(install)
    assert found["ExecStart"] == f'"{install.prefix}/bin/hpcstage" daemon --config "{config}"'


def test_install_prefix_refuses_a_bad_service_user(alice_dir: Path) -> None:
    proc = run_install(alice_dir / "prefix-bad-user", "--service-user", "Bad User")
    assert proc.returncode == 1, _show(proc)
    assert "--service-user: not a valid user name: 'Bad User'" in proc.stderr
    assert not (alice_dir / "prefix-bad-user" / "venv").exists(), "it installed before checking"


# --------------------------------------------------------------------------------------------
# site config


def test_config_is_exported_and_removed(
    installed_with_config: tuple[Install, Path], alice_dir: Path
) -> None:
    install, config = installed_with_config
    s = module_session(install, alice_dir / "session-config")
    rc, out = s.step("load")
    assert rc == 0, f"module load failed:\n{out}"
    loaded, after = s.env("loaded"), s.env("after")
    assert loaded.get("HPCSTAGE_CONFIG") == str(config), loaded.get("HPCSTAGE_CONFIG")
    rc, help_text = s.step("help")
    assert str(config) in help_text, help_text
    assert "HPCSTAGE_CONFIG" not in after
    problems = env_differences(s.env("before"), after) + _check_bookkeeping(after, prefix=s.prefix)
    assert not problems, "\n".join(problems)


def test_unload_restores_values_set_before_load(
    installed_with_config: tuple[Install, Path], alice_dir: Path
) -> None:
    """A user's own HPCSTAGE_CONFIG / HPCSTAGE_HOME come back after unload (pushenv)."""
    install, config = installed_with_config
    mine = {"HPCSTAGE_CONFIG": "/home/alice/my hpcstage.toml", "HPCSTAGE_HOME": "/home/alice/hs"}
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in mine.items())
    s = module_session(install, alice_dir / "session-preset", preamble=exports)
    loaded, after = s.env("loaded"), s.env("after")
    assert loaded.get("HPCSTAGE_CONFIG") == str(config)
    assert loaded.get("HPCSTAGE_HOME") == str(install.prefix)
    assert {k: after.get(k) for k in mine} == mine, "unload did not restore the user's values"
    # pushenv remembers the user's value in __LMOD_STACK_<NAME> (base64) and leaves it there.
    stacks = frozenset(f"__LMOD_STACK_{k}" for k in mine)
    problems = env_differences(s.env("before"), after, exempt=stacks)
    assert not problems, "\n".join(problems)
    for name, value in mine.items():
        stack = after.get(f"__LMOD_STACK_{name}")
        if stack is not None:  # if Lmod keeps it, it holds only the user's value
            remembered = [base64.b64decode(v).decode() for v in stack.split(":")]
            assert remembered == [value], f"__LMOD_STACK_{name} holds {remembered}"
