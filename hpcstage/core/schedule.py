"""When a kept-warm dataset (``hpcstage pin``) is refreshed: a small schedule language. Pure.

Two forms, nothing else (a schedule the daemon would read differently from the admin is
worse than a refused one):

- ``every N{s,m,h,d}``: N seconds, minutes, hours or days after the last refresh began
  (``every 6h``; at least ``MIN_INTERVAL`` seconds, ``every 30s`` is the shortest).
- five cron fields, ``MINUTE HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK`` (``0 6 * * 1-5``), in the
  daemon host's local time. Each field is ``*``, a number, a range ``a-b``, either with a
  step (``*/15``, ``8-18/2``), or a comma-separated list of those. Day of week 0-7 (0 and 7
  are Sunday). As in cron, when both day fields are restricted a day matching either one is
  due; a day field beginning with ``*`` (``*``, ``*/2``) counts as unrestricted for that
  rule (Vixie cron and cronie: ``0 0 */2 * 1`` is an odd day that is also a Monday).
  Daylight saving time: a due time is an instant whose wall time matches, so a wall time
  the clocks skip in spring is not due that day, and one they repeat in autumn is due twice
  (both instants read it); the next due time is always later than the last. Not supported:
  names (``MON``, ``JAN``), ``@daily``-style macros, ``?``, ``L``, ``W``, ``#``, seconds or
  years.
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
# Steps of next_after's walk: a due day costs at most 24 hour jumps and 60 minutes, and only a
# day whose due times all fall in a DST gap is walked without an answer.
_STEPS = 100 * _SEARCH_DAYS


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
    any_day: bool  # day of month began with "*" ("*", "*/2"): cron's DOM_STAR
    any_weekday: bool  # day of week began with "*": cron's DOW_STAR

    def next_after(self, when: float, tz: dt.tzinfo | None = None) -> float:
        """The first due minute strictly after ``when`` (a Unix time), in ``tz`` (None: the
        local time zone). ScheduleError if no date ever matches (``0 0 31 2 *``).

        Walks real instants forward (by days, hours or minutes) and reads each one's wall
        time: so the answer is always later than ``when``, even in the hour daylight saving
        time repeats (where wall times go back). A wall time the clocks skip in spring is not
        due that day; one they repeat in autumn is due at both instants that read it.
        """
        at = (when // 60 + 1) * 60  # the next whole minute (offsets are whole minutes)
        for _ in range(_STEPS):
            wall = _wall(at, tz)
            if not self._day_due(wall.date()):
                at = max(at + 60, _midnight(self._next_day(wall.date()), tz))
            elif wall.hour not in self.hours:
                at = _next_hour(at, wall, tz)
            elif wall.minute not in self.minutes:
                at += 60
            else:
                return at
        raise ScheduleError("no date matches the day-of-month and month fields")

    def _next_day(self, after: dt.date) -> dt.date:
        """The first due day after ``after``; ScheduleError if there is none in 8 years."""
        day = after
        for _ in range(_SEARCH_DAYS):
            day += dt.timedelta(days=1)
            if self._day_due(day):
                return day
        raise ScheduleError("no date matches the day-of-month and month fields")

    def _day_due(self, day: dt.date) -> bool:
        if day.month not in self.months:
            return False
        by_date, by_weekday = day.day in self.days, day.weekday() in self.weekdays
        if self.any_day or self.any_weekday:  # cron: one "*" leaves the other to decide
            return by_date and by_weekday
        return by_date or by_weekday


def _wall(at: float, tz: dt.tzinfo | None) -> dt.datetime:
    """The wall time of the instant ``at`` in ``tz`` (None: the local zone)."""
    return dt.datetime.fromtimestamp(at, dt.UTC).astimezone(tz)


def _midnight(day: dt.date, tz: dt.tzinfo | None) -> float:
    """The first instant of ``day`` (fold 0: the earlier one if midnight repeats, the end of
    the gap if it is skipped)."""
    return dt.datetime.combine(day, dt.time(), tzinfo=tz).timestamp()


def _next_hour(at: float, wall: dt.datetime, tz: dt.tzinfo | None) -> float:
    """The instant the wall clock next reaches a new hour after ``at`` (at ``wall``): a jump,
    unless the offset changes before it (then a minute, so no wall time is stepped over)."""
    jump = at + (60 - wall.minute) * 60
    return jump if _wall(jump, tz).utcoffset() == wall.utcoffset() else at + 60


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
    # As cron: a day field beginning with "*" ("*/2" too) is unrestricted for the either-day rule.
    any_day, any_weekday = fields[2].startswith("*"), fields[4].startswith("*")
    cron = Cron(minutes, hours, days, months, weekdays, any_day, any_weekday)
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
