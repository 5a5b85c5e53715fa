"""A node cache's record of the newest leader epoch (rules: ``core/fencing.py``), on disk.

``CACHE/epoch`` holds the record, replaced atomically (temp file, fsync, rename, fsync of the
directory). ``CACHE/epoch.lock`` (flock) orders who writes it and who relies on it:

- an agent claiming an epoch holds it exclusively while it reads and replaces the record;
- every commit holds it shared from its check of the record to its last rename and index row
  (``EpochFence.guard``).

So once a claim has returned, no agent of an older epoch commits anything to the cache: a
commit either finished before the claim, or checks after it and is refused. The claim never
waits for the cache's own lock (``agent.lock``), which the superseded agent may hold: that
agent finds the newer record at its next check and exits, releasing it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

from hpcstage.cache.layout import EPOCH, EPOCH_LOCK, fsync_dir
from hpcstage.core import fencing
from hpcstage.core.fencing import Epoch
from hpcstage.errors import CacheError, FencedError

OnSuperseded = Callable[[FencedError], None]


class EpochFence:
    """One agent's epoch, checked against its node cache's record."""

    def __init__(self, root: Path, mine: Epoch, on_superseded: OnSuperseded | None = None):
        """``on_superseded`` is called (from any thread) before FencedError is raised by a
        check that finds a newer epoch: the agent exits from there."""
        self.root = Path(root)
        self.mine = mine
        self._on_superseded = on_superseded

    @property
    def record(self) -> Path:
        return self.root / EPOCH

    def claim(self, holder: str) -> fencing.Claim:
        """Record this epoch unless a newer one is (rule 1); FencedError if one is."""
        with self._locked(fcntl.LOCK_EX):
            try:
                recorded = self._read()
            except CacheError:
                recorded = None  # damaged: the claim writes a sound record over it
            decision = fencing.claim(self.mine, recorded)
            if decision is fencing.Claim.REFUSE:
                assert recorded is not None
                raise FencedError(fencing.refused_message(str(self.root), self.mine, recorded))
            if decision is fencing.Claim.RECORD:
                self._write(fencing.record_text(self.mine, holder, time.time()))
            return decision

    def check(self) -> None:
        """FencedError if a newer epoch is recorded (rule 2), after ``on_superseded``."""
        with self._locked(fcntl.LOCK_SH):
            self._check()

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Check, then hold the record steady until the block ends: no newer epoch can be
        claimed while a commit inside it renames and indexes."""
        with self._locked(fcntl.LOCK_SH):
            self._check()
            yield

    def _check(self) -> None:
        try:
            recorded = self._read()
        except CacheError as exc:  # unreadable: another writer than hpcstage; stop to be safe
            self._stop(FencedError(f"fenced: {exc}; this agent writes nothing more"))
        if recorded is not None and fencing.superseded(self.mine, recorded):
            message = fencing.superseded_message(str(self.root), self.mine, recorded)
            self._stop(FencedError(message))

    def _stop(self, exc: FencedError) -> NoReturn:
        if self._on_superseded is not None:
            self._on_superseded(exc)
        raise exc

    def _read(self) -> Epoch | None:
        try:
            text = self.record.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CacheError(f"cannot read the epoch record {self.record}: {exc}") from exc
        try:
            return fencing.parse_record(text)
        except ValueError as exc:
            raise CacheError(f"the epoch record {self.record} is damaged: {exc}") from exc

    def _write(self, text: str) -> None:
        temp = self.record.with_name(f"{EPOCH}.tmp-{secrets.token_hex(8)}")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, text.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temp, self.record)
            fsync_dir(self.root)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise CacheError(f"cannot record the leader epoch in {self.record}: {exc}") from exc

    @contextlib.contextmanager
    def _locked(self, how: int) -> Iterator[None]:
        path = self.root / EPOCH_LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise CacheError(f"cannot open {path}: {exc}") from exc
        try:
            fcntl.flock(fd, how)
            yield
        finally:
            os.close(fd)  # drops the flock
