"""The token bucket (hpcstage.core.ratelimit) with a fake clock, the agent's Limiter around it,
a node's share of a site limit, and the rate settings."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from typing import Any, cast

import pytest

from hpcstage.agent.context import DEFAULT_TRANSFER, Stores
from hpcstage.config.schema import TransferSettings
from hpcstage.core.ratelimit import (
    BYTES_FLOOR,
    REQUEST_FLOOR,
    TokenBucket,
    burst_for,
    node_share,
)
from hpcstage.core.units import format_rate, parse_rate
from hpcstage.protocol.messages import AgentStoreSettings, RateLimits
from hpcstage.staging.nodes import NodePool
from hpcstage.staging.rates import RateShares, node_rates
from hpcstage.store.throttle import Limiter

MIB = 2**20


def test_an_unlimited_bucket_never_makes_anyone_wait() -> None:
    bucket = TokenBucket.start(0, now=0.0)
    assert all(bucket.reserve(10**12, now=0.0) == 0.0 for _ in range(100))


def test_a_full_bucket_lets_its_burst_through_then_paces_at_the_rate() -> None:
    bucket = TokenBucket.start(8 * MIB, now=0.0)
    assert bucket.burst == 8 * MIB  # one second's worth
    assert [bucket.reserve(MIB, now=0.0) for _ in range(8)] == [0.0] * 8
    # Beyond the burst each MiB waits an eighth of a second more than the one before.
    waits = [bucket.reserve(MIB, now=0.0) for _ in range(4)]
    assert waits == pytest.approx([0.125, 0.25, 0.375, 0.5])


def test_the_bucket_refills_with_time_but_no_further_than_its_burst() -> None:
    bucket = TokenBucket.start(100, now=0.0)
    assert bucket.reserve(100, now=0.0) == 0.0
    assert bucket.reserve(50, now=0.5) == 0.0  # 50 tokens earned in half a second
    assert bucket.reserve(1, now=0.5) == pytest.approx(0.01)
    bucket2 = TokenBucket.start(100, now=0.0)
    assert bucket2.reserve(101, now=3600.0) == pytest.approx(0.01)  # an hour idle: still 100


def test_over_any_span_at_most_burst_plus_rate_times_span_is_granted() -> None:
    """The bound the integration tests rely on: n tokens need (n - burst) / rate seconds."""
    rate = 8 * MIB
    bucket = TokenBucket.start(rate, now=0.0)
    last = 0.0
    for _ in range(40):  # 40 MiB, asked for all at once
        last = bucket.reserve(MIB, now=0.0)
    assert last == pytest.approx((40 * MIB - burst_for(rate)) / rate)


def test_a_reservation_bigger_than_the_burst_is_granted_after_its_debt() -> None:
    bucket = TokenBucket.start(10, now=0.0)
    assert bucket.reserve(30, now=0.0) == pytest.approx(2.0)
    assert bucket.reserve(1, now=2.0) == pytest.approx(0.1)  # the debt was paid by then


def test_callers_are_served_in_turn_so_none_starves() -> None:
    """Two transfers taking a chunk each in turn get equal shares: waits grow evenly and a
    latecomer waits behind those before it, never behind those after it."""
    bucket = TokenBucket.start(10, now=0.0)
    bucket.reserve(10, now=0.0)  # the burst is spent
    a = [bucket.reserve(1, now=0.0) for _ in range(1)]
    b = [bucket.reserve(1, now=0.0) for _ in range(1)]
    a += [bucket.reserve(1, now=0.0)]
    b += [bucket.reserve(1, now=0.0)]
    assert a == pytest.approx([0.1, 0.3]) and b == pytest.approx([0.2, 0.4])


def test_a_lower_rate_caps_what_was_saved_and_keeps_the_debt() -> None:
    bucket = TokenBucket.start(100, now=0.0)
    bucket.set_rate(10, now=0.0)
    assert bucket.tokens == 10  # the new burst
    assert bucket.reserve(20, now=0.0) == pytest.approx(1.0)
    bucket.set_rate(20, now=0.0)  # a debt granted at the old rate stays owed
    assert bucket.reserve(1, now=0.0) == pytest.approx(11 / 20)


def test_a_bucket_given_a_rate_after_none_starts_full_and_can_be_lifted_again() -> None:
    bucket = TokenBucket.start(0, now=0.0)
    bucket.set_rate(10, now=5.0)
    assert bucket.reserve(10, now=5.0) == 0.0
    assert bucket.reserve(10, now=5.0) == pytest.approx(1.0)
    bucket.set_rate(0, now=5.0)
    assert bucket.reserve(10**9, now=5.0) == 0.0


@pytest.mark.parametrize(
    ("node", "site", "transferring", "share"),
    [
        (0, 0, 3, 0),  # no limits
        (100, 0, 3, 100),  # the node's own
        (0, 90, 3, 30),  # an equal share of the site's
        (20, 90, 3, 20),  # the smaller of both
        (50, 90, 1, 50),
        (0, 90, 0, 90),  # the first node to start counts itself
    ],
)
def test_a_node_gets_its_own_limit_or_its_share_of_the_site_whichever_is_smaller(
    node: float, site: float, transferring: int, share: float
) -> None:
    assert node_share(node, site, transferring) == share


def test_the_daemon_tells_each_node_all_three_limits() -> None:
    settings = TransferSettings.model_validate(
        {
            "node_download_rate": "8MiB/s",
            "site_download_rate": "10MiB/s",
            "site_upload_rate": "4MiB/s",
            "node_request_rate": 50,
        }
    )
    assert node_rates(settings, 2) == RateLimits(
        download=5 * MIB, upload=2 * MIB, requests=50.0, generation=0
    )
    assert node_rates(settings, 1) == RateLimits(
        download=8 * MIB, upload=4 * MIB, requests=50.0, generation=0
    )


@pytest.mark.parametrize(
    ("text", "rate"),
    [("200MiB/s", 200 * MIB), ("1GB/s", 10**9), ("64MiB", 64 * MIB), (0, 0), ("8 MiB/s", 8 * MIB)],
)
def test_rates_parse_like_sizes_per_second(text: str | int, rate: int) -> None:
    assert parse_rate(text) == rate
    assert parse_rate(format_rate(rate)) == rate


@pytest.mark.parametrize("bad", ["10M/s", "fast", "-1MiB/s", "1.5B/s"])
def test_a_bad_rate_says_what_was_expected(bad: str) -> None:
    with pytest.raises(ValueError, match=r"rate|size unit") as caught:
        parse_rate(bad)
    assert repr(bad) in str(caught.value)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_limiter_sleeps_for_its_reservation_in_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, slept = FakeClock(), []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds

    monkeypatch.setattr(asyncio, "sleep", sleep)
    limiter = Limiter(4, clock)
    for _ in range(6):
        asyncio.run(limiter.take(1))
    assert slept == pytest.approx([0.25, 0.25])  # the burst of 4 passed without sleeping
    slept.clear()
    asyncio.run(limiter.take(10))  # 2.5 s: in steps of at most a second, nobody polls
    assert slept == pytest.approx([1.0, 1.0, 0.5])


def test_an_unlimited_limiter_never_reserves() -> None:
    limiter = Limiter()
    assert not limiter.active
    asyncio.run(limiter.take(10**12))
    limiter.take_blocking(10**12)
    assert limiter.reserve(1) == 0.0


def test_a_waiting_thread_is_released_by_its_stop_event() -> None:
    limiter = Limiter(1)
    limiter.reserve(1000)  # 999 s of debt
    stop = threading.Event()
    stop.set()
    started = time.monotonic()
    limiter.take_blocking(1, stop)
    assert time.monotonic() - started < 5


class RecordingAgent:
    """A node's session that records the ``rates`` calls it is sent."""

    def __init__(self, name: str, told: list[tuple[str, dict[str, Any]]]) -> None:
        self.name, self._told = name, told

    async def call(self, op: str, params: dict[str, Any], on_progress: Any = None) -> Any:
        self._told.append((self.name, {"op": op, **params}))
        return {}


class Nodes:
    def __init__(self) -> None:
        self.told: list[tuple[str, dict[str, Any]]] = []

    async def agent(self, node: str) -> Any:
        return RecordingAgent(node, self.told)

    def node_failed(self, node: str) -> None:  # pragma: no cover - not called here
        pass


def test_the_site_share_follows_the_nodes_that_start_and_finish() -> None:
    settings = TransferSettings.model_validate(
        {"site_download_rate": 90 * MIB, "node_upload_rate": 7}
    )

    async def scenario() -> tuple[list[int], list[tuple[str, dict[str, Any]]]]:
        nodes = Nodes()
        shares = RateShares(settings, cast(NodePool, nodes))
        got = []
        async with shares.transferring("n1") as alone:
            got.append(alone.download)
            async with shares.transferring("n2") as second:
                got.append(second.download)
                await _settle()  # the others are told in tasks of their own
                async with shares.transferring("n2") as again:  # a second call on n2
                    got.append(again.download)
                await _settle()
            await _settle()
        await _settle()
        return got, nodes.told

    got, told = asyncio.run(scenario())
    assert got == [90 * MIB, 45 * MIB, 45 * MIB]
    # n1 heard of n2 starting and finishing (n2's second call changed no share); nobody is
    # told anything once it is no longer transferring.
    limits = {"download": 45 * MIB, "upload": 7, "requests": 0.0}
    assert told == [
        ("n1", {"op": "rates", **limits, "generation": 2}),
        ("n1", {"op": "rates", **limits, "download": 90 * MIB, "generation": 3}),
    ]


async def _settle() -> None:
    """Let the tasks that tell the nodes run (each call is a few steps of the loop)."""
    for _ in range(20):
        await asyncio.sleep(0)


def test_without_site_limits_no_node_is_ever_told_anything_between_calls() -> None:
    settings = TransferSettings.model_validate({"node_download_rate": 90})

    async def scenario() -> list[tuple[str, dict[str, Any]]]:
        nodes = Nodes()
        shares = RateShares(settings, cast(NodePool, nodes))
        async with shares.transferring("n1"), shares.transferring("n2") as second:
            assert second.download == 90
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        return nodes.told

    assert asyncio.run(scenario()) == []


# -- a rate change reaches those already waiting; a share has a floor ------------------------


def test_a_waiter_follows_a_rate_raised_while_it_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reserved at 0.01 req/s (100 s to wait), then the rate is raised to 1000/s: the waiter
    goes within about a second, not after the 100 s computed when it reserved."""
    clock, slept = FakeClock(), []
    limiter = Limiter(0.01, clock)

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds
        limiter.set_rate(1000)  # another node stopped: this one's share went up

    monkeypatch.setattr(asyncio, "sleep", sleep)
    asyncio.run(limiter.take(1))  # the burst (one request)
    asyncio.run(limiter.take(1))
    assert slept and sum(slept) <= 1.01


def test_a_waiter_follows_a_rate_lowered_while_it_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The other way too: a lower rate makes those already in line wait longer."""
    clock, slept = FakeClock(), []
    limiter = Limiter(10, clock)

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds
        limiter.set_rate(1)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    limiter.reserve(10)  # the burst is spent
    asyncio.run(limiter.take(20))  # 2 s at 10/s; after the first step (10 earned), 10 at 1/s
    assert sum(slept) == pytest.approx(1 + 10)
    assert max(slept) <= 1.0  # in steps of at most a second


def test_a_waiting_thread_follows_a_rate_raised_while_it_sleeps() -> None:
    limiter = Limiter(0.01)
    limiter.reserve(1)  # the burst is spent: the next request waits 100 s at this rate
    stop = threading.Event()
    waiter = threading.Thread(target=limiter.take_blocking, args=(1, stop), daemon=True)
    waiter.start()
    time.sleep(0.1)
    limiter.set_rate(1000)
    waiter.join(timeout=30)  # a second's step, on a busy machine
    still_waiting = waiter.is_alive()
    stop.set()
    assert not still_waiting


def test_the_bucket_tells_each_reservation_its_wait_at_the_rate_of_now() -> None:
    bucket = TokenBucket.start(10, now=0.0)
    bucket.reserve(10, now=0.0)
    first = bucket.reserve(5, now=0.0)
    ticket = bucket.granted
    assert first == pytest.approx(0.5)
    bucket.reserve(5, now=0.0)  # a later reservation does not delay an earlier one
    assert bucket.wait(ticket, now=0.0) == pytest.approx(0.5)
    bucket.set_rate(100, now=0.1)  # 1 token earned at 10/s; 4 left owed, at 100/s
    assert bucket.wait(ticket, now=0.1) == pytest.approx(0.04)
    bucket.set_rate(0, now=0.1)
    assert bucket.wait(ticket, now=0.1) == 0.0


def test_a_node_share_of_a_site_limit_has_a_floor() -> None:
    """10 requests/s over 1000 nodes is not 0.01/s (100 s a request) but the floor; a node's
    own limit below it, or a site limit below it, still wins."""
    assert node_share(0, 10, 1000, floor=1.0) == 1.0
    assert node_share(0, 10, 5, floor=1.0) == 2.0
    assert node_share(0.5, 10, 1000, floor=1.0) == 0.5
    assert node_share(0, 0.5, 1000, floor=1.0) == 0.5
    settings = TransferSettings.model_validate(
        {"site_request_rate": 10, "site_download_rate": "10MiB/s", "site_upload_rate": 1000}
    )
    limits = node_rates(settings, 1000)
    assert limits.requests == REQUEST_FLOOR
    assert limits.download == BYTES_FLOOR
    assert limits.upload == 1000  # the site's whole limit is below the floor


# -- the daemon's rate messages: bounded, timed out, newest wins -----------------------------


class SlowAgent:
    """A node's session whose calls wait for ``gate`` (never set: a hung agent), or fail."""

    def __init__(self, name: str, nodes: SlowNodes) -> None:
        self.name, self._nodes = name, nodes

    async def call(self, op: str, params: dict[str, Any], on_progress: Any = None) -> Any:
        nodes = self._nodes
        nodes.in_flight += 1
        nodes.most_in_flight = max(nodes.most_in_flight, nodes.in_flight)
        try:
            if self.name in nodes.failing:
                raise ConnectionResetError(f"{self.name}: connection reset by peer")
            await nodes.gate.wait()
            nodes.told.append((self.name, params))
            return {}
        finally:
            nodes.in_flight -= 1


class SlowNodes:
    def __init__(self, failing: frozenset[str] = frozenset()) -> None:
        self.gate = asyncio.Event()
        self.failing = failing
        self.told: list[tuple[str, dict[str, Any]]] = []
        self.in_flight = self.most_in_flight = 0

    async def agent(self, node: str) -> Any:
        return SlowAgent(node, self)

    def node_failed(self, node: str) -> None:  # pragma: no cover - not called here
        pass


SITE = TransferSettings.model_validate({"site_download_rate": 90 * MIB})


async def _churn(shares: RateShares, times: int) -> None:
    """Another node starts and stops ``times`` times while n1 transfers."""
    for _ in range(times):
        async with shares.transferring("n2"):
            await asyncio.sleep(0)
        await asyncio.sleep(0)


def test_a_hung_agent_is_sent_one_message_at_a_time_each_given_up_after_a_timeout() -> None:
    async def scenario() -> tuple[int, int]:
        nodes = SlowNodes()
        shares = RateShares(SITE, cast(NodePool, nodes), tell_timeout=0.2)
        async with shares.transferring("n1"):
            await _churn(shares, 20)
            most = nodes.most_in_flight
            for _ in range(200):  # the timeout ends the call, however busy the machine
                await asyncio.sleep(0.05)
                if not nodes.in_flight:
                    break
            return most, nodes.in_flight

    most, left = asyncio.run(scenario())
    assert most == 1  # not one pending call per start and stop
    assert left == 0  # given up after the timeout


def test_a_slow_node_hears_only_the_newest_share_once_it_answers() -> None:
    async def scenario() -> list[tuple[str, dict[str, Any]]]:
        nodes = SlowNodes()
        shares = RateShares(SITE, cast(NodePool, nodes))
        async with shares.transferring("n1"):
            await _churn(shares, 5)  # ten changes while n1 has not answered the first
            nodes.gate.set()
            for _ in range(20):
                await asyncio.sleep(0)
        return nodes.told

    told = asyncio.run(scenario())
    # The one it was sent first (as of when it was sent), then only the latest, not ten.
    assert len(told) <= 2
    assert told[-1][1]["download"] == 90 * MIB


def test_a_transport_error_telling_a_node_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> list[dict[str, Any]]:
        errors: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        nodes = SlowNodes(failing=frozenset({"n1"}))
        nodes.gate.set()
        shares = RateShares(SITE, cast(NodePool, nodes))
        async with shares.transferring("n1"):
            await _churn(shares, 2)
            for _ in range(20):
                await asyncio.sleep(0)
        gc.collect()  # a task whose exception nobody read reports it when collected
        await asyncio.sleep(0)
        return errors

    with caplog.at_level(logging.DEBUG, logger="hpcstage.daemon"):
        errors = asyncio.run(scenario())
    assert errors == []
    assert "connection reset by peer" in caplog.text


def test_each_share_the_daemon_hands_out_is_newer_than_the_last() -> None:
    async def scenario() -> list[int]:
        shares = RateShares(SITE, cast(NodePool, Nodes()))
        got = []
        async with shares.transferring("n1") as alone:
            got.append(alone.generation)
            async with shares.transferring("n2") as second:
                got.append(second.generation)
            got.append(shares.current().generation)
        return got

    first, second, third = asyncio.run(scenario())
    assert 0 < first < second < third


def test_the_agent_ignores_limits_older_than_those_it_has() -> None:
    """A stage call carrying the share of when it began arrives after a newer ``rates``."""
    stores = Stores()
    stores.set_rates(RateLimits(download=45 * MIB, upload=0, requests=0.0, generation=7))
    stores.set_rates(RateLimits(download=90 * MIB, upload=0, requests=0.0, generation=6))
    assert stores.throttle.download.rate == 45 * MIB
    stores.set_rates(RateLimits(download=30 * MIB, upload=0, requests=0.0, generation=8))
    assert stores.throttle.download.rate == 30 * MIB


def test_a_new_daemon_session_starts_the_generations_again() -> None:
    """A restarted daemon counts from 1 again: its hello makes the agent forget the old ones."""
    stores = Stores()
    stores.set_rates(RateLimits(download=45 * MIB, upload=0, requests=0.0, generation=7))
    asyncio.run(stores.configure(cast(AgentStoreSettings, None), DEFAULT_TRANSFER))
    stores.set_rates(RateLimits(download=90 * MIB, upload=0, requests=0.0, generation=1))
    assert stores.throttle.download.rate == 90 * MIB
