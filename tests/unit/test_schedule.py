"""The schedule of kept-warm datasets (hpcstage pin --schedule): what is accepted, and when due."""

from __future__ import annotations

import datetime as dt
import time
from zoneinfo import ZoneInfo

import pytest

from hpcstage.core.schedule import Cron, Every, ScheduleError, parse

UTC = dt.UTC


def at(text: str) -> float:
    """A Unix time from 'YYYY-MM-DD HH:MM' in UTC."""
    return dt.datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=UTC).timestamp()


def due(schedule: str, after: str) -> str:
    when = parse(schedule).next_after(at(after), UTC)
    return dt.datetime.fromtimestamp(when, UTC).strftime("%a %Y-%m-%d %H:%M")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("every 6h", 6 * 3600), ("every 30s", 30), ("EVERY 15m", 900), ("every 2d", 172800)],
)
def test_intervals(text: str, seconds: float) -> None:
    assert parse(text) == Every(seconds)
    assert parse(text).next_after(1000.0) == 1000.0 + seconds


@pytest.mark.parametrize(
    ("schedule", "after", "expected"),
    [
        # 2026-12-04 is a Friday.
        ("0 6 * * 1-5", "2026-12-04 05:59", "Fri 2026-12-04 06:00"),
        ("0 6 * * 1-5", "2026-12-04 06:00", "Mon 2026-12-07 06:00"),  # strictly after
        ("*/15 * * * *", "2026-12-04 10:07", "Fri 2026-12-04 10:15"),
        ("*/15 * * * *", "2026-12-04 23:50", "Sat 2026-12-05 00:00"),
        ("30 8-18/2 * * *", "2026-12-04 18:31", "Sat 2026-12-05 08:30"),
        ("5,35 * * * *", "2026-12-04 10:05", "Fri 2026-12-04 10:35"),
        ("0 0 1 * *", "2026-12-04 00:00", "Fri 2027-01-01 00:00"),
        ("0 0 * * 0", "2026-12-04 00:00", "Sun 2026-12-06 00:00"),
        ("0 0 * * 7", "2026-12-04 00:00", "Sun 2026-12-06 00:00"),  # 7 is Sunday too
        # Both day fields restricted: either matches (the 13th, or a Monday).
        ("0 12 13 * 1", "2026-12-08 00:00", "Sun 2026-12-13 12:00"),
        ("0 12 13 * 1", "2026-12-13 12:00", "Mon 2026-12-14 12:00"),
        ("0 0 29 2 *", "2026-03-01 00:00", "Tue 2028-02-29 00:00"),  # the next leap day
        ("5/20 * * * *", "2026-12-04 10:06", "Fri 2026-12-04 10:25"),  # 5-59/20
    ],
)
def test_cron_due_times(schedule: str, after: str, expected: str) -> None:
    assert due(schedule, after) == expected


def test_a_day_of_week_range_is_cron_numbering() -> None:
    cron = parse("0 6 * * 1-5")
    assert isinstance(cron, Cron)
    assert cron.weekdays == frozenset(range(5))  # Monday..Friday as datetime.weekday()
    assert cron.any_day and not cron.any_weekday


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "five cron fields"),
        ("0 6 * *", "five cron fields"),
        ("0 6 * * MON", "day of week: 'mon' is not a number"),
        ("60 * * * *", "minute: 60 is outside 0-59"),
        ("0 24 * * *", "hour: 24 is outside 0-23"),
        ("0 0 0 * *", "day of month: 0 is outside 1-31"),
        ("0 0 * 13 *", "month: 13 is outside 1-12"),
        ("0 0 * * 8", "day of week: 8 is outside 0-7"),
        ("0 5-2 * * *", "hour: range '5-2' runs backwards"),
        ("*/0 * * * *", "minute: 0 is outside 1-59"),
        ("0 0 31 2 *", "no date matches"),
        ("@daily", "five cron fields"),
        ("every", "expected 'every N'"),
        ("every 6 hours", "expected 'every N'"),
        ("every 10s", "at least every 30s"),
        ("every 0h", "at least every 30s"),
        ("0 \uff16 * * *", "hour: '\uff16' is not a number"),  # a fullwidth 6
    ],
)
def test_refusals_name_the_wrong_part(text: str, says: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        parse(text)
    assert says in str(caught.value)


# Cron's either-day rule keys on the field's first character, not on a bare "*": Vixie cron and
# cronie set DOM_STAR/DOW_STAR for any field starting with "*", so "*/2" leaves the other day
# field to decide alone (both must match) instead of making either one enough.
@pytest.mark.parametrize(
    ("schedule", "after", "expected"),
    [
        ("0 0 */2 * 1", "2026-12-04 00:00", "Mon 2026-12-07 00:00"),  # an odd day AND a Monday
        ("0 0 */2 * 1", "2026-12-07 00:00", "Mon 2026-12-21 00:00"),
        ("0 0 13 * */2", "2026-12-04 00:00", "Sun 2026-12-13 00:00"),  # the 13th AND Sun/Tue/..
        ("0 0 1-31/2 * 1", "2026-12-04 00:00", "Sat 2026-12-05 00:00"),  # no "*": either
    ],
)
def test_a_starred_step_day_field_is_unrestricted_as_in_cron(
    schedule: str, after: str, expected: str
) -> None:
    assert due(schedule, after) == expected


# Daylight saving time, with an explicit zone (never the machine's). America/New_York in 2026:
# 02:00 EST on March 8th jumps to 03:00 EDT; 02:00 EDT on November 1st falls back to 01:00 EST.
NEW_YORK = ZoneInfo("America/New_York")


def local(day: tuple[int, int, int], hour: int, minute: int, fold: int = 0) -> float:
    return dt.datetime(*day, hour, minute, fold=fold, tzinfo=NEW_YORK).timestamp()


def shown(when: float) -> str:
    return dt.datetime.fromtimestamp(when, NEW_YORK).strftime("%m-%d %H:%M %Z")


SPRING, AUTUMN = (2026, 3, 8), (2026, 11, 1)


@pytest.mark.parametrize("schedule", ["*/5 * * * *", "* * * * *", "30 1 * * *", "0 2 * * *"])
@pytest.mark.parametrize("day", [SPRING, AUTUMN])
def test_due_times_only_move_forward_across_dst(schedule: str, day: tuple[int, ...]) -> None:
    """Every minute of both transition days: the next due time is strictly later (a time in
    the past would make the daemon refresh the pin on every tick)."""
    cron = parse(schedule)
    start = dt.datetime(*day, tzinfo=NEW_YORK).timestamp()
    for when in range(int(start), int(start) + 26 * 3600, 60):
        assert cron.next_after(when + 0.5, NEW_YORK) > when + 0.5, shown(when)


def test_the_repeated_autumn_hour_is_due_in_both_passes() -> None:
    every5 = parse("*/5 * * * *")
    second_pass = local(AUTUMN, 1, 10, fold=1)
    assert shown(every5.next_after(second_pass, NEW_YORK)) == "11-01 01:15 EST"
    first_pass_end = local(AUTUMN, 1, 58)
    assert shown(every5.next_after(first_pass_end, NEW_YORK)) == "11-01 01:00 EST"
    # A fixed time inside the repeated hour is due at both instants that read 01:30.
    daily = parse("30 1 * * *")
    assert shown(daily.next_after(local(AUTUMN, 1, 0), NEW_YORK)) == "11-01 01:30 EDT"
    assert shown(daily.next_after(local(AUTUMN, 1, 30), NEW_YORK)) == "11-01 01:30 EST"
    assert shown(daily.next_after(local(AUTUMN, 1, 30, fold=1), NEW_YORK)) == "11-02 01:30 EST"


def test_the_skipped_spring_hour_is_never_due() -> None:
    every5 = parse("*/5 * * * *")
    assert shown(every5.next_after(local(SPRING, 1, 58), NEW_YORK)) == "03-08 03:00 EDT"
    # 02:30 does not exist on March 8th: not due that day (not an hour later, at 03:30).
    daily = parse("30 2 * * *")
    assert shown(daily.next_after(local(SPRING, 0, 0), NEW_YORK)) == "03-09 02:30 EDT"


def test_the_local_time_zone_is_the_tz_environment() -> None:
    """tz None is the daemon host's zone: set here, so the machine's own never matters."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TZ", "America/New_York")
        time.tzset()
        try:
            second_pass = local(AUTUMN, 1, 10, fold=1)
            assert shown(parse("*/5 * * * *").next_after(second_pass)) == "11-01 01:15 EST"
        finally:
            patch.undo()
            time.tzset()
