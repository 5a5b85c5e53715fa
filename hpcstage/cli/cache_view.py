"""What ``hpcstage warmup --check`` and ``hpcstage cache evict SRC`` print: pure text from the
API's documents (POST /api/v1/cache/check and /evict)."""

from __future__ import annotations

from typing import Any

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human(num_bytes: int) -> str:
    """Bytes to one decimal in the largest binary unit below them: 1536 -> ``"1.5KiB"``."""
    value, unit = float(num_bytes), 0
    while value >= 1024 and unit < len(_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    return f"{num_bytes}B" if unit == 0 else f"{value:.1f}{_UNITS[unit]}"


def check_table(doc: dict[str, Any]) -> str:
    """One line per node (objects and bytes of SRC held, and the percentage), then the total
    over the nodes asked."""
    whole_objects, whole_bytes = doc["objects"], doc["bytes"]
    lines = [
        f"{doc['src']}: {whole_objects} objects, {human(whole_bytes)} in the store now",
        f"{'NODE':<12} {'OBJECTS':>17} {'BYTES':>21} {'CACHED':>7}",
    ]
    for node, row in doc["nodes"].items():
        lines.append(_check_line(node, row, whole_objects, whole_bytes))
    nodes = len(doc["nodes"])
    if nodes > 1:
        lines.append(_check_line("total", doc["total"], whole_objects * nodes, whole_bytes * nodes))
    return "\n".join(lines)


def _check_line(name: str, row: dict[str, Any], objects: int, size: int) -> str:
    if "error" in row:
        return f"{name:<12} {row['error']}"
    held = f"{row['objects']}/{objects}"
    held_bytes = f"{human(row['bytes'])}/{human(size)}"
    return f"{name:<12} {held:>17} {held_bytes:>21} {row['percent']:>6.1f}%"


def complete_everywhere(doc: dict[str, Any]) -> bool:
    """True when every node asked answered and holds every object of SRC."""
    return all(
        "error" not in row and row["objects"] == doc["objects"] and row["bytes"] == doc["bytes"]
        for row in doc["nodes"].values()
    )


def evict_table(doc: dict[str, Any]) -> str:
    """One line per node: what was evicted and what stayed because a job uses it."""
    lines = [f"{'NODE':<12} {'EVICTED':>9} {'BYTES':>10} {'IN USE':>9} {'BYTES':>10}"]
    rows = list(doc["nodes"].items())
    if len(rows) > 1:
        rows.append(("total", doc["total"]))
    for node, row in rows:
        if "error" in row:
            lines.append(f"{node:<12} {row['error']}")
            continue
        lines.append(
            f"{node:<12} {row['evicted']:>9} {human(row['evicted_bytes']):>10}"
            f" {row['in_use']:>9} {human(row['in_use_bytes']):>10}"
        )
    if doc["total"]["in_use"]:
        lines.append(
            f"{doc['total']['in_use']} objects stay: jobs on those nodes use them"
            " (evict again once the jobs have ended)"
        )
    return "\n".join(lines)


def failed_nodes(doc: dict[str, Any]) -> list[str]:
    """The nodes that could not be asked."""
    return [node for node, row in doc["nodes"].items() if "error" in row]
