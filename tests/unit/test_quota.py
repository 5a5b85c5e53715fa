"""Quota budgets (pure)."""

from __future__ import annotations

from hpcstage.config.schema import QuotaSettings
from hpcstage.core.quota import budget

KIB = 1024


def test_no_quotas_no_limit() -> None:
    assert budget(QuotaSettings(), "chem", "n1", 10**12, 10**12).max_bytes is None


def test_job_limit_counts_what_the_job_already_staged() -> None:
    got = budget(QuotaSettings(max_job_bytes=100 * KIB), "chem", "n1", 30 * KIB, 0)
    assert got.max_bytes == 70 * KIB
    assert "quotas.max_job_bytes is 100KiB" in got.reason


def test_account_quota_counts_other_jobs_leases_on_the_node() -> None:
    quotas = QuotaSettings(accounts={"chem": 300 * KIB}, account_bytes_per_node=10 * KIB)
    got = budget(quotas, "chem", "n2", 0, 250 * KIB)
    assert got.max_bytes == 50 * KIB
    assert "account chem may hold 300KiB on n2" in got.reason
    assert budget(quotas, "bio", "n2", 0, 0).max_bytes == 10 * KIB  # the default per account


def test_the_tighter_limit_wins_and_never_goes_negative() -> None:
    quotas = QuotaSettings(max_job_bytes=100 * KIB, accounts={"chem": 120 * KIB})
    assert budget(quotas, "chem", "n1", 0, 100 * KIB).max_bytes == 20 * KIB
    assert budget(quotas, "chem", "n1", 0, 500 * KIB).max_bytes == 0
