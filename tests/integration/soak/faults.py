"""The soak's fault schedule: drawn from a seed, so a seed replays the same week.

Window faults hold for a span of simulated time: `source_down` (the PostgreSQL source is
stopped), `s3_down` (the S3 endpoint refuses connections), `full_disk` (staging is full).
Run faults hit one scheduled run: `flipped_byte` (a data file changes between backup and
checksum), `sigkill` (the backup's process is killed mid-write), `slow_upload` (the upload
crawls and lands hours late).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

WINDOW_KINDS = ("source_down", "s3_down", "full_disk")
RUN_KINDS = ("flipped_byte", "sigkill", "slow_upload")
PER_WEEK = {"source_down": 1, "s3_down": 1, "full_disk": 1, "flipped_byte": 2, "sigkill": 1, "slow_upload": 2}
HOURS = {"source_down": (2, 8), "s3_down": (6, 40), "full_disk": (2, 8), "slow_upload": (2, 10)}


@dataclass(frozen=True)
class Fault:
    kind: str
    start: datetime
    end: datetime  # window faults: when it clears; run faults: start + the upload delay (slow_upload) or start
    dag_id: str | None = None  # run faults: the job whose run it hits

    def active(self, moment: datetime) -> bool:
        return self.start <= moment < self.end

    def describe(self) -> str:
        span = f"{self.start:%a %m-%d %H:%M}Z"
        if self.kind in WINDOW_KINDS or self.kind == "slow_upload":
            span += f" for {(self.end - self.start).total_seconds() / 3600:.1f} h"
        return f"{self.kind}{f' {self.dag_id}' if self.dag_id else ''} at {span}"


def draw(seed: int, fires: dict[str, list[datetime]], start: datetime, days: int, sigkill_jobs: list[str]) -> list[Fault]:
    """Every kind at least once. `fires` are each job's run times; `sigkill_jobs` the jobs whose backup a child
    process can run. A window fault opens shortly before a random run (of a postgres job for `source_down`),
    so it meets at least one."""
    rng = random.Random(seed)
    runs = sorted((fire, dag_id) for dag_id, times in fires.items() for fire in times if fire > start + timedelta(hours=6))
    faults: list[Fault] = []
    for kind in (*WINDOW_KINDS, *RUN_KINDS):
        for _ in range(max(1, round(days / 7 * PER_WEEK[kind]))):
            if kind in WINDOW_KINDS:
                targets = [run for run in runs if kind != "source_down" or run[1].startswith("backup_postgres_")]
                fire, _ = rng.choice(targets)
                begin = (fire - timedelta(minutes=rng.uniform(1, 90))).replace(second=0, microsecond=0)
                faults.append(Fault(kind, begin, begin + timedelta(hours=rng.uniform(*HOURS[kind]))))
                continue
            early = {d: [f for f in times if f <= start + timedelta(days=days * 2 / 3)] for d, times in fires.items()}
            dag_id = rng.choice(sigkill_jobs if kind == "sigkill" else sorted(d for d in early if early[d]))
            run_at = rng.choice(early[dag_id])  # early enough that later runs take it if this one fails first
            delay = timedelta(hours=rng.uniform(*HOURS[kind])) if kind == "slow_upload" else timedelta(0)
            faults.append(Fault(kind, run_at, run_at + delay, dag_id))
    return sorted(faults, key=lambda f: (f.start, f.kind))
