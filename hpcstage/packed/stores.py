"""Opening the store a packed dataset lives on as the person running the command: the site's
S3 endpoint (``[store]`` of the site configuration, or ``AWS_ENDPOINT_URL``) with that person's
own credentials (the AWS chain: environment, ~/.aws, a profile), or a shared filesystem path.

Used by ``hpcstage pack``/``ls``/``cat`` and the fsspec filesystem, which run on login nodes and
in notebooks, never with the daemon's credentials.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcstage.config import paths
from hpcstage.errors import ConfigError, PackError
from hpcstage.store.fs import FsStore
from hpcstage.store.protocol import MIB, ObjectStore, parse_s3_url
from hpcstage.store.s3 import S3Store

CONFIG_ENV = paths.ENV_VAR


@dataclass(frozen=True)
class StoreAccess:
    """How to reach the S3 store: the endpoint and the signing details, never credentials."""

    endpoint_url: str | None = None  # None: AWS's own endpoint
    region: str = ""
    profile: str | None = None
    addressing_style: str = "path"
    verify_tls: bool = True
    ca_bundle: str | None = None

    @classmethod
    def from_site(cls, config: Path | None = None, **overrides: Any) -> StoreAccess:
        """The site configuration's ``[store]`` (``config``, else $HPCSTAGE_CONFIG, else
        /etc/hpcstage/site.toml if it exists, else none), then ``AWS_ENDPOINT_URL``, then
        ``overrides`` (None values ignored)."""
        found: dict[str, Any] = {}
        env = Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None
        path = paths.optional_site_config(config or env)
        if path is not None:
            found = _store_table(path)
        if "endpoint_url" not in found and os.environ.get("AWS_ENDPOINT_URL"):
            found["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
        found.update({k: v for k, v in overrides.items() if v is not None})
        # "" in the file means "the default" for these keys (as the daemon reads them).
        known = {k: found[k] for k in cls.__dataclass_fields__ if found.get(k) not in (None, "")}
        return cls(**known)

    def s3(self, bucket: str, max_connections: int = 16) -> S3Store:
        """A client of ``bucket`` signing with the caller's own credentials."""
        region = self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return S3Store(
            self.endpoint_url,
            bucket,
            region=region or "us-east-1",
            profile=self.profile,
            addressing_style=self.addressing_style,
            verify_tls=self.verify_tls,
            ca_bundle=self.ca_bundle,
            max_connections=max_connections,
            # A pack uploads segments of up to 256 MiB, several at once, on a login node: in
            # parts streamed from the file, never whole in memory (S3Store reads an object
            # below the multipart threshold into memory to send its Content-MD5).
            part_size=8 * MIB,
            multipart_threshold=16 * MIB,
            upload_memory=64 * MIB,
        )

    def open(self, url: str) -> tuple[ObjectStore, str]:
        """The store holding ``url`` (``s3://bucket/key`` or an absolute path) and the key."""
        if url.startswith("s3://"):
            try:
                bucket, key = parse_s3_url(url)
            except ValueError as exc:
                raise PackError(str(exc)) from None
            return self.s3(bucket), key
        if url.startswith("/"):
            return FsStore(Path("/")), url
        raise PackError(f"{url!r}: expected s3://BUCKET/KEY or an absolute path")


def _store_table(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not a valid TOML file ({exc})") from None
    table = data.get("store", {})
    return dict(table) if isinstance(table, dict) else {}
