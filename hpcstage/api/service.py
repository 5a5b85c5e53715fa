"""What the HTTP API may ask of the staging service: the whole interface, in one place.

The routes depend on :class:`StagingService`, not on the daemon's class:
:class:`hpcstage.service.daemon.Daemon` satisfies it (mypy checks that where the app is made, in
``hpcstage daemon``), and tests hand the app a fake. A member added here is a new thing the
API may ask; keep it to what the routes need.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from hpcstage.config.schema import Settings
from hpcstage.core.packing import PackRequest
from hpcstage.staging.keepwarm import PinRequest
from hpcstage.staging.meters import Meters
from hpcstage.store.s3 import S3Store


class AuditTrail(Protocol):
    """Where the API writes who did what (auth refusals, logins, restores)."""

    def record(self, event: str, **fields: Any) -> None:
        """Append one event; never raises."""


class ChangeFeed(Protocol):
    """The count of committed changes to jobs, for long polling."""

    @property
    def count(self) -> int:
        """The number of changes so far (a client sends it back as ``since``)."""

    async def wait(self, job: int, since: int | None, timeout: float) -> None:
        """Return once ``job`` changed after ``since``, or after ``timeout`` seconds."""


class StagingService(Protocol):
    """The running daemon, as the API sees it."""

    @property
    def settings(self) -> Settings:
        """The site configuration."""

    @property
    def db(self) -> sessionmaker[Session] | None:
        """The state database (None only before the daemon has started)."""

    @property
    def changes(self) -> ChangeFeed:
        """Committed changes to jobs, for long polling."""

    @property
    def audit(self) -> AuditTrail:
        """The audit log."""

    @property
    def meters(self) -> Meters:
        """What the daemon counts as it stages (bytes, attempts, waits), for /metrics."""

    @property
    def last_tick(self) -> float:
        """Unix time of the last queue snapshot (0 before the first)."""

    @property
    def last_error(self) -> str:
        """The last tick's error, "" if it went well."""

    def live_progress(self) -> dict[int, dict[str, int]]:
        """Per running staging id, counters newer than its database row."""

    def wake(self, fresh: bool = False) -> None:
        """Run a tick now; ``fresh``: with a new queue snapshot."""

    def job_asked(self, job_id: int) -> None:
        """The job with row id ``job_id`` asked for its inputs (``hpcstage env``)."""

    def known_nodes(self) -> list[str]:
        """Nodes Slurm reported at the last refresh."""

    async def unknown_nodes(self, nodes: Iterable[str]) -> list[str]:
        """Those of ``nodes`` Slurm does not know (after asking again)."""

    def create_warmup(self, src: str, nodes: list[str], user: str, admin: bool = False) -> int:
        """Record a warmup; its id. DirectiveError, PermissionError or LimitError if refused."""

    def create_pin(self, pin: PinRequest, user: str, admin: bool = False) -> int:
        """Keep a dataset warm on nodes (``hpcstage pin``); its id. DirectiveError naming the
        bad field, PermissionError for a user who is not an admin."""

    def remove_pin(self, pin_id: int, user: str, admin: bool = False) -> bool:
        """Stop keeping ``pin_id`` warm; False if it is unknown or removed already."""

    def create_pack(self, request: PackRequest, user: str, admin: bool = False) -> int:
        """Record a daemon pack; its id. DirectiveError, PermissionError or LimitError if
        refused."""

    def pack_document(self, session: Session, row: Any) -> dict[str, Any]:
        """A daemon pack's status document, with live progress and the change count."""

    async def cache_usage(self, node: str) -> dict[str, Any]:
        """What ``node``'s cache holds (asks its agent)."""

    async def evict_node(self, node: str) -> int:
        """Apply the eviction policy on ``node`` now; the number of objects evicted."""

    async def check_source(
        self, src: str, nodes: list[str], user: str, admin: bool = False
    ) -> dict[str, Any]:
        """How much of ``src`` each node's cache holds. DirectiveError, PermissionError or
        ObjectMissingError if refused or empty; a node that cannot answer has an error."""

    async def evict_source(
        self, src: str, nodes: list[str], user: str, admin: bool = False
    ) -> dict[str, Any]:
        """Evict ``src``'s cached objects on ``nodes`` (in-use ones stay). DirectiveError or
        PermissionError if refused."""

    def stage_out_buckets(self) -> list[str]:
        """Buckets stage-out has written to (where recycle bins may be)."""

    def store(self, bucket: str) -> contextlib.AbstractAsyncContextManager[S3Store]:
        """A client for ``bucket``, for an ``async with`` block (recycle bin only)."""
