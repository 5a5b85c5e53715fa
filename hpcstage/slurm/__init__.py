"""Talking to Slurm: pure parsers of its CLI output, plain records, and one thin executor."""

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
