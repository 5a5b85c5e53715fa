"""The audit log: one JSON object per line, appended, for who staged what from where to where.

Refusals are recorded too. Lines are written with O_APPEND and flushed at once, so a crash
loses at most the line being written; the file lives in site.state_dir (daemon-only).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("hpcstage.audit")


class AuditLog:
    """Append-only JSON lines at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def record(self, event: str, **fields: Any) -> None:
        """Append ``{"ts", "event", **fields}``; a failure is logged, never raised."""
        line = json.dumps(
            {"ts": round(time.time(), 3), "event": event, **fields},
            separators=(",", ":"),
            default=str,
        )
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode() + b"\n")
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("cannot write the audit log %s: %s", self.path, exc)
