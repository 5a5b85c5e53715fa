"""What the client commands read from the site configuration, without the full schema.

``load_client_settings`` must agree with ``load_config`` on every value it reads, refuse what
the schema refuses (the same rules), and keep the pydantic schema out of the commands a job
runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hpcstage.cli.client import ApiAccess, ClientSettings, api_url, client_for, load_client_settings
from hpcstage.config.load import load_config
from hpcstage.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

BASE = """\
[site]
name = "demo"

[store]
endpoint_url = "https://s3.example.org"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


def full_view(path: Path) -> ClientSettings:
    settings = load_config(path)
    api = settings.api
    return ClientSettings(
        ApiAccess(api.listen, api.auth, api.munge_socket, api.url), settings.nodes.cache_dir
    )


@pytest.mark.parametrize(
    "extra",
    [
        "",
        '[api]\nlisten = "[::1]:9000"\nauth = "none"\nmunge_socket = ""\n',
        '[api]\nmunge_socket = "/run/munge/x.socket"\n[nodes]\ncache_dir = "/ssd/{node}/c"\n',
        '[nodes]\ncache_dir = "/local/cache"\ntransport = "local"\n',
        '[api]\nlisten = "0.0.0.0:8470"\nurl = "https://stager.example.org:8443/hpcstage/"\n',
    ],
    ids=["defaults", "ipv6-no-auth", "socket-and-template", "plain-dir", "wildcard-with-url"],
)
def test_agrees_with_the_full_schema(tmp_path: Path, extra: str) -> None:
    path = write(tmp_path, BASE + extra)
    assert load_client_settings(path) == full_view(path)


def test_agrees_on_the_shipped_example() -> None:
    path = ROOT / "examples" / "site.toml"
    assert load_client_settings(path) == full_view(path)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[api]\nlisten = "8470"\n', "api.listen: must be host:port"),
        ("[api]\nlisten = 8470\n", "api.listen: must be a string, got 8470"),
        ('[api]\nauth = "kerberos"\n', "api.auth: must be one of munge, none, got 'kerberos'"),
        ('[api]\nmunge_socket = "run/munge.sock"\n', "api.munge_socket: must be an absolute path"),
        ('[nodes]\ncache_dir = "local/{node}"\n', "nodes.cache_dir: must be an absolute path"),
        ('[nodes]\ncache_dir = "/local/{user}"\n', "nodes.cache_dir: unknown placeholder {user}"),
        ('api = "x"\n', "api: must be a table"),
        ('[api]\nlisten = "0.0.0.0:8470"\n', "api.url: must be set when api.listen (0.0.0.0:8470)"),
        ('[api]\nlisten = "[::]:8470"\n', "api.url: must be set when api.listen ([::]:8470)"),
        ('[api]\nurl = "stager:8470"\n', "api.url: must be an http:// or https:// URL"),
        ('[api]\nurl = "http://u:pw@stager:8470"\n', "api.url: must not contain credentials"),
        ('[api]\nurl = "http://stager:99999"\n', "api.url: is not a valid URL"),
    ],
)
def test_refuses_what_the_schema_refuses(tmp_path: Path, extra: str, message: str) -> None:
    # Top-level keys must come before the tables.
    text = extra + BASE if extra.startswith("api =") else BASE + extra
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_client_settings(path)
    assert str(info.value).startswith(f"{path}: {message}"), str(info.value)
    with pytest.raises(ConfigError):
        load_config(path)


def test_an_unreadable_or_broken_file_is_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope.toml: cannot read: No such file"):
        load_client_settings(missing)
    broken = write(tmp_path, "[api\nlisten = 1")
    with pytest.raises(ConfigError, match=r"site.toml: not a valid TOML file .*config check"):
        load_client_settings(broken)
    broken.write_bytes(b'[site]\nname = "\xff"\n')
    with pytest.raises(ConfigError, match=r"site.toml: not a valid TOML file"):
        load_client_settings(broken)


def test_the_commands_a_job_runs_do_not_load_the_daemons_modules() -> None:
    code = (
        "import sys\n"
        "from hpcstage.cli import cli\n"
        "for name in ('env', 'status', 'warmup'):\n"
        "    assert cli.get_command(None, name) is not None, name\n"
        "heavy = ('pydantic', 'fastapi', 'sqlalchemy', 'botocore',\n"
        "         'hpcstage.config.schema', 'hpcstage.config.load')\n"
        "print(' '.join(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert done.stdout.strip() == ""


def test_clients_dial_api_url_else_api_listen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HPCSTAGE_API", raising=False)
    assert api_url("10.0.0.5:8470") == "http://10.0.0.5:8470"
    path = write(
        tmp_path,
        BASE + '[api]\nlisten = "0.0.0.0:8470"\nurl = "https://stager.example.org/hpcstage/"\n',
    )
    api = load_client_settings(path).api
    assert api.url == "https://stager.example.org/hpcstage"  # joined with /api/v1/...
    assert api_url(api.listen, api.url) == "https://stager.example.org/hpcstage"
    assert client_for(load_client_settings(path)).base_url == api.url
    monkeypatch.setenv("HPCSTAGE_API", "http://127.0.0.1:9999")  # a job's override wins
    assert client_for(load_client_settings(path)).base_url == "http://127.0.0.1:9999"
