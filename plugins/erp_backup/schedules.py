"""Cron schedules and durations as the watchdog reads them: the next fire, the longest gap, and "6h"-style text."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

from croniter import croniter

GAP_SAMPLES = 64  # fires sampled to find a schedule's longest gap


def as_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def format_duration(delta: timedelta) -> str:
    """'45m', '6h', '25h 10m', '7d', '3d 4h': minutes at most, for tables and chat."""
    minutes = int(delta.total_seconds() // 60)
    sign, minutes = ("-", -minutes) if minutes < 0 else ("", minutes)
    days, rest = divmod(minutes, 24 * 60)
    hours, mins = divmod(rest, 60)
    if days >= 2:
        parts = [f"{days}d", f"{hours}h" if hours else "", f"{mins}m" if mins and not hours else ""]
    elif minutes >= 60:
        parts = [f"{days * 24 + hours}h", f"{mins}m" if mins else ""]
    else:
        parts = [f"{mins}m"]
    return sign + " ".join(part for part in parts if part)


def local_text(moment: datetime, tz: str) -> str:
    return moment.astimezone(ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M %Z")


def next_fire(schedule: str, tz: str, after: datetime) -> datetime:
    """The first cron fire strictly after `after`, computed in the job's timezone, in UTC."""
    return as_utc(croniter(schedule, as_utc(after).astimezone(ZoneInfo(tz))).get_next(datetime))


def longest_gap(schedule: str, tz: str, around: datetime) -> timedelta:
    """The longest time between two consecutive fires (e.g. 72 h for weekdays at 02:00), sampled from the
    start of `around`'s hour: cached, since a check or the Backups page asks for every job, and croniter is slow."""
    return _longest_gap(schedule, tz, as_utc(around).replace(minute=0, second=0, microsecond=0))


@lru_cache(maxsize=1024)
def _longest_gap(schedule: str, tz: str, around: datetime) -> timedelta:
    fires = croniter(schedule, around.astimezone(ZoneInfo(tz)))
    times = [as_utc(fires.get_next(datetime)) for _ in range(GAP_SAMPLES)]
    return max(later - earlier for earlier, later in itertools.pairwise(times))
