"""Quotas: how many bytes one more input of a job may bring onto a node. Pure.

Two limits, from ``[quotas]``: a per-job staging limit (``max_job_bytes``) and per-account
cache bytes per node (``accounts.<name>``, else ``account_bytes_per_node``); 0 means none.
Leased data of other jobs counts against its account and is never evicted to make room.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from hpcstage.core.units import format_size

if TYPE_CHECKING:  # core reads the settings' attributes; pydantic stays out of it
    from hpcstage.config.schema import QuotaSettings


@dataclass(frozen=True)
class Budget:
    """At most ``max_bytes`` more (None: unlimited), and the rule that sets it, for messages."""

    max_bytes: int | None
    reason: str
    per_job: bool = False  # set by the job's own limit (the same on every node)


def budget(
    quotas: QuotaSettings, account: str, node: str, job_used: int, account_used: int
) -> Budget:
    """The tighter of the job limit and the account's remaining quota on ``node``."""
    options = []
    if quotas.max_job_bytes:
        left = quotas.max_job_bytes - job_used
        options.append(
            Budget(
                max(left, 0),
                f"the per-job limit quotas.max_job_bytes is {format_size(quotas.max_job_bytes)}",
                per_job=True,
            )
        )
    account_quota = quotas.accounts.get(account, quotas.account_bytes_per_node)
    if account_quota:
        left = account_quota - account_used - job_used
        options.append(
            Budget(
                max(left, 0),
                f"account {account or '(none)'} may hold "
                f"{format_size(account_quota)} on {node} and other jobs of it hold "
                f"{format_size(account_used)}",
            )
        )
    if not options:
        return Budget(None, "")
    return min(options, key=lambda b: b.max_bytes or 0)
