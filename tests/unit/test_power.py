"""Which nodes Slurm power saving keeps without an agent: node states of 22.05 and 24.11."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, cast

import pytest

from hpcstage.config.load import parse_config
from hpcstage.core.power import UNLISTED_ASLEEP, Awake, asleep, awake_nodes
from hpcstage.staging.access import StoreAccess
from hpcstage.staging.nodes import NodeAgents
from hpcstage.watch.slurm.backend import SlurmBackend
from hpcstage.watch.slurm.model import NodeInfo
from hpcstage.watch.slurm.parse import parse_nodes_json


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ("IDLE", False),
        ("ALLOCATED+CLOUD", False),  # a cloud node that is up
        ("IDLE+POWER_DOWN", False),  # a power-down Slurm will do: still up now
        ("MIXED+DRAIN", False),
        ("IDLE+CLOUD+POWERED_DOWN", True),
        ("IDLE+POWERED_DOWN", True),
        ("DOWN+CLOUD+POWERED_DOWN+NOT_RESPONDING", True),
        ("ALLOCATED+CLOUD+POWERING_UP", True),
        ("IDLE+POWERING_UP+NOT_RESPONDING", True),
        ("IDLE+POWERING_DOWN", True),
        ("idle+powered_down", True),
        ("IDLE+POWER_SAVE", True),  # before 21.08
    ],
)
def test_asleep(state: str, expected: bool) -> None:
    assert asleep(state) is expected


GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def _nodes(golden: str, states: dict[str, tuple[object, list[str] | None]]) -> str:
    """The recorded node JSON, its first node copied once per entry of ``states``."""
    doc: dict[str, Any] = json.loads((GOLDEN / golden).read_text())
    first = doc["nodes"][0]
    doc["nodes"] = []
    for name, (state, flags) in states.items():
        record = {**first, "name": name, "state": state}
        if flags is not None:
            record["state_flags"] = flags
        doc["nodes"].append(record)
    return json.dumps(doc)


def test_22_05_sinfo_json_states() -> None:
    # 22.05: a lower-case base state and a separate list of flags.
    text = _nodes(
        "slurm-22.05/sinfo.json",
        {
            "n1": ("idle", []),
            "c1": ("idle", ["CLOUD", "POWERED_DOWN"]),
            "c2": ("allocated", ["CLOUD", "POWERING_UP"]),
            "c3": ("allocated", ["CLOUD"]),
        },
    )
    states = {n.name: n.state for n in parse_nodes_json(text)}
    assert states["c1"] == "IDLE+CLOUD+POWERED_DOWN"
    assert awake_nodes(states) == {"n1", "c3"}


def test_24_11_scontrol_json_states() -> None:
    # 23.02+: one list, base state and flags together.
    text = _nodes(
        "slurm-24.11-recorded/scontrol-show-nodes.json",
        {
            "n1": (["IDLE"], None),
            "c1": (["IDLE", "CLOUD", "POWERED_DOWN"], None),
            "c2": (["ALLOCATED", "CLOUD", "POWERING_UP"], None),
            "c3": (["IDLE", "POWERING_DOWN"], None),
            "c4": (["MIXED", "CLOUD"], None),
        },
    )
    states = {n.name: n.state for n in parse_nodes_json(text)}
    assert awake_nodes(states) == {"n1", "c4"}


def test_a_node_slurm_does_not_list_is_not_awake() -> None:
    # Powered-down cloud nodes are hidden from sinfo/scontrol without PrivateData=cloud.
    assert "c9" not in awake_nodes({"n1": "IDLE"})


def test_a_node_slurm_does_not_list_counts_as_asleep_for_a_bounded_time() -> None:
    # c2 was listed at 100 s, c9 never (the daemon's first listing was at 50 s): both may be
    # hidden cloud nodes, or gone for good; past the bound, work for them is tried and fails
    # the usual way rather than waiting for ever.
    states = {"n1": "IDLE", "c1": "IDLE+CLOUD+POWERED_DOWN"}
    now = Awake(states, {"c2": 100.0}, since=50.0, now=100.0)
    assert ("n1" in now, "c1" in now, "c2" in now, "c9" in now) == (True, False, False, False)
    later = Awake(states, {"c2": 100.0}, since=50.0, now=50.0 + UNLISTED_ASLEEP)
    assert ("c1" in later, "c2" in later, "c9" in later) == (False, False, True)
    much_later = Awake(states, {"c2": 100.0}, since=50.0, now=100.0 + UNLISTED_ASLEEP)
    assert "c2" in much_later and "c1" not in much_later  # a listed sleeper sleeps on


class _Backend:
    """The one SlurmBackend method NodeAgents' refresh uses."""

    def __init__(self, states: dict[str, str]) -> None:
        self.states = states

    async def nodes(self) -> list[NodeInfo]:
        return [NodeInfo(n, "127.0.0.1", n, state, 1) for n, state in self.states.items()]


def _agents(power_saving: bool, states: dict[str, str]) -> NodeAgents:
    settings = parse_config(
        '[site]\nname = "t"\nstate_dir = "/nonexistent"\n'
        '[store]\nendpoint_url = "http://127.0.0.1:9"\n'
        f"[slurm]\npower_saving = {str(power_saving).lower()}\n"
        '[cache]\ncluster_nodes = ["cache1"]\n'
    )
    agents = NodeAgents(settings, cast(SlurmBackend, _Backend(states)), StoreAccess())
    asyncio.run(agents.refresh_nodes())
    return agents


def test_the_daemon_sees_the_nodes_power_state_at_each_refresh() -> None:
    states = {"n1": "IDLE", "c1": "ALLOCATED+CLOUD+POWERING_UP"}
    agents = _agents(True, states)
    assert ["n1" in agents.awake(), "c1" in agents.awake()] == [True, False]
    assert [agents.powered_down(n) for n in ("n1", "c1", "c9", "cache1")] == [
        False,
        True,
        True,  # not listed: a hidden cloud node
        False,  # the cache cluster need not be Slurm's
    ]
    states["c1"] = "ALLOCATED+CLOUD"  # its slurmd registered
    asyncio.run(agents.refresh_nodes())
    assert "c1" in agents.awake() and not agents.powered_down("c1")


def test_without_power_saving_no_node_counts_as_powered_down() -> None:
    agents = _agents(False, {"c1": "IDLE+CLOUD+POWERED_DOWN"})
    assert not agents.powered_down("c1") and not agents.powered_down("c9")
