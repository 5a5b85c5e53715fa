"""The one retry policy: backoff bounds, jitter, what is retried and how often."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest

from hpcstage.errors import CredentialError, StoreError, TransientStoreError
from hpcstage.retry import RetryPolicy, backoff_delay, with_retries

FAST = RetryPolicy(retries=3, base=0.0001, cap=0.001)


class Flaky:
    """An operation that fails with ``error`` ``failures`` times, then returns "ok"."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "ok"


def run(policy: RetryPolicy, op: Flaky, retries_seen: list[int] | None = None) -> str:
    def on_retry(attempt: int, delay: float, exc: Exception) -> None:
        if retries_seen is not None:
            retries_seen.append(attempt)

    return asyncio.run(with_retries(policy, "test op", op, on_retry))


def test_backoff_ceiling_doubles_from_base_up_to_cap() -> None:
    policy = RetryPolicy(retries=10, base=0.5, cap=30.0)
    almost_one = 1.0 - 1e-12
    ceilings = [backoff_delay(n, policy, lambda: almost_one) for n in range(10)]
    assert ceilings[:4] == pytest.approx([0.5, 1.0, 2.0, 4.0])
    assert ceilings[-1] == pytest.approx(30.0)
    assert all(b >= a for a, b in itertools.pairwise(ceilings))


def test_backoff_zero_draw_gives_zero_delay() -> None:
    assert backoff_delay(5, RetryPolicy(), lambda: 0.0) == 0.0


@pytest.mark.parametrize("attempt", [0, 1, 3, 7, 20, 10_000])
def test_full_jitter_stays_within_zero_and_cap(attempt: int) -> None:
    policy = RetryPolicy(retries=6, base=0.5, cap=30.0)
    rng = random.Random(attempt)  # noqa: S311 - reproducible draws, not secrets
    delays = [backoff_delay(attempt, policy, rng.random) for _ in range(500)]
    ceiling = min(policy.cap, policy.base * 2.0 ** min(attempt, 60))  # huge n: no overflow
    assert all(0.0 <= d <= ceiling <= policy.cap for d in delays)
    assert max(delays) - min(delays) > ceiling / 2  # actually jittered, not constant


def test_policy_rejects_negative_values() -> None:
    with pytest.raises(ValueError, match="retries"):
        RetryPolicy(retries=-1)
    with pytest.raises(ValueError, match="base and cap"):
        RetryPolicy(base=-0.1)


def test_transient_error_retried_n_times_then_raised() -> None:
    op = Flaky(failures=100, error=TransientStoreError("get s3://b/k: SlowDown"))
    seen: list[int] = []
    with pytest.raises(TransientStoreError, match=r"SlowDown \(gave up after 4 attempts\)") as info:
        run(FAST, op, seen)
    assert op.calls == FAST.retries + 1
    assert seen == [1, 2, 3]
    assert info.value.__cause__ is op.error


def test_no_retries_raises_the_original_error() -> None:
    op = Flaky(failures=1, error=TransientStoreError("boom"))
    with pytest.raises(TransientStoreError) as info:
        run(RetryPolicy(retries=0), op)
    assert info.value is op.error
    assert op.calls == 1


def test_success_after_k_failures_returns_the_result() -> None:
    op = Flaky(failures=2, error=TransientStoreError("reset"))
    seen: list[int] = []
    assert run(FAST, op, seen) == "ok"
    assert op.calls == 3
    assert seen == [1, 2]


@pytest.mark.parametrize(
    "error",
    [
        CredentialError("ExpiredToken"),
        StoreError("no such object: s3://b/k"),
        ValueError("a bug"),
        OSError(28, "No space left on device"),
    ],
)
def test_non_transient_errors_are_never_retried(error: Exception) -> None:
    op = Flaky(failures=100, error=error)
    seen: list[int] = []
    with pytest.raises(type(error)) as info:
        run(FAST, op, seen)
    assert info.value is error
    assert op.calls == 1
    assert seen == []


def test_sleeps_what_backoff_says(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []

    async def fake_sleep(delay: float) -> None:
        slept.append(delay)

    monkeypatch.setattr("hpcstage.retry.asyncio.sleep", fake_sleep)
    monkeypatch.setattr("hpcstage.retry.random.random", lambda: 0.5)
    policy = RetryPolicy(retries=5, base=1.0, cap=4.0)
    op = Flaky(failures=5, error=TransientStoreError("503"))
    assert run(policy, op) == "ok"
    assert slept == [0.5, 1.0, 2.0, 2.0, 2.0]
