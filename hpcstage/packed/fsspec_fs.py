"""A read-only fsspec filesystem over one packed dataset, for Python code that wants its files
without staging them::

    import fsspec
    fs = fsspec.filesystem("hpack", dataset="s3://bucket/lib/ligands.hpack@3/")
    fs.ls("set1")
    with fs.open("set1/000001.sdf") as f:
        data = f.read()

Paths are relative to the dataset (a leading '/' or the dataset URL itself is accepted). Every
file read is checked against its CRC-32. The store is reached as the caller (see
``hpcstage.packed.stores``); ``endpoint_url=``/``profile=`` override the site's settings.
"""

from __future__ import annotations

import io
from typing import Any

from fsspec.spec import AbstractFileSystem

from hpcstage.packed.browse import Browser, Entry
from hpcstage.packed.manifest import Member
from hpcstage.packed.stores import StoreAccess


class PackedFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """fsspec's protocol ``hpack``: one version of one packed dataset, read-only."""

    protocol = "hpack"
    root_marker = ""

    def __init__(
        self,
        dataset: str,
        endpoint_url: str | None = None,
        profile: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        access = StoreAccess.from_site(endpoint_url=endpoint_url, profile=profile)
        self.browser = Browser(dataset, access)
        self.dataset = dataset.rstrip("/") + "/"

    def _rel(self, path: str) -> str:
        path = self._strip_protocol(path)
        if path.startswith(self.dataset):
            path = path[len(self.dataset) :]
        return path.strip("/")

    def ls(self, path: str = "", detail: bool = True, **_: Any) -> list[Any]:
        rel = self._rel(path)
        member = self.browser.find(rel) if rel else None
        if member is not None:
            out = [_info(rel, member)]
        else:
            entries = list(self.browser.entries(rel))
            if not entries and rel:
                raise FileNotFoundError(path)
            base = f"{rel}/" if rel else ""
            out = [_entry(base, e) for e in entries]
        return out if detail else [o["name"] for o in out]

    def info(self, path: str, **_: Any) -> dict[str, Any]:
        rel = self._rel(path)
        if not rel:
            return {"name": "", "size": 0, "type": "directory"}
        member = self.browser.find(rel)
        if member is not None:
            return _info(rel, member)
        if self.browser.is_dir(rel):
            return {"name": rel, "size": 0, "type": "directory"}
        raise FileNotFoundError(path)

    def _open(self, path: str, mode: str = "rb", **_: Any) -> io.BytesIO:
        if mode != "rb":
            raise PermissionError(f"{self.dataset} is read-only (mode {mode!r})")
        rel = self._rel(path)
        member = self.browser.find(rel)
        if member is None:
            raise FileNotFoundError(path)
        return io.BytesIO(self.browser.read(member))

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **_: Any
    ) -> bytes:
        with self._open(path) as fh:
            return fh.getvalue()[start:end]


def _info(path: str, member: Member) -> dict[str, Any]:
    return {
        "name": path,
        "size": member.size,
        "type": "file",
        "mode": member.mode,
        "mtime": member.mtime_ns / 1e9,
        "crc32": member.crc32,
    }


def _entry(base: str, entry: Entry) -> dict[str, Any]:
    if entry.member is None:
        return {"name": base + entry.name, "size": 0, "type": "directory"}
    return _info(base + entry.name, entry.member)
