"""Fencing epochs: which daemon's agents may still write to a node cache (pure rules).

Each leadership term of a state database has an epoch, taken from the database when a daemon
becomes active (``Fencing`` in db/models.py): ``Epoch(state, number)``, where ``state`` names
the state database (a random id made with its schema) and ``number`` grows by one with every
term. The daemon hands its epoch to every agent it starts. Each node cache records the newest
epoch an agent claimed there (``cache/fence.py``), and:

1. An agent claims its epoch before it waits for the cache's lock: a newer one replaces the
   record (``claim``), an older one means a newer daemon is active and the agent refuses to
   start.
2. An agent that finds a newer epoch recorded than its own is *superseded* (``superseded``):
   it refuses every call, writes nothing more, and exits, releasing the cache's lock.
3. Epochs of one state database are ordered by number. Epochs of two state databases are not
   ordered: the claim that came last wins (a site that moved to a new state database must not
   be fenced by the old one), so the agents of the older claim are superseded.
4. No epoch recorded (a cache from before fencing, or its record removed) supersedes nothing.

The record is one line of JSON: ``{"state": ..., "epoch": N, "holder": ..., "at": T}``;
``holder`` and ``at`` (who claimed it, when) are for people.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True)
class Epoch:
    """One leadership term of one state database."""

    state: str  # the state database's id
    number: int  # 1 for its first term, then one more for each


class Claim(StrEnum):
    """What an agent starting with an epoch does with the record it finds."""

    RECORD = "record"  # newer than the record (or none): write it
    KEEP = "keep"  # the record is this epoch already
    REFUSE = "refuse"  # a newer epoch is recorded: its daemon's agents own the node


def claim(mine: Epoch, recorded: Epoch | None) -> Claim:
    """Rules 1, 3 and 4: what claiming ``mine`` over ``recorded`` does."""
    if recorded is None or recorded.state != mine.state or recorded.number < mine.number:
        return Claim.RECORD
    return Claim.KEEP if recorded.number == mine.number else Claim.REFUSE


def superseded(mine: Epoch, recorded: Epoch | None) -> bool:
    """Rules 2-4: whether an agent of epoch ``mine`` must stop, given the record."""
    if recorded is None:
        return False
    return recorded.state != mine.state or recorded.number > mine.number


def record_text(epoch: Epoch, holder: str, at: float) -> str:
    """The record's file content for ``epoch`` claimed by ``holder`` at Unix time ``at``."""
    doc = {"state": epoch.state, "epoch": epoch.number, "holder": holder, "at": round(at, 3)}
    return json.dumps(doc) + "\n"


def parse_record(text: str) -> Epoch | None:
    """The epoch in a record's text; None if it holds none (empty). ValueError if it is not
    a record: a damaged record must stop the agent, not be read as "no epoch"."""
    if not text.strip():
        return None
    doc = json.loads(text)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    state, number = doc.get("state"), doc.get("epoch")
    if not isinstance(state, str) or not state:
        raise ValueError(f"no state id: {doc!r}")
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:
        raise ValueError(f"no epoch number: {doc!r}")
    return Epoch(state, number)


def describe(epoch: Epoch) -> str:
    """An epoch for messages: ``epoch 7 (state 1a2b3c4d)``."""
    return f"epoch {epoch.number} (state {epoch.state[:8]})"


def superseded_message(where: str, mine: Epoch, recorded: Epoch) -> str:
    """Why an agent of ``mine`` stops writing to the cache at ``where``."""
    newer = "a newer" if recorded.state == mine.state else "another state database's"
    return (
        f"fenced: this agent serves the daemon of leader {describe(mine)}, and {newer} daemon "
        f"has since claimed {where} with {describe(recorded)}; this agent writes nothing more"
    )


def refused_message(where: str, mine: Epoch, recorded: Epoch) -> str:
    """Why an agent started with ``mine`` does not start at all."""
    return (
        f"fenced: {where} is claimed by leader {describe(recorded)}, newer than this agent's "
        f"{describe(mine)}: a newer hpcstage daemon is active, and this one must not act"
    )
