"""The one retry policy for every object-store request hpcstage makes.

What is retried
    Only :class:`~hpcstage.errors.TransientStoreError`: 5xx answers, ``SlowDown``/throttling,
    ``RequestTimeout``, refused or reset connections, timeouts, truncated bodies and checksum
    mismatches. Stores translate their vendor errors into that class at their boundary, so this
    module never looks at botocore or aiohttp exceptions.

What is never retried
    :class:`~hpcstage.errors.CredentialError` (an expired or wrong key does not heal by waiting,
    and hammering an auth endpoint can lock an account) and every other
    :class:`~hpcstage.errors.StoreError` (a missing key stays missing). Anything that is not a
    ``StoreError`` is a bug or a local problem (disk full) and propagates at once.

How long to wait
    Capped exponential backoff with *full jitter*: before retry ``n`` (0-based) sleep a uniform
    random time in ``[0, min(cap, base * 2**n)]``. Full jitter spreads out the retries of many
    agents that failed together (one store outage hits every node at once), so they do not come
    back in lock step.

How many times
    At most ``retries`` retries after the first attempt (``retries + 1`` calls). The last
    transient error is then raised again as a ``TransientStoreError`` whose message adds the
    attempt count, with the original as its cause (unchanged when there were no retries).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from hpcstage.errors import TransientStoreError

T = TypeVar("T")

OnRetry = Callable[[int, float, Exception], None]
"""Called before each retry's sleep with (retry number from 1, delay in seconds, the error)."""

log = logging.getLogger(__name__)

# 2**64 * base already exceeds any sane cap; clamping the exponent keeps the float finite.
_MAX_EXPONENT = 64


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a transient store failure is retried (see module docstring)."""

    retries: int = 6
    base: float = 0.5
    cap: float = 30.0

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.base < 0 or self.cap < 0:
            raise ValueError(f"base and cap must be >= 0, got {self.base} and {self.cap}")


DEFAULT_RETRY: Final = RetryPolicy()
"""The policy stores use unless the site configures another (``[transfer]`` retries/backoff)."""


def backoff_delay(
    attempt: int, policy: RetryPolicy, rand: Callable[[], float] | None = None
) -> float:
    """Seconds to sleep before retry ``attempt`` (0-based): uniform in [0, min(cap, base*2**n)].

    ``rand`` returns a float in [0, 1) (default: ``random.random``); tests pass a fixed one.
    """
    ceiling = min(policy.cap, policy.base * 2.0 ** min(attempt, _MAX_EXPONENT))
    draw = rand() if rand is not None else random.random()  # noqa: S311 - jitter, not secrecy
    return draw * ceiling


async def with_retries(
    policy: RetryPolicy,
    op_name: str,
    fn: Callable[[], Awaitable[T]],
    on_retry: OnRetry | None = None,
) -> T:
    """Await ``fn()``, retrying it on ``TransientStoreError`` as ``policy`` says.

    ``fn`` must start the operation afresh on each call (it is called once per attempt).
    ``op_name`` names the operation in the log line of each retry.
    """
    attempt = 0
    while True:
        try:
            return await fn()
        except TransientStoreError as exc:
            if attempt >= policy.retries:
                if attempt == 0:
                    raise
                raise TransientStoreError(f"{exc} (gave up after {attempt + 1} attempts)") from exc
            delay = backoff_delay(attempt, policy)
            attempt += 1
            _report(op_name, attempt, delay, exc, on_retry)
            await asyncio.sleep(delay)


def _report(op_name: str, attempt: int, delay: float, exc: Exception, cb: OnRetry | None) -> None:
    log.info("%s: %s; retry %d in %.2fs", op_name, exc, attempt, delay)
    if cb is not None:
        cb(attempt, delay, exc)
