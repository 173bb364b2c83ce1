"""The soak's clock: simulated time that also flows at real speed between events.

Everything that stamps time in the code under test reads it here during the soak: the
backup steps (`steps.utcnow`: capture times, staging checks) and the S3 stand-in (moto's
object timestamps), so offsite objects agree with the manifests that describe them.
"""

from __future__ import annotations

import functools
import time
from datetime import datetime, timedelta, timezone

import pytest


class SimClock:
    def __init__(self, start: datetime) -> None:
        self._base = start
        self._set_at = time.monotonic()

    def set(self, moment: datetime) -> None:
        self._base, self._set_at = moment, time.monotonic()

    def now(self) -> datetime:
        return self._base + timedelta(seconds=time.monotonic() - self._set_at)

    def naive_utc(self) -> datetime:
        return self.now().astimezone(timezone.utc).replace(tzinfo=None)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import moto.s3.models

        from erp_backup import watchdog

        monkeypatch.setattr("erp_backup.steps.utcnow", self.now)
        monkeypatch.setattr(moto.s3.models, "utcnow", self.naive_utc)
        # The watchdog samples 64 cron fires per job per check to find the longest gap; a week of hourly
        # checks would spend most of the soak in croniter. The gap of a schedule is the same all day long.
        real_gap = watchdog.longest_gap

        @functools.lru_cache(maxsize=None)
        def gap_from(schedule: str, tz: str, day: datetime) -> timedelta:
            return real_gap(schedule, tz, day)

        monkeypatch.setattr(watchdog, "longest_gap", lambda schedule, tz, around: gap_from(schedule, tz, _day(around)))

def _day(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
