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
from pathlib import Path

from hpcstage.agent.context import NodeContext
from hpcstage.agent.server import serve
from hpcstage.cache import NodeCache
from hpcstage.cache.layout import lock_cache
from hpcstage.cache.views import hardlinks_protected
from hpcstage.logs import LogFormat, setup_logging

log = logging.getLogger("hpcstage.agent")

LOCK_WAIT = 60.0  # seconds a new agent waits for the previous one of its cache to exit


def run_agent(node: str, cache_dir: Path, log_format: LogFormat = "auto") -> None:
    """Entry point of ``hpcstage agent``."""
    # Over SSH, the daemon parses the text form (staging/pool.py: _AGENT_LINE).
    line = f"agent[{node}] %(levelname)s %(message)s"
    setup_logging(logging.INFO, log_format, text=line, journal=line, fields={"node": node})
    cache_dir.mkdir(parents=True, exist_ok=True)
    lock_cache(cache_dir, LOCK_WAIT)  # held until this process exits
    if not hardlinks_protected():
        log.warning(
            "fs.protected_hardlinks is 0: a job can hardlink its inputs outside its directory"
            " and keep them from eviction; set it to 1 (sysctl, the usual default)"
        )
    # Closing the cache at exit flushes what is still unsynced and marks it durable, so a
    # clean reboot after it does not discard those objects (see cache/durable.py).
    with NodeCache(cache_dir) as cache:
        asyncio.run(serve(NodeContext(node=node, cache=cache)))
