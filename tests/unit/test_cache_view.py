"""What `hpcstage warmup --check` and `hpcstage cache evict SRC` print (cli/cache_view.py)."""

from __future__ import annotations

from click.testing import CliRunner

from hpcstage.cli import cache_view, cli

CHECK = {
    "src": "s3://data/set/",
    "objects": 64,
    "bytes": 524288,
    "nodes": {
        "n1": {"objects": 64, "bytes": 524288, "percent": 100.0},
        "n2": {"objects": 0, "bytes": 0, "percent": 0.0},
    },
    "total": {"objects": 64, "bytes": 524288, "percent": 50.0},
}


def test_the_check_table_has_a_line_per_node_and_the_total() -> None:
    lines = cache_view.check_table(CHECK).splitlines()
    assert lines[0] == "s3://data/set/: 64 objects, 512.0KiB in the store now"
    assert lines[2].split() == ["n1", "64/64", "512.0KiB/512.0KiB", "100.0%"]
    assert lines[3].split() == ["n2", "0/64", "0B/512.0KiB", "0.0%"]
    assert lines[4].split() == ["total", "64/128", "512.0KiB/1.0MiB", "50.0%"]
    assert max(len(line) for line in lines) <= 100


def test_complete_means_every_node_answered_and_holds_everything() -> None:
    assert not cache_view.complete_everywhere(CHECK)
    full = {**CHECK, "nodes": {"n1": CHECK["nodes"]["n1"]}}  # type: ignore[index]
    assert cache_view.complete_everywhere(full)
    down = {**CHECK, "nodes": {"n1": {"error": "cannot reach the agent on n1: down"}}}
    assert not cache_view.complete_everywhere(down)
    assert cache_view.failed_nodes(down) == ["n1"]


def test_the_evict_table_says_what_stayed_in_use() -> None:
    row = {"evicted": 3, "evicted_bytes": 3072, "in_use": 2, "in_use_bytes": 2048}
    doc = {"src": "s3://data/set/", "nodes": {"n1": row}, "total": row}
    lines = cache_view.evict_table(doc).splitlines()
    assert lines[1].split() == ["n1", "3", "3.0KiB", "2", "2.0KiB"]
    assert (
        lines[-1]
        == "2 objects stay: jobs on those nodes use them (evict again once the jobs have ended)"
    )


def test_human_sizes() -> None:
    assert [cache_view.human(n) for n in (0, 1023, 1536, 5 * 2**30)] == [
        "0B",
        "1023B",
        "1.5KiB",
        "5.0GiB",
    ]


def test_usage_errors_come_before_the_configuration_is_read() -> None:
    env = {"HPCSTAGE_CONFIG": "/nonexistent/site.toml"}
    runner = CliRunner()
    no_src = runner.invoke(cli, ["cache", "evict"], env=env)
    assert no_src.exit_code == 2 and "name SRC, or --nodes" in no_src.output
    stray = runner.invoke(cli, ["warmup", "s3://data/p/", "--nodes", "n1", "--complete"], env=env)
    assert stray.exit_code == 2 and "--complete goes with --check" in stray.output
