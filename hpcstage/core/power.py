"""Slurm power saving: which nodes have no agent to stage onto until Slurm has resumed them.

A node Slurm powered down (SuspendProgram, or a ``State=CLOUD`` node not booted yet) runs no
slurmd and no agent; one being resumed (ResumeProgram ran, its slurmd has not registered) is
not there yet either. Staging onto such a node fails, and failing it would drop the node from
its job for good, so the planner stages elsewhere meanwhile (docs/slurm-integration.md,
"Elastic cloud nodes"). Pure: the node states are the text ``NodeInfo.state`` holds, upper-case
words joined by "+", the same for every source:

- 22.05 ``sinfo --json``: ``"state": "idle", "state_flags": ["CLOUD", "POWERED_DOWN"]``
- 24.11 ``scontrol --json show nodes``: ``"state": ["IDLE", "CLOUD", "POWERED_DOWN"]``
- ``scontrol show node -o``: ``State=IDLE+CLOUD+POWERED_DOWN``
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# The state flags (22.05 to 24.11) of a node whose slurmd is not running: off (POWERED_DOWN),
# being switched off (POWERING_DOWN: SuspendProgram ran, SuspendTimeout not over) or booting
# (POWERING_UP: ResumeProgram ran, the node has not registered yet). POWER_DOWN alone is not
# one: it is a power-down Slurm will do once the node is idle, and the node is still up.
# POWER_UP is a power-up asked for (scontrol) that ResumeProgram has not begun: still off.
# POWER_SAVE is the name of POWERED_DOWN before 21.08.
ASLEEP_FLAGS = frozenset({"POWERED_DOWN", "POWERING_DOWN", "POWERING_UP", "POWER_SAVE", "POWER_UP"})

# How long a node Slurm does not list counts as asleep (seconds since it was last listed, or
# since the daemon's first listing): a powered-down cloud node is hidden without
# PrivateData=cloud, but so is a node removed from slurm.conf. Past this, work for it is
# tried like any node's and fails the usual way (backoff, then dropped or failed) rather than
# waiting for good (docs/slurm-integration.md, "Elastic cloud nodes").
UNLISTED_ASLEEP = 600.0


def asleep(state: str) -> bool:
    """True when a node in ``state`` (e.g. ``"IDLE+CLOUD+POWERED_DOWN"``) has no slurmd."""
    return not ASLEEP_FLAGS.isdisjoint(state.upper().split("+"))


def awake_nodes(states: Mapping[str, str]) -> frozenset[str]:
    """The nodes of ``{node: state}`` that are up. A node Slurm did not list is not among
    them: a powered-down cloud node is hidden from sinfo and scontrol unless the site sets
    ``PrivateData=cloud``."""
    return frozenset(node for node, state in states.items() if not asleep(state))


@dataclass(frozen=True)
class Awake:
    """Which nodes are up, from Slurm's node list (``node in awake``; the planner's view).

    ``states``: ``{node: state}`` at the last listing; ``listed_at``: when each node was last
    listed; ``since``: the daemon's first listing. A node not listed now counts as asleep for
    ``UNLISTED_ASLEEP`` seconds after it was last listed (or after ``since``).
    """

    states: Mapping[str, str]
    listed_at: Mapping[str, float]
    since: float
    now: float

    def __contains__(self, node: object) -> bool:
        if not isinstance(node, str):
            return False
        state = self.states.get(node)
        if state is not None:
            return not asleep(state)
        return self.now - self.listed_at.get(node, self.since) >= UNLISTED_ASLEEP
