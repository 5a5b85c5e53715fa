"""When a kept-warm dataset (``hpcstage pin``) is refreshed: a small schedule language. Pure.

Two forms, nothing else (a schedule the daemon would read differently from the admin is
worse than a refused one):

- ``every N{s,m,h,d}``: N seconds, minutes, hours or days after the last refresh began
  (``every 6h``; at least ``MIN_INTERVAL`` seconds, ``every 30s`` is the shortest).
- five cron fields, ``MINUTE HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK`` (``0 6 * * 1-5``), in the
  daemon host's local time. Each field is ``*``, a number, a range ``a-b``, either with a
  step (``*/15``, ``8-18/2``), or a comma-separated list of those. Day of week 0-7 (0 and 7
  are Sunday). As in cron, when both day fields are restricted a day matching either one is
  due. Not supported: names (``MON``, ``JAN``), ``@daily``-style macros, ``?``, ``L``, ``W``,
  ``#``, seconds or years.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

MIN_INTERVAL = 30.0  # seconds: a pin refreshed more often would only load the store
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_EVERY = re.compile(r"every\s+([0-9]{1,6})\s*([smhd])")
# (name, lowest, highest) of the five cron fields, in order.
_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12))
_DOW = ("day of week", 0, 7)
_SEARCH_DAYS = 8 * 366  # "0 0 29 2 1" (Feb 29th or a Monday) is due within days; "31 2" never


class ScheduleError(ValueError):
    """A schedule that is not in the supported subset; the message says what is wrong."""


@dataclass(frozen=True)
class Every:
    """Refresh every ``seconds`` after the last refresh began."""

    seconds: float

    def next_after(self, when: float, tz: dt.tzinfo | None = None) -> float:
        """The first due time strictly after ``when`` (a Unix time)."""
        return when + self.seconds


@dataclass(frozen=True)
class Cron:
    """Refresh at the minutes the five fields allow."""

    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Monday, as datetime.weekday()
    any_day: bool  # day of month was "*"
    any_weekday: bool  # day of week was "*"

    def next_after(self, when: float, tz: dt.tzinfo | None = None) -> float:
        """The first due minute strictly after ``when`` (a Unix time), in ``tz`` (None: the
        local time zone). ScheduleError if no date ever matches (``0 0 31 2 *``)."""
        start = dt.datetime.fromtimestamp(when, tz).replace(second=0, microsecond=0)
        start += dt.timedelta(minutes=1)
        day = start.date()
        for _ in range(_SEARCH_DAYS):
            if self._day_due(day):
                at = self._first_time(day, start if day == start.date() else None)
                if at is not None:
                    return dt.datetime.combine(day, at, tzinfo=start.tzinfo).timestamp()
            day += dt.timedelta(days=1)
        raise ScheduleError("no date matches the day-of-month and month fields")

    def _day_due(self, day: dt.date) -> bool:
        if day.month not in self.months:
            return False
        by_date, by_weekday = day.day in self.days, day.weekday() in self.weekdays
        if self.any_day or self.any_weekday:  # cron: one "*" leaves the other to decide
            return by_date and by_weekday
        return by_date or by_weekday

    def _first_time(self, day: dt.date, start: dt.datetime | None) -> dt.time | None:
        """The first allowed time of ``day`` at or after ``start`` (None: from midnight)."""
        for hour in sorted(self.hours):
            if start is not None and hour < start.hour:
                continue
            for minute in sorted(self.minutes):
                if start is not None and hour == start.hour and minute < start.minute:
                    continue
                return dt.time(hour, minute)
        return None


Schedule = Every | Cron


def parse(text: str) -> Schedule:
    """The schedule ``text`` describes; ScheduleError naming the wrong part otherwise."""
    words = text.strip().lower()
    if words.startswith("every"):
        return _every(words)
    fields = words.split()
    if len(fields) != 5:
        raise ScheduleError(
            f"{text!r}: expected 'every N{{s,m,h,d}}' or five cron fields"
            " (minute hour day-of-month month day-of-week), e.g. '0 6 * * 1-5'"
        )
    minutes, hours, days, months = (
        _field(value, *spec) for value, spec in zip(fields[:4], _FIELDS, strict=True)
    )
    weekdays = frozenset((d - 1) % 7 for d in _field(fields[4], *_DOW))  # cron 1 = Monday
    cron = Cron(minutes, hours, days, months, weekdays, fields[2] == "*", fields[4] == "*")
    cron.next_after(0.0, dt.UTC)  # refuses "31 2" (never due) now, not at the first refresh
    return cron


def _every(words: str) -> Every:
    found = _EVERY.fullmatch(words)
    if found is None:
        raise ScheduleError(f"{words!r}: expected 'every N' with a unit s, m, h or d (every 6h)")
    seconds = float(int(found.group(1)) * _UNITS[found.group(2)])
    if seconds < MIN_INTERVAL:
        raise ScheduleError(f"{words!r}: at least every {MIN_INTERVAL:.0f}s")
    return Every(seconds)


def _field(value: str, name: str, low: int, high: int) -> frozenset[int]:
    """The numbers one cron field allows."""
    allowed: set[int] = set()
    for part in value.split(","):
        allowed |= _part(part, name, low, high)
    return frozenset(allowed)


def _part(part: str, name: str, low: int, high: int) -> set[int]:
    span, _, step_text = part.partition("/")
    step = _number(step_text, name, 1, high) if step_text else 1
    if span == "*":
        first, last = low, high
    elif "-" in span:
        a, _, b = span.partition("-")
        first, last = _number(a, name, low, high), _number(b, name, low, high)
        if first > last:
            raise ScheduleError(f"{name}: range {span!r} runs backwards")
    else:
        first = _number(span, name, low, high)
        last = high if step_text else first  # "5/15" is cron for "5-59/15"
    return set(range(first, last + 1, step))


def _number(text: str, name: str, low: int, high: int) -> int:
    if not text.isdigit() or not text.isascii():
        raise ScheduleError(f"{name}: {text!r} is not a number (names like MON are not supported)")
    number = int(text)
    if not low <= number <= high:
        raise ScheduleError(f"{name}: {number} is outside {low}-{high}")
    return number
