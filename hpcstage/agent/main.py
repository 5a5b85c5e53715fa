"""``hpcstage agent``: runs on a compute node as the service account and moves bytes.

It reads calls from stdin and writes replies to stdout (JSON lines: ``hpcstage.protocol``).
The daemon decides; the agent lists, fetches into the node cache (verified, crash-safe,
shared by jobs), builds job views with hardlinks, releases them and evicts by policy.

Where each call is answered: ``server.py`` (routing), ``calls.py`` (hello, credentials,
release, usage, evict, ping), ``stagein.py`` (stage), ``uploader.py`` (stage_out),
``peer.py`` (peer_*). They share a ``context.NodeContext``. The agent never imports the
daemon's side (``hpcstage.staging``, ``hpcstage.service``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

from hpcstage.agent.context import NodeContext
from hpcstage.agent.server import serve
from hpcstage.cache import NodeCache
from hpcstage.cache.fence import EpochFence
from hpcstage.cache.layout import NO_GUARD, lock_cache
from hpcstage.cache.views import hardlinks_protected
from hpcstage.core.fencing import Epoch, describe
from hpcstage.errors import FencedError
from hpcstage.logs import LogFormat, setup_logging

log = logging.getLogger("hpcstage.agent")

LOCK_WAIT = 60.0  # seconds a new agent waits for the previous one of its cache to exit
FENCE_CHECK = 1.0  # seconds between an agent's checks of its cache's epoch record
REPLY_GRACE = 0.2  # seconds a superseded agent leaves its last replies to go out
EXIT_FENCED = 4  # exit status of an agent that a newer leader epoch superseded


def run_agent(
    node: str, cache_dir: Path, log_format: LogFormat = "auto", epoch: Epoch | None = None
) -> None:
    """Entry point of ``hpcstage agent``; ``epoch``: the leader epoch of the daemon that
    started it (None: started by hand, not fenced)."""
    # Over SSH, the daemon parses the text form (staging/pool.py: _AGENT_LINE).
    line = f"agent[{node}] %(levelname)s %(message)s"
    setup_logging(logging.INFO, log_format, text=line, journal=line, fields={"node": node})
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Claimed before waiting for the cache's lock: an agent of an older epoch may hold it,
    # and it lets go only once it sees this epoch recorded.
    fence = _claim(node, cache_dir, epoch) if epoch is not None else None
    lock_cache(cache_dir, LOCK_WAIT)  # held until this process exits
    if not hardlinks_protected():
        log.warning(
            "fs.protected_hardlinks is 0: a job can hardlink its inputs outside its directory"
            " and keep them from eviction; set it to 1 (sysctl, the usual default)"
        )
    # Closing the cache at exit flushes what is still unsynced and marks it durable, so a
    # clean reboot after it does not discard those objects (see cache/durable.py).
    guard = fence.guard if fence is not None else NO_GUARD
    with NodeCache(cache_dir, guard=guard) as cache:
        asyncio.run(serve(NodeContext(node=node, cache=cache, fence=fence)))


def _claim(node: str, cache_dir: Path, epoch: Epoch) -> EpochFence:
    """Record ``epoch`` in the cache (exit EXIT_FENCED if a newer one is) and start watching
    the record: a newer epoch claimed later stops this agent."""
    watch = _Watch()
    fence = EpochFence(cache_dir, epoch, on_superseded=watch.superseded)
    try:
        fence.claim(f"{socket.gethostname()} pid {os.getpid()} (agent for {node})")
    except FencedError as exc:
        log.critical("%s", exc)
        sys.exit(EXIT_FENCED)
    log.info("serving leader %s", describe(epoch))
    threading.Thread(target=watch.run, args=(fence,), name="fence", daemon=True).start()
    return fence


class _Watch:
    """Checks the epoch record every FENCE_CHECK seconds, and at once when a commit or a call
    found it newer; a newer epoch ends the process.

    A thread of its own, not a task: it must act while the event loop or the worker threads
    are busy. The exit is ``os._exit``, as if killed: what is in flight stops where it is,
    and the next agent's reconcile clears it (temp files are never indexed). It releases
    ``agent.lock`` for the newer daemon's agent, which waits for it."""

    def __init__(self) -> None:
        self._wake = threading.Event()

    def superseded(self, _exc: FencedError) -> None:
        self._wake.set()

    def run(self, fence: EpochFence) -> None:
        while True:
            self._wake.wait(FENCE_CHECK)
            self._wake.clear()
            try:
                fence.check()
            except FencedError as exc:
                # Said from a thread of its own: with the daemon gone, stderr may be a pipe
                # nobody reads any more, and a full pipe must not keep this agent alive.
                said = threading.Thread(target=log.critical, args=("%s; exiting", exc))
                said.daemon = True
                said.start()
                time.sleep(REPLY_GRACE)  # a refused call's reply, already written, goes out
                os._exit(EXIT_FENCED)
            except Exception as exc:  # a disk error: the commit guard refuses meanwhile
                log.error("cannot check the leader epoch record: %s", exc)
