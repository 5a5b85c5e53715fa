"""The daemon's own S3 clients (recycle bin): bounded whatever buckets users name."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hpcstage.config.load import parse_config
from hpcstage.service.daemon import Daemon
from hpcstage.staging.bins import STORE_CLIENTS


def test_the_daemon_keeps_few_store_clients_whatever_buckets_users_name(tmp_path: Path) -> None:
    settings = parse_config(
        f'[site]\nname = "t"\nstate_dir = "{tmp_path}"\n'
        '[store]\nendpoint_url = "http://127.0.0.1:9"\n'
    )
    daemon = Daemon(settings)

    async def run() -> None:
        for i in range(50):  # `hpcstage trash ls BUCKET` with a new name each time
            async with daemon.store(f"bucket-{i}") as store:
                assert store.bucket == f"bucket-{i}"
            assert len(daemon.bins.stores) <= STORE_CLIENTS
        await daemon.shutdown()
        assert len(daemon.bins.stores) == 0

    asyncio.run(run())
