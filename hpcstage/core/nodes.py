"""Where a node's agent lives: its cache directory and address, from the config templates.

Pure and light (no SSH library): ``hpcstage env`` inside every job imports it.
"""

from __future__ import annotations

from pathlib import Path

from hpcstage.errors import TransportError


def expand_node_template(template: str, node: str, node_addr: str) -> str:
    """Fill ``{node}`` and ``{node_addr}`` in a config template."""
    return template.replace("{node_addr}", node_addr or node).replace("{node}", node)


def cache_dir_for(template: str, node: str) -> str:
    """The cache directory of ``node`` from the config template (absolute)."""
    path = expand_node_template(template, node, node)
    if not Path(path).is_absolute():
        raise TransportError(f"nodes.cache_dir must be absolute, got {path!r}")
    return path
