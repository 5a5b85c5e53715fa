"""The site's S3 credentials and region as the daemon holds them now.

Shared by the agent sessions (handed over in each hello) and the daemon's own store clients;
the credential timer (service/timers.py) replaces ``credentials`` when botocore refreshes them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StoreAccess:
    """Current S3 credentials (None: the AWS defaults) and the region resolved at start-up."""

    credentials: dict[str, str] | None = None
    region: str = "us-east-1"  # store.region, else the AWS environment's
