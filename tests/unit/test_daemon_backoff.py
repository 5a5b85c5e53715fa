"""The daemon's per-node reconnect schedule (pure)."""

from hpcstage.daemon import MAX_TRANSPORT_ATTEMPTS, NODE_BACKOFF_MAX, reconnect_delay


def test_reconnect_delay_doubles_then_caps() -> None:
    delays = [reconnect_delay(n) for n in range(1, 9)]
    assert delays[:5] == [2.0, 4.0, 8.0, 16.0, 32.0]
    assert delays[5:] == [NODE_BACKOFF_MAX] * 3
    assert reconnect_delay(10_000) == NODE_BACKOFF_MAX  # no overflow after days of failures


def test_attempts_ride_out_half_a_minute_of_an_unreachable_node() -> None:
    waited = sum(reconnect_delay(n) for n in range(1, MAX_TRANSPORT_ATTEMPTS))
    assert waited >= 30
