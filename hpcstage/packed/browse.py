"""Reading a packed dataset without staging it, synchronously: listing a directory, finding a
file, reading its verified bytes straight from the store with ranged GETs.

``hpcstage ls``/``cat`` and the fsspec filesystem (``hpcstage.packed.fsspec_fs``) sit on this.
It owns an event loop in a daemon thread, so plain (non-async) code, notebooks included, can
call it; each call blocks until its answer.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from hpcstage.core.packed import DatasetRef, VersionInfo, check_member_path, check_subtree
from hpcstage.errors import PackError
from hpcstage.packed.dataset import PackedDataset
from hpcstage.packed.manifest import ManifestReader, Member, RangeFile
from hpcstage.packed.stores import StoreAccess

T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    """One name in a directory of a dataset: a file (with its row) or a directory."""

    name: str
    member: Member | None  # None: a directory

    @property
    def is_dir(self) -> bool:
        return self.member is None


class Browser:
    """One version of the dataset at ``url`` (``s3://bucket/p/x.hpack[@N]/``), opened for
    reading; the newest version when the URL pins none."""

    def __init__(self, url: str, access: StoreAccess | None = None) -> None:
        access = access or StoreAccess.from_site()
        store, key = access.open(url)
        self.ref = DatasetRef.parse(key if key.endswith("/") else key + "/")
        self.url = url
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.dataset = PackedDataset(store, self.ref.prefix)
        self._info: VersionInfo | None = None
        self._reader: ManifestReader | None = None

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self.dataset.store.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- versions -------------------------------------------------------------------------

    def versions(self) -> list[VersionInfo]:
        """Every version's record, oldest first."""
        return [self._run(self.dataset.record(v)) for v in self._run(self.dataset.versions())]

    @property
    def info(self) -> VersionInfo:
        """The version this browser reads (pinned by the URL, else the newest)."""
        if self._info is None:
            self._info = self._run(self.dataset.record(self.ref.version))
        return self._info

    def _manifest(self) -> ManifestReader:
        if self._reader is None:
            ref = self._run(self.dataset.manifest_ref(self.info))

            def fetch(start: int, length: int) -> bytes:
                return self._run(self.dataset.store.read_range(ref, start, length))

            source = RangeFile(ref.size, fetch)
            self._reader = ManifestReader(source, self.dataset.url(self.info.manifest))
        return self._reader

    # -- reading --------------------------------------------------------------------------

    def entries(self, directory: str = "") -> Iterator[Entry]:
        """The names directly in ``directory`` ("" = the top), in order."""
        subtree = self._subtree(directory)
        for name, member in self._manifest().entries(subtree):
            yield Entry(name, member)

    def walk(self, directory: str = "") -> Iterator[Member]:
        """Every file under ``directory``, in path order, a row group in memory at a time."""
        for batch in self._manifest().select(self._subtree(directory)):
            yield from batch

    def find(self, path: str) -> Member | None:
        """The file at ``path`` (None: there is none; a directory is not a file)."""
        return self._manifest().lookup(check_member_path(path.strip("/")))

    def is_dir(self, path: str) -> bool:
        """True when ``path`` ("" = the top) holds at least one file below it."""
        return next(iter(self._manifest().entries(self._subtree(path))), None) is not None

    def read(self, member: Member) -> bytes:
        """The member's bytes, checked against its CRC-32 (PackError when they are not)."""
        if member.size == 0:
            return b""
        segment = self._run(self.dataset.segment_ref(self.info, member.segment))
        return self._run(self.dataset.read_members(segment, [member]))[0]

    def cat(self, path: str) -> bytes:
        member = self.find(path)
        if member is None:
            raise PackError(f"{self.where(path)}: no such file in version {self.info.version}")
        return self.read(member)

    def where(self, path: str) -> str:
        return f"{self.dataset.url()}{path.strip('/')}"

    def _subtree(self, directory: str) -> str:
        base = self.ref.subtree
        rel = directory.strip("/")
        return check_subtree(base + rel) if rel else base
