"""The watchdog's quiet first start: a job that has never produced a set waits for its first scheduled run.

A job with no set at all (none offsite, none on staging in any state) is *waiting* from the
first check that saw it (`waiting_since` in the watchdog's state) until its first scheduled
run after that, plus the watchdog's grace. Meanwhile its missing set is no breach; once that
run is late, "no_set" is a breach like any other. Jobs that start waiting are announced in
one informational message, so a fresh install posts one message, not one red alert per job.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from erp_backup.plan import Plan
from erp_backup.schedules import local_text, next_fire

if TYPE_CHECKING:
    from erp_backup.watchdog import Status

NO_SET = "no_set"
WAITING_KEY = "waiting_since"
INFO_KEY = "first_sets"


@dataclass(frozen=True)
class Waiting:
    key: str
    label: str
    since: datetime
    due_by: datetime
    timezone: str


def never_backed_up(status: Status) -> bool:
    """Only "no set exists", and no set of the job in any state anywhere."""
    counts = status.counts
    return ([r.code for r in status.reasons] == [NO_SET]
            and not any((counts.incomplete, counts.corrupt, counts.pending, counts.offsite_missing, counts.suspect)))


def hold(plan: Plan, previous: Mapping[str, Mapping[str, Any]], statuses: Iterable[Status],
         grace: timedelta) -> tuple[list[Status], list[Waiting]]:
    """The statuses with waiting jobs' no_set cleared (and a note), and the jobs that are waiting."""
    jobs = {job.dag_id: job for job in plan.enabled_jobs}
    held, waiting = [], []
    for status in statuses:
        job = jobs.get(status.key)
        before = previous.get(status.key) or {}
        if job is None or not never_backed_up(status) or before.get("status") == "breach":
            held.append(status)
            continue
        since_text = before.get(WAITING_KEY)
        since = datetime.fromisoformat(since_text) if since_text else status.checked_at
        due_by = next_fire(job.schedule, job.timezone, since) + grace
        if status.checked_at > due_by:
            note = f"no set since the watchdog first checked at {local_text(since, job.timezone)}"
            held.append(replace(status, due_by=due_by, notes=(*status.notes, note)))
            continue
        waiting.append(Waiting(status.key, status.label, since, due_by, job.timezone))
        note = f"waiting for the first set, due by {local_text(due_by, job.timezone)}"
        held.append(replace(status, reasons=(), due_by=due_by, notes=(*status.notes, note)))
    return held, waiting


def keep(state: dict[str, dict[str, Any]], waiting: Iterable[Waiting]) -> None:
    """Record when each waiting job started waiting, so its deadline does not move."""
    for item in waiting:
        state.setdefault(item.key, {})[WAITING_KEY] = item.since.isoformat()


def info_text(previous: Mapping[str, Mapping[str, Any]], waiting: Iterable[Waiting]) -> str | None:
    """One informational message for the jobs that started waiting at this check; None if there are none."""
    new = [item for item in waiting if not (previous.get(item.key) or {}).get(WAITING_KEY)]
    if not new:
        return None
    lines = "".join(f"\n• {item.label}: first set due by {local_text(item.due_by, item.timezone)}" for item in new)
    return (f":information_source: *Backup watchdog: no backup yet* for {len(new)} job(s); "
            f"nothing is late yet.{lines}\nA job still without a set after that is alerted.")
