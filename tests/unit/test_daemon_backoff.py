"""The daemon's per-node reconnect schedule, and which outputs a job waits for (pure)."""

import pytest

from hpcstage.core.overlap import overlaps
from hpcstage.core.rules import NODE_BACKOFF_MAX, reconnect_delay
from hpcstage.staging.stagein import MAX_TRANSPORT_ATTEMPTS


def test_reconnect_delay_doubles_then_caps() -> None:
    delays = [reconnect_delay(n) for n in range(1, 9)]
    assert delays[:5] == [2.0, 4.0, 8.0, 16.0, 32.0]
    assert delays[5:] == [NODE_BACKOFF_MAX] * 3
    assert reconnect_delay(10_000) == NODE_BACKOFF_MAX  # no overflow after days of failures


def test_attempts_ride_out_half_a_minute_of_an_unreachable_node() -> None:
    waited = sum(reconnect_delay(n) for n in range(1, MAX_TRANSPORT_ATTEMPTS))
    assert waited >= 30


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("s3://b/results/", "s3://b/results/run1/", True),  # a pipeline reads what one writes
        ("s3://b/results/run1/x.csv", "s3://b/results/", True),
        ("s3://b/out/x.csv", "s3://b/out/x.csv", True),
        ("s3://b/a", "s3://b/ab/", False),  # no '/' boundary: unrelated
        ("s3://b/out/x", "s3://b/out/xy", False),
        ("s3://b/res/", "s3://b/results/", False),
        ("s3://b/p/", "s3://c/p/", False),
    ],
)
def test_a_job_waits_only_for_outputs_that_can_be_its_inputs(
    a: str, b: str, expected: bool
) -> None:
    assert overlaps(a, b) is expected and overlaps(b, a) is expected
