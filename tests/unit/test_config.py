"""The site configuration: schema, every-problem reporting with lines, locator, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from hpcstage import cli as cli_module
from hpcstage.config import paths
from hpcstage.config.fields import SLURM_END_STATES
from hpcstage.config.load import (
    check_config,
    load_config,
    parse_config,
    render_toml,
    settings_as_dict,
)
from hpcstage.config.schema import Settings
from hpcstage.config.tomlfile import Loc, dotted, locate_keys
from hpcstage.errors import ApiError, AuthError, ConfigError
from hpcstage.retry import RetryPolicy

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "site.toml"
DOCS = ROOT / "docs" / "configuration.md"
MIB = 2**20
GIB = 2**30

MINIMAL = """\
[site]
name = "demo"

[store]
endpoint_url = "https://s3.example.org"
"""

# One wrong type, one unknown key, one missing required section.
BROKEN = """\
[site]
name = "demo"

[transfer]
concurrency = "lots"
retries = 3

[cache]
max_byte = "1TiB"
"""


def problems_of(text: str, source: str = "site.toml") -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source)
    return info.value.problems


def with_minimal(extra: str) -> str:
    return MINIMAL + "\n" + extra


# --- the example and the defaults -------------------------------------------------------------


def test_example_loads() -> None:
    settings = load_config(EXAMPLE)
    assert settings.site.name == "demo"
    assert settings.site.state_url == "sqlite:////var/lib/hpcstage/state.db"
    assert settings.store.endpoint_url == "https://s3.example.org"
    assert settings.cache.max_bytes == 500 * GIB
    assert settings.cache.ttl == 7 * 86400.0
    assert settings.transfer.backoff_base == 0.5
    assert settings.policy.rules[0].accounts == ["chem"]
    assert settings.policy.rules[0].shared is False  # accepted, not acted on yet
    assert settings.api.url == "" and settings.nodes.agent_command == ""
    assert settings.quotas.accounts == {"chem": 300 * GIB, "physics": 100 * GIB}
    assert check_config(EXAMPLE) == []


def test_minimal_file_gets_documented_defaults() -> None:
    s = parse_config(MINIMAL)
    assert s.site.state_dir == Path("/var/lib/hpcstage")
    assert s.site.state_url == "sqlite:////var/lib/hpcstage/state.db"
    assert s.site.log_level == "info"
    assert (s.store.region, s.store.profile, s.store.ca_bundle) == (
        "",
        None,
        None,
    )  # "": from the AWS environment
    assert (s.store.addressing_style, s.store.verify_tls, s.store.max_connections) == (
        "path",
        True,
        128,
    )
    assert (s.store.connect_timeout, s.store.read_timeout) == (10.0, 60.0)
    assert (s.slurm.backend, s.slurm.bin_dir, s.slurm.poll_interval) == ("cli", None, 5.0)
    assert s.slurm.directives_from == ["admin_comment", "batch_script"]
    assert s.slurm.partitions == []
    assert (s.nodes.transport, s.nodes.address, s.nodes.cache_dir) == (
        "ssh",
        "{node_addr}",
        "/local/hpcstage",
    )
    assert (s.nodes.agent_command, s.nodes.ssh_user, s.nodes.ssh_port) == (
        "",  # the daemon's own hpcstage command (transport.agent_command)
        "hpcstage",
        22,
    )
    assert s.nodes.ssh_key == Path("~/.ssh/id_ed25519").expanduser()
    assert s.nodes.ssh_known_hosts == Path("~/.ssh/known_hosts").expanduser()
    assert s.nodes.connect_timeout == 15.0
    assert (s.cache.max_bytes, s.cache.high_watermark, s.cache.low_watermark) == (
        500 * GIB,
        0.9,
        0.8,
    )
    assert (s.cache.ttl, s.cache.lease_grace) == (7 * 86400.0, 900.0)
    assert (s.transfer.concurrency, s.transfer.part_size, s.transfer.multipart_threshold) == (
        64,
        64 * MIB,
        256 * MIB,
    )
    assert (s.transfer.retries, s.transfer.backoff_base, s.transfer.backoff_max) == (6, 0.5, 30.0)
    # One source of truth: the site's retry defaults are the retry policy's own.
    default = RetryPolicy()
    retry = (s.transfer.retries, s.transfer.backoff_base, s.transfer.backoff_max)
    assert retry == (default.retries, default.base, default.cap)
    assert s.stage_out.on_states == [
        "COMPLETED",
        "FAILED",
        "TIMEOUT",
        "CANCELLED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "DEADLINE",
        "BOOT_FAIL",
    ]
    assert (s.stage_out.trash_prefix, s.stage_out.trash_retention) == (
        ".hpcstage-trash/",
        30 * 86400.0,
    )
    assert (s.api.listen, s.api.host, s.api.port, s.api.admins) == (
        "127.0.0.1:8470",
        "127.0.0.1",
        8470,
        ["root"],
    )
    assert (s.policy.default, s.policy.rules) == ("deny", [])
    assert (s.quotas.account_bytes_per_node, s.quotas.max_job_bytes, s.quotas.accounts) == (
        0,
        0,
        {},
    )


def test_sizes_and_durations_accept_numbers_and_strings() -> None:
    s = parse_config(
        with_minimal('[cache]\nmax_bytes = 1000\nttl = 3600\n[transfer]\nbackoff_base = "250ms"\n')
    )
    assert (s.cache.max_bytes, s.cache.ttl, s.transfer.backoff_base) == (1000, 3600.0, 0.25)


def test_durable_before_read_is_off_unless_a_site_asks_for_it() -> None:
    assert parse_config(MINIMAL).cache.durable_before_read is False
    on = parse_config(MINIMAL + "\n[cache]\ndurable_before_read = true\n")
    assert on.cache.durable_before_read is True
    assert problems_of(MINIMAL + "\n[cache]\ndurable_before_read = 2\n")


def test_state_url_default_follows_state_dir_and_postgres_is_kept() -> None:
    s = parse_config(MINIMAL.replace('name = "demo"', 'name = "demo"\nstate_dir = "/srv/hs"'))
    assert s.site.state_url == "sqlite:////srv/hs/state.db"
    pg = "postgresql+psycopg://hpcstage@db.example.org/hpcstage"
    s = parse_config(MINIMAL.replace('name = "demo"', f'name = "demo"\nstate_url = "{pg}"'))
    assert s.site.state_url == pg
    # A plain postgresql:// means the driver installed with hpcstage (psycopg 3).
    plain = pg.replace("+psycopg", "")
    s = parse_config(MINIMAL.replace('name = "demo"', f'name = "demo"\nstate_url = "{plain}"'))
    assert s.site.state_url == pg
    other = pg.replace("+psycopg", "+asyncpg")
    problems = problems_of(
        MINIMAL.replace('name = "demo"', f'name = "demo"\nstate_url = "{other}"')
    )
    assert problems == [
        "site.toml:3: site.state_url: must be a sqlite:/// or postgresql+psycopg:// URL"
        f' (or ""), got {other!r}'
    ]


def test_settings_are_frozen() -> None:
    s = parse_config(MINIMAL)
    with pytest.raises(ValueError, match="frozen"):
        s.site.name = "other"


# --- reporting every problem with key and line --------------------------------------------------


def test_broken_file_reports_each_problem_with_key_and_line() -> None:
    assert problems_of(BROKEN) == [
        "site.toml:5: transfer.concurrency: must be an integer, got 'lots'",
        "site.toml:9: cache.max_byte: unknown key (did you mean 'max_bytes'?)",
        "site.toml: store: missing required section",
    ]


def test_config_error_message_lists_problems() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(BROKEN, "site.toml")
    message = str(info.value)
    assert message.startswith("invalid configuration site.toml (3 problems):")
    assert "site.toml:5: transfer.concurrency" in message


def test_many_problems_are_all_reported_in_line_order() -> None:
    text = """\
[site]
name = "demo"
log_level = "verbose"

[store]
endpint_url = "https://s3.example.org"
max_connections = 0

[cache]
low_watermark = 0.8
high_watermark = 0.7
ttl = "7 days"

[slurm]
poll_interval = "10m"
directives_from = ["admin_comment", "sacct"]

[nodes]
address = "{host}"
ssh_port = "22"
"""
    problems = problems_of(text)
    assert problems == [
        "site.toml:3: site.log_level: must be 'debug', 'info', 'warning' or 'error', got 'verbose'",
        "site.toml:5: store.endpoint_url: missing required key",
        "site.toml:6: store.endpint_url: unknown key (did you mean 'endpoint_url'?)",
        "site.toml:7: store.max_connections: must be greater than or equal to 1, got 0",
        "site.toml:11: cache.high_watermark: must be greater than cache.low_watermark (0.8), "
        "got 0.7",
        "site.toml:12: cache.ttl: invalid duration '7 days': expected seconds or a number with "
        "a unit: ms, s, m, h, d (e.g. '90s', '1h30m')",
        "site.toml:15: slurm.poll_interval: must be at most 2m so no job end is missed (finished "
        "jobs leave squeue after MinJobAge, 300s by default); got 10m",
        "site.toml:16: slurm.directives_from[1]: must be 'admin_comment' or 'batch_script', "
        "got 'sacct'",
        "site.toml:19: nodes.address: unknown placeholder {host}; allowed: {node}, {node_addr}",
        "site.toml:20: nodes.ssh_port: must be an integer, got '22'",
    ]


def test_empty_file_misses_both_required_sections() -> None:
    assert problems_of("") == [
        "site.toml: site: missing required section",
        "site.toml: store: missing required section",
    ]


def test_misspelled_section_and_misplaced_key_get_hints() -> None:
    problems = problems_of('[site]\nname = "x"\n[sotre]\nendpoint_url = "https://h"\n')
    assert "site.toml:3: sotre: unknown section (did you mean 'store'?)" in problems
    problems = problems_of(with_minimal('poll_interval = "5s"\n'))
    assert problems == ["site.toml:7: store.poll_interval: unknown key (it belongs in [slurm])"]


def test_missing_key_points_at_its_section_header() -> None:
    assert problems_of('[site]\nlog_level = "info"\n[store]\nendpoint_url = "https://h"\n') == [
        "site.toml:1: site.name: missing required key"
    ]


def test_default_high_watermark_below_a_raised_low_watermark() -> None:
    assert problems_of(with_minimal("[cache]\nlow_watermark = 0.95\n")) == [
        "site.toml:7: cache.high_watermark: must be greater than cache.low_watermark (0.95), "
        "got 0.9"
    ]


@pytest.mark.parametrize(
    ("section", "fragment"),
    [
        ('[transfer]\npart_size = "1MiB"', "transfer.part_size: must be at least 5MiB"),
        ('[transfer]\npart_size = "6GiB"', "transfer.part_size: must be at most 5GiB"),
        (
            '[transfer]\npart_size = "512MiB"',
            "transfer.multipart_threshold: must be at least transfer.part_size (512MiB), "
            "got 256MiB",
        ),
        ('[transfer]\nbackoff_max = "0.1s"', "transfer.backoff_max: must be at least"),
        ("[transfer]\nconcurrency = 5000", "transfer.concurrency: must be less than or equal"),
        ("[transfer]\nretries = -1", "transfer.retries: must be greater than or equal to 0"),
        (
            '[transfer]\nnode_download_rate = "10M/s"',
            "transfer.node_download_rate: ambiguous size unit 'M' in '10M/s'",
        ),
        ('[transfer]\nsite_upload_rate = "fast"', "transfer.site_upload_rate: invalid rate 'fast'"),
        ("[transfer]\nnode_request_rate = -1", "transfer.node_request_rate: must be greater than"),
        ('[transfer]\nsite_request_rate = "50/s"', "transfer.site_request_rate: must be a number"),
        (
            '[transfer]\npeer_groups = [["n1", "n2"], ["n2", "n3"]]',
            "transfer.peer_groups: a node may be in one group only: n2",
        ),
        (
            '[transfer]\npeer_groups = [["n 1"]]',
            "transfer.peer_groups[0][0]: String should match pattern",
        ),
        ('[transfer]\npeer_address = "{rack}"', "transfer.peer_address: unknown placeholder"),
        ("[cache]\nhigh_watermark = 1.5", "cache.high_watermark: must be less than or equal"),
        ("[cache]\nmax_bytes = 0", "cache.max_bytes: must be at least 1B"),
        ('[cache]\nmax_bytes = "10G"', "cache.max_bytes: ambiguous size unit 'G'"),
        ("[slurm]\npoll_interval = 0", "slurm.poll_interval: must be greater than 0"),
        ('[slurm]\nbackend = "pyslurm"', "slurm.backend: must be 'cli', got 'pyslurm'"),
        ("[slurm]\ndirectives_from = []", "slurm.directives_from: must not be empty"),
        ('[slurm]\nbin_dir = "bin"', "slurm.bin_dir: must be an absolute path"),
        ('[nodes]\ncache_dir = "local/{node}"', "nodes.cache_dir: must be an absolute path"),
        ('[nodes]\ncache_dir = "/l/{node_addr}"', "nodes.cache_dir: unknown placeholder"),
        ('[nodes]\naddress = "{node!r}"', "nodes.address: unknown placeholder {node}"),
        ('[nodes]\naddress = "{node"', "nodes.address: is not a valid template"),
        ('[nodes]\nagent_command = "a \'b"', "nodes.agent_command: is not a valid shell"),
        ('[nodes]\ntransport = "rsh"', "nodes.transport: must be 'ssh' or 'local'"),
        ("[nodes]\nssh_port = 70000", "nodes.ssh_port: must be less than or equal to 65535"),
        ('[stage_out]\non_states = ["DONE"]', "stage_out.on_states[0]: must be 'COMPLETED'"),
        ('[stage_out]\ntrash_prefix = "/trash"', "stage_out.trash_prefix: must be a relative"),
        ('[api]\nlisten = "localhost"', "api.listen: must be host:port"),
        ('[api]\nlisten = "[::1]:0"', "api.listen: must be host:port"),
        ('[policy]\ndefault = "maybe"', "policy.default: must be 'deny' or 'allow'"),
        ('[quotas]\nmax_job_bytes = "-1GiB"', "quotas.max_job_bytes: invalid size '-1GiB'"),
        ('[quotas.accounts]\nchem = "lots"', "quotas.accounts.chem: invalid size 'lots'"),
        ("[store]\nverify_tls = 1", "must be true or false, got 1"),
        ('slurm = "cli"', "slurm: must be a table, got 'cli'"),
        ('[api]\nadmins = "root"', "api.admins: must be an array, got 'root'"),
    ],
)
def test_invalid_values(section: str, fragment: str) -> None:
    text = MINIMAL + "\n" + section + "\n"
    if section.startswith("[store]"):  # MINIMAL ends in [store]
        text = MINIMAL + section.removeprefix("[store]") + "\n"
    elif not section.startswith("["):  # a top-level key must come before any table
        text = section + "\n" + MINIMAL
    problems = problems_of(text)
    assert len(problems) == 1, problems
    assert fragment in problems[0]


@pytest.mark.parametrize(
    ("endpoint", "ok"),
    [
        ("https://s3.example.org", True),
        ("http://127.0.0.1:9000", True),
        ("ftp://s3.example.org", False),
        ("s3.example.org", False),
        ("https://", False),
    ],
)
def test_endpoint_url(endpoint: str, ok: bool) -> None:
    text = MINIMAL.replace("https://s3.example.org", endpoint)
    if ok:
        assert parse_config(text).store.endpoint_url == endpoint
    else:
        assert "must be an http:// or https:// URL" in problems_of(text)[0]


def test_policy_rules_are_checked_per_element() -> None:
    text = with_minimal(
        """\
[[policy.rules]]
accounts = ["chem"]
read = ["s3://datasets/chem/", "/shared/chem"]

[[policy.rules]]
read = ["s3://datasets/chem", "s3://datasets/../x/", "relative/path", "s3://B/x/"]
"""
    )
    assert problems_of(text) == [
        "site.toml:11: policy.rules[1].users: either accounts or users must be non-empty",
        "site.toml:12: policy.rules[1].read[0]: 's3://datasets/chem': an S3 grant must end in '/' "
        "and have no '..' parts",
        "site.toml:12: policy.rules[1].read[1]: 's3://datasets/../x/': an S3 grant must end in "
        "'/' and have no '..' parts",
        "site.toml:12: policy.rules[1].read[2]: 'relative/path': must be s3://bucket/prefix/ or "
        "an absolute path without '..'",
        "site.toml:12: policy.rules[1].read[3]: 's3://B/x/': 'B' is not a valid S3 bucket name",
    ]


# --- credentials ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("snippet", "key", "line"),
    [
        ('aws_access_key_id = "AKIAEXAMPLE"', "store.aws_access_key_id", 6),
        ('aws_secret_access_key = "s3cr3tvalue"', "store.aws_secret_access_key", 6),
        ('secret_key = "s3cr3tvalue"', "store.secret_key", 6),
        ('access_key = "AKIAEXAMPLE"', "store.access_key", 6),
        ('password = "s3cr3tvalue"', "store.password", 6),
        ('credentials.secret = "s3cr3tvalue"', "store.credentials.secret", 6),
        ('\n[[policy.rules]]\nusers = ["a"]\nSecret = "s3cr3tvalue"', "policy.rules[0].Secret", 9),
    ],
)
def test_credentials_are_refused_without_echoing_them(snippet: str, key: str, line: int) -> None:
    problems = problems_of(MINIMAL + snippet + "\n")
    credential = [p for p in problems if "looks like a credential" in p]
    assert len(credential) == 1, problems
    assert credential[0].startswith(f"site.toml:{line}: {key}: looks like a credential")
    assert "AWS_ACCESS_KEY_ID" in credential[0]
    assert not any("s3cr3tvalue" in p or "AKIAEXAMPLE" in p for p in problems)


def test_credentials_in_urls_are_refused() -> None:
    text = MINIMAL.replace("https://s3.example.org", "https://AKIA:s3cr3t@s3.example.org")
    assert "store.endpoint_url: must not contain credentials" in problems_of(text)[0]
    pg = "postgresql+psycopg://hpcstage:s3cr3t@db/hpcstage"
    problems = problems_of(MINIMAL.replace('name = "demo"', f'name = "demo"\nstate_url = "{pg}"'))
    assert problems == [
        "site.toml:3: site.state_url: must not contain a password: libpq reads it from "
        "~/.pgpass or PGPASSWORD"
    ]


def test_account_named_secret_is_only_a_quota() -> None:
    s = parse_config(with_minimal('[quotas.accounts]\nsecret = "1GiB"\n'))
    assert s.quotas.accounts == {"secret": GIB}


# --- TOML syntax errors and unreadable files -------------------------------------------------


def test_toml_syntax_error_gives_its_line() -> None:
    assert problems_of('[site]\nname = "demo"\nlog_level = \n') == [
        "site.toml:3: invalid TOML: Invalid value (column 13)"
    ]


def test_toml_error_at_end_of_document() -> None:
    problems = problems_of('[site]\nname = "demo"\npartitions = [1,\n')
    assert len(problems) == 1
    assert problems[0].startswith("site.toml:3: invalid TOML: ")


def test_duplicate_key_is_a_syntax_error_with_line() -> None:
    problems = problems_of('[site]\nname = "a"\nname = "b"\n')
    assert problems[0].startswith("site.toml:3: invalid TOML: ")


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert check_config(missing) == [f"{missing}: cannot read: No such file or directory"]
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe")
    assert check_config(binary) == [f"{binary}: not UTF-8 text (byte 0)"]


# --- the locator ----------------------------------------------------------------------------


def test_locate_keys_follows_tables_arrays_dotted_and_multiline_values() -> None:
    text = """\
# comment with name = "x"
top = 1
[site]
name = "demo"   # trailing comment
"quoted key" = 2
tls.verify = true
[[policy.rules]]
read = [
  "s3://a/b/",
  "x = [",
]
[[policy.rules]]
users = ["a"]
[policy.rules.extra]
note = '''
fake = 1
'''
after = 3
inline = { a = 1, b = [2,
  3] }
[ quotas . "accounts" ]
chem = "1GiB"
"""
    lines = locate_keys(text)
    expected: dict[Loc, int] = {
        ("top",): 2,
        ("site",): 3,
        ("site", "name"): 4,
        ("site", "quoted key"): 5,
        ("site", "tls"): 6,
        ("site", "tls", "verify"): 6,
        ("policy",): 7,
        ("policy", "rules"): 7,
        ("policy", "rules", 0): 7,
        ("policy", "rules", 0, "read"): 8,
        ("policy", "rules", 1): 12,
        ("policy", "rules", 1, "users"): 13,
        ("policy", "rules", 1, "extra"): 14,
        ("policy", "rules", 1, "extra", "note"): 15,
        ("policy", "rules", 1, "extra", "after"): 18,
        ("policy", "rules", 1, "extra", "inline"): 19,
        ("quotas", "accounts"): 21,
        ("quotas", "accounts", "chem"): 22,
    }
    for loc, line in expected.items():
        assert lines.get(loc) == line, loc
    assert ("policy", "rules", 0, "x") not in lines
    assert ("policy", "rules", 1, "extra", "fake") not in lines
    assert ("name",) not in lines


def test_dotted_renders_toml_names() -> None:
    assert dotted(("policy", "rules", 0, "read", 2)) == "policy.rules[0].read[2]"
    assert dotted(("quotas", "accounts", "a.b")) == 'quotas.accounts."a.b"'
    assert dotted(()) == ""


# --- rendering, docs and example coverage ---------------------------------------------------


def test_render_toml_loads_back_to_the_same_settings() -> None:
    settings = load_config(EXAMPLE)
    assert parse_config(render_toml(settings)) == settings
    minimal = parse_config(MINIMAL)
    assert parse_config(render_toml(minimal)) == minimal


def test_settings_as_dict_is_json_with_bytes_and_seconds() -> None:
    data = settings_as_dict(load_config(EXAMPLE))
    assert data["cache"]["max_bytes"] == 500 * GIB
    assert data["cache"]["ttl"] == 604800.0
    assert data["store"]["profile"] is None
    assert json.loads(json.dumps(data)) == data
    assert settings_as_dict(load_config(EXAMPLE), human=True)["cache"]["max_bytes"] == "500GiB"


def _leaf_keys(model: type[Any], prefix: Loc = ()) -> list[Loc]:
    """Every settable key of the schema; a list of tables contributes its element's keys."""
    keys: list[Loc] = []
    for name, field in model.model_fields.items():
        inner = _model_in(field.annotation)
        if inner is None or name == "accounts":
            keys.append((*prefix, name))
        elif "list" in str(field.annotation):
            keys += _leaf_keys(inner, (*prefix, name, 0))
        else:
            keys += _leaf_keys(inner, (*prefix, name))
    return keys


def _model_in(annotation: Any) -> type[Any] | None:
    from typing import get_args

    from pydantic import BaseModel

    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def test_example_sets_every_key() -> None:
    lines = locate_keys(EXAMPLE.read_text())
    keys = _leaf_keys(Settings)
    assert len(keys) > 50
    missing = [dotted(loc) for loc in keys if loc not in lines]
    assert missing == []


def test_docs_describe_every_key() -> None:
    text = DOCS.read_text()
    names = [dotted(loc).replace("[0]", "[]") for loc in _leaf_keys(Settings)]
    assert [name for name in names if f"`{name}`" not in text] == []
    assert all(state in text for state in SLURM_END_STATES)


# --- the CLI --------------------------------------------------------------------------------


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_cli_check_ok(runner: CliRunner) -> None:
    result = runner.invoke(cli_module.cli, ["config", "check", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"OK: {EXAMPLE} (site demo, store https://s3.example.org, "
        "state sqlite:////var/lib/hpcstage/state.db)\n"
    )


def test_cli_check_broken_lists_every_problem_on_stderr(runner: CliRunner, tmp_path: Path) -> None:
    broken = tmp_path / "site.toml"
    broken.write_text(BROKEN)
    result = runner.invoke(cli_module.cli, ["config", "check", str(broken)])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{broken}:5: transfer.concurrency: must be an integer, got 'lots'",
        f"{broken}:9: cache.max_byte: unknown key (did you mean 'max_bytes'?)",
        f"{broken}: store: missing required section",
    ]


def test_cli_check_json_lists_each_problem_with_severity_key_and_line(
    runner: CliRunner, tmp_path: Path
) -> None:
    broken = tmp_path / "site.toml"
    broken.write_text(BROKEN)
    result = runner.invoke(cli_module.cli, ["config", "check", "--json", str(broken)])
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {
        "file": str(broken),
        "ok": False,
        "problems": [
            {
                "severity": "error",
                "key": "transfer.concurrency",
                "line": 5,
                "message": "must be an integer, got 'lots'",
            },
            {
                "severity": "error",
                "key": "cache.max_byte",
                "line": 9,
                "message": "unknown key (did you mean 'max_bytes'?)",
            },
            {
                "severity": "error",
                "key": "store",
                "line": None,
                "message": "missing required section",
            },
        ],
    }
    good = runner.invoke(cli_module.cli, ["config", "check", "--json", str(EXAMPLE)])
    assert good.exit_code == 0
    assert json.loads(good.stdout) == {"file": str(EXAMPLE), "ok": True, "problems": []}


@pytest.mark.parametrize(
    ("text", "key", "line", "message"),
    [
        (b"[site\n", None, 1, "invalid TOML: "),
        (b"\xff\xfe", None, None, "not UTF-8 text (byte 0)"),
    ],
)
def test_cli_check_json_whole_file_problems_have_no_key(
    runner: CliRunner, tmp_path: Path, text: bytes, key: None, line: int | None, message: str
) -> None:
    broken = tmp_path / "site.toml"
    broken.write_bytes(text)
    result = runner.invoke(cli_module.cli, ["config", "check", "--json", str(broken)])
    assert result.exit_code == 1
    [problem] = json.loads(result.stdout)["problems"]
    assert (problem["severity"], problem["key"], problem["line"]) == ("error", key, line)
    assert problem["message"].startswith(message), problem


def test_cli_check_json_of_a_missing_file_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    result = runner.invoke(cli_module.cli, ["config", "check", "--json", str(missing)])
    assert result.exit_code == 2
    found = json.loads(result.stdout)
    assert (found["file"], found["ok"]) == (str(missing), False)
    [problem] = found["problems"]
    assert (problem["severity"], problem["key"], problem["line"]) == ("error", None, None)
    assert problem["message"].startswith("cannot read: No such file"), problem


def test_cli_check_missing_file_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli_module.cli, ["config", "check", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    assert "cannot read" in result.stderr
    assert "No such file or directory" in result.stderr
    result = runner.invoke(cli_module.cli, ["config", "check", str(tmp_path)])
    assert result.exit_code == 2


def test_cli_check_without_file_uses_env_or_says_how(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("HPCSTAGE_CONFIG", raising=False)
    monkeypatch.setattr(paths, "DEFAULT_PATH", tmp_path / "etc" / "site.toml")
    result = runner.invoke(cli_module.cli, ["config", "check"])
    assert result.exit_code == 2
    assert result.stderr == (
        "hpcstage: error: no site configuration: no --config FILE, $HPCSTAGE_CONFIG not set,"
        f" and {tmp_path}/etc/site.toml does not exist (or give FILE)\n"
    )
    monkeypatch.setenv("HPCSTAGE_CONFIG", str(EXAMPLE))
    result = runner.invoke(cli_module.cli, ["config", "check"])
    assert result.exit_code == 0
    assert result.stdout.startswith(f"OK: {EXAMPLE} ")
    result = runner.invoke(cli_module.cli, ["config", "check", "--config", str(EXAMPLE)])
    assert result.exit_code == 0


def test_without_flag_or_variable_the_default_path_is_read(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("HPCSTAGE_CONFIG", raising=False)
    default = tmp_path / "site.toml"
    monkeypatch.setattr(paths, "DEFAULT_PATH", default)
    for command in (["status"], ["trash", "ls"], ["daemon"]):
        result = runner.invoke(cli_module.cli, command)
        said = result.output + str(result.exception)  # the daemon says it and exits 78
        assert result.exit_code != 0, (command, said)
        assert "no --config FILE, $HPCSTAGE_CONFIG not set" in said, (command, said)
        assert f"{default} does not exist" in said, (command, said)
    default.write_text(EXAMPLE.read_text())
    result = runner.invoke(cli_module.cli, ["config", "check"])
    assert (result.exit_code, result.stdout.startswith(f"OK: {default} ")) == (0, True)
    # A client command reads the default file and goes on to ask the daemon (whom this
    # machine has neither a munged nor a daemon for).
    result = runner.invoke(cli_module.cli, ["status"])
    assert isinstance(result.exception, AuthError | ApiError), result.exception
    assert "/etc/hpcstage/site.toml" in runner.invoke(cli_module.cli, ["--help"]).stdout
    status_help = " ".join(runner.invoke(cli_module.cli, ["status", "--help"]).stdout.split())
    assert "[default: /etc/hpcstage/site.toml]" in status_help


def test_cli_show_toml_and_json(runner: CliRunner) -> None:
    result = runner.invoke(cli_module.cli, ["config", "show", str(EXAMPLE)])
    assert result.exit_code == 0
    assert parse_config(result.stdout) == load_config(EXAMPLE)
    assert 'max_bytes = "500GiB"' in result.stdout
    result = runner.invoke(cli_module.cli, ["config", "show", "--json", str(EXAMPLE)])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["transfer"]["part_size"] == 64 * MIB


def test_cli_help_has_an_example(runner: CliRunner) -> None:
    result = runner.invoke(cli_module.cli, ["config", "check", "--help"])
    assert result.exit_code == 0
    assert "hpcstage config check site.toml" in result.stdout


def test_entry_point_exit_codes(tmp_path: Path) -> None:
    broken = tmp_path / "site.toml"
    broken.write_text(BROKEN)
    command = [sys.executable, "-m", "hpcstage", "config", "check"]
    ok = subprocess.run([*command, str(EXAMPLE)], capture_output=True, text=True, check=False)
    assert (ok.returncode, ok.stdout.startswith("OK: ")) == (0, True)
    bad = subprocess.run([*command, str(broken)], capture_output=True, text=True, check=False)
    assert bad.returncode == 1
    assert len(bad.stderr.splitlines()) == 3
