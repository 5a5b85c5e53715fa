"""Talking to Slurm: pure parsers of its CLI output, plain records, and one thin executor.

The names below are loaded on first use, so that ``hpcstage.slurm.hostlist`` (which the
commands a job runs need) does not import the executor and its asyncio.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hpcstage.slurm.backend import CliBackend, SlurmBackend
    from hpcstage.slurm.hostlist import compress_hostlist, expand_hostlist
    from hpcstage.slurm.model import JobInfo, NodeInfo, QueueSnapshot, StartEstimate
    from hpcstage.slurm.parse import (
        merge_planned,
        normalize_job_state,
        parse_nodes_json,
        parse_scontrol_show_job,
        parse_scontrol_show_node,
        parse_squeue_json,
        parse_squeue_start,
        parse_version_output,
    )

_WHERE = {
    "CliBackend": "backend",
    "SlurmBackend": "backend",
    "compress_hostlist": "hostlist",
    "expand_hostlist": "hostlist",
    "JobInfo": "model",
    "NodeInfo": "model",
    "QueueSnapshot": "model",
    "StartEstimate": "model",
    "merge_planned": "parse",
    "normalize_job_state": "parse",
    "parse_nodes_json": "parse",
    "parse_scontrol_show_job": "parse",
    "parse_scontrol_show_node": "parse",
    "parse_squeue_json": "parse",
    "parse_squeue_start": "parse",
    "parse_version_output": "parse",
}

__all__ = [
    "CliBackend",
    "JobInfo",
    "NodeInfo",
    "QueueSnapshot",
    "SlurmBackend",
    "StartEstimate",
    "compress_hostlist",
    "expand_hostlist",
    "merge_planned",
    "normalize_job_state",
    "parse_nodes_json",
    "parse_scontrol_show_job",
    "parse_scontrol_show_node",
    "parse_squeue_json",
    "parse_squeue_start",
    "parse_version_output",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
