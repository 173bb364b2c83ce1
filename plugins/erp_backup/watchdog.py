"""The backup watchdog: is the newest offsite-verified set of every enabled job fresh enough?

It catches what task failure callbacks miss: killed workers (no callback on SIGKILL
or OOM), a paused DAG, a scheduler outage, an offsite store that went away.

- `scan_staging` and `confirm_offsite` read the sets (staging, then the offsite manifest).
- `evaluate` (pure) turns one job's newest set and problem sets into a `Status`.
- `check` runs both for every enabled job of the plan, plus one row for the offsite store.
- `transitions` (pure) decides which Slack messages the change of statuses deserves:
  a breach once when it starts, once more only for a new kind of problem, a recovery once.
- `announce` sends them and keeps the alert state in `$BACKUP_ROOT/watchdog/state.json`.

Rules, for each job:

- no_set: no complete, offsite-verified set exists.
- overdue: the run due after the newest set should have finished by now. The
  deadline is the next cron fire after that set's capture (in the job's timezone),
  plus the set's own capture duration, plus `GRACE`. For a daily job whose backup
  takes minutes, that is "no new set in 24 h + 1 h".
- rpo: the set is older than the service's RPO. The RPO is carried by the service's
  most frequent enabled type (for postgres: wal if enabled, else full), so a weekly
  snapshot is never held to a 6 h RPO. If even that type's schedule leaves gaps
  longer than the RPO, the breach is `rpo_unmet_by_schedule`: the plan cannot keep
  its promise, whatever the age.
- corrupt / incomplete: sets that failed (checksum mismatch; no manifest and nothing
  written for `GRACE`) since the newest good set. Older ones are only counted.
- offsite_missing: staging says a set is offsite, but the store has no manifest for it.
- suspect: an offsite manifest disagrees with its upload record (edited, back-dated,
  copied; see erp_backup.offsite_trust). Retention keeps it and the drill skips it.
- unshipped: a set holding data has not reached offsite `staging.alert_after_days` after
  its capture (erp_backup.staging).

And one row for the plan when service blocks of it are broken (`plan_error`): those
services' DAGs are not loaded, so only this row says so. Fixing the plan sends a recovery.

When the offsite store is unreachable, its row says so, and each job is judged from
its staging manifests (their offsite receipts were verified at upload), with a note.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from erp_backup import runs, staging
from erp_backup.manifest import DIR_MODE, Manifest, ManifestError, write_atomic
from erp_backup.notify import one_line
from erp_backup.notify import send as slack_send
from erp_backup.offsite import Offsite
from erp_backup.offsite_trust import OffsiteSetCheck, check_offsite_sets
from erp_backup.plan import BackupJob, Plan
from erp_backup.schedules import as_utc as _utc
from erp_backup.schedules import format_duration, longest_gap, next_fire
from erp_backup.schedules import local_text as _local
from erp_backup.sets import SetState, list_sets

log = logging.getLogger(__name__)

GRACE = timedelta(hours=1)
OFFSITE_KEY = "offsite"
PLAN_KEY = "plan"
STATE_DIR = "watchdog"
STATE_NAME = "state.json"
OK, BREACH = "ok", "breach"
# Reasons that only say "the same set got older": one incident, announced once.
_STALENESS = frozenset({"no_set", "overdue", "rpo"})


@dataclass(frozen=True)
class Reason:
    code: str
    text: str


@dataclass(frozen=True)
class SetCounts:
    """Backup ids of one job's problem sets on staging (and offsite), by kind."""

    incomplete: tuple[str, ...] = ()  # no manifest and nothing written for GRACE: a killed or failed run
    corrupt: tuple[str, ...] = ()  # the checksum task found a mismatch, or the manifest is unreadable
    pending: tuple[str, ...] = ()  # still on their way: being written, unverified, or not yet offsite
    offsite_missing: tuple[str, ...] = ()  # OFFSITE on staging, but no manifest in the offsite store
    suspect: tuple[str, ...] = ()  # offsite manifests that disagree with their upload record

    def as_dict(self) -> dict[str, list[str]]:
        names = ("incomplete", "corrupt", "pending", "offsite_missing", "suspect")
        return {name: list(getattr(self, name)) for name in names}


@dataclass(frozen=True)
class Status:
    """One row of the watchdog's report: a job (keyed by its dag_id) or the offsite store."""

    key: str
    label: str
    checked_at: datetime
    newest_id: str | None = None
    captured_at: datetime | None = None
    rpo: timedelta | None = None
    due_by: datetime | None = None
    counts: SetCounts = field(default_factory=SetCounts)
    reasons: tuple[Reason, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def breached(self) -> bool:
        return bool(self.reasons)

    @property
    def age(self) -> timedelta | None:
        return None if self.captured_at is None else self.checked_at - self.captured_at

    def as_row(self) -> dict[str, Any]:
        """A JSON-ready dict (the task's XCom); `from_row` reads it back."""
        age = self.age
        return {
            "key": self.key,
            "job": self.label,
            "newest_set": self.newest_id,
            "age": format_duration(age) if age is not None else None,
            "age_seconds": int(age.total_seconds()) if age is not None else None,
            "rpo": format_duration(self.rpo) if self.rpo is not None else None,
            "rpo_seconds": int(self.rpo.total_seconds()) if self.rpo is not None else None,
            "status": BREACH if self.breached else OK,
            "reasons": [{"code": r.code, "text": r.text} for r in self.reasons],
            "incomplete": len(self.counts.incomplete),
            "corrupt": len(self.counts.corrupt),
            "pending": len(self.counts.pending),
            "offsite_missing": len(self.counts.offsite_missing),
            "suspect": len(self.counts.suspect),
            "sets": self.counts.as_dict(),
            "captured_at": _iso(self.captured_at),
            "expected_by": _iso(self.due_by),
            "checked_at": self.checked_at.isoformat(),
            "notes": list(self.notes),
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Status:
        return cls(
            key=row["key"],
            label=row["job"],
            checked_at=datetime.fromisoformat(row["checked_at"]),
            newest_id=row.get("newest_set"),
            captured_at=_from_iso(row.get("captured_at")),
            rpo=timedelta(seconds=row["rpo_seconds"]) if row.get("rpo_seconds") is not None else None,
            due_by=_from_iso(row.get("expected_by")),
            counts=SetCounts(**{name: tuple(ids) for name, ids in (row.get("sets") or {}).items()}),
            reasons=tuple(Reason(r["code"], r["text"]) for r in row.get("reasons", [])),
            notes=tuple(row.get("notes", [])),
        )


@dataclass(frozen=True)
class Alert:
    key: str
    kind: str  # "breach", "changed", "recovery", or "info" (erp_backup.first_sets)
    text: str


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _from_iso(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def rpo_carriers(jobs: Iterable[BackupJob], now: datetime) -> set[str]:
    """The dag_ids held to their service's RPO: each service's most frequent enabled type(s)."""
    gaps: dict[str, list[tuple[timedelta, str]]] = {}
    for job in jobs:
        gaps.setdefault(job.service, []).append((longest_gap(job.schedule, job.timezone, now), job.dag_id))
    carriers: set[str] = set()
    for entries in gaps.values():
        shortest = min(gap for gap, _ in entries)
        carriers.update(dag_id for gap, dag_id in entries if gap == shortest)
    return carriers


# --- evaluation (pure) -------------------------------------------------------------


def evaluate(
    job: BackupJob,
    newest: Manifest | None,
    counts: SetCounts,
    now: datetime,
    *,
    carries_rpo: bool = True,
    grace: timedelta = GRACE,
    suspect_reasons: Mapping[str, str] | None = None,
) -> Status:
    """Judge one job from its newest offsite-verified manifest and its problem sets. Pure.

    `suspect_reasons` says why each set in `counts.suspect` is suspect (backup id -> why).
    """
    now = _utc(now)
    reasons, captured, due_by = _freshness(job, newest, now, grace)
    if carries_rpo:
        reasons += _rpo_reasons(job, newest, captured, now)
    reasons += _problem_sets(job, newest, counts, grace, suspect_reasons or {})
    return Status(
        key=job.dag_id,
        label=f"{job.service}/{job.backup_type}",
        checked_at=now,
        newest_id=newest.backup_id if newest is not None else None,
        captured_at=captured,
        rpo=job.rpo,
        due_by=due_by,
        counts=counts,
        reasons=tuple(reasons),
    )


def _freshness(job: BackupJob, newest: Manifest | None, now: datetime,
               grace: timedelta) -> tuple[list[Reason], datetime | None, datetime | None]:
    """(no_set or overdue reasons, newest capture time, when the next set is due)."""
    what = f"{job.service}/{job.backup_type}"
    if newest is None:
        return [Reason("no_set", f"no complete, offsite-verified {what} set exists")], None, None
    captured = _utc(newest.captured_finished_at)
    duration = max(captured - _utc(newest.captured_started_at), timedelta(0))
    due_by = next_fire(job.schedule, job.timezone, captured) + duration + grace
    if now <= due_by:
        return [], captured, due_by
    return [Reason(
        "overdue",
        f"no new set since {newest.backup_id} ({format_duration(now - captured)} old): "
        f"schedule `{job.schedule}` ({job.timezone}) expected one by {_local(due_by, job.timezone)}",
    )], captured, due_by


def _rpo_reasons(job: BackupJob, newest: Manifest | None, captured: datetime | None, now: datetime) -> list[Reason]:
    """A schedule that cannot keep the RPO, or a newest set older than it."""
    gap = longest_gap(job.schedule, job.timezone, now)
    if gap > job.rpo:
        return [Reason(
            "rpo_unmet_by_schedule",
            f"RPO {format_duration(job.rpo)} of {job.service} cannot be met: its most frequent enabled type, "
            f"{job.backup_type} (`{job.schedule}`), leaves up to {format_duration(gap)} between sets",
        )]
    if newest is not None and captured is not None and now - captured > job.rpo:
        return [Reason(
            "rpo",
            f"newest set {newest.backup_id} is {format_duration(now - captured)} old, "
            f"over the RPO of {format_duration(job.rpo)}",
        )]
    return []


def _problem_sets(job: BackupJob, newest: Manifest | None, counts: SetCounts, grace: timedelta,
                  suspect_reasons: Mapping[str, str]) -> list[Reason]:
    """Corrupt and incomplete sets since the newest good one, receipts without an offsite manifest, suspect sets."""
    what = f"{job.service}/{job.backup_type}"
    reasons = []

    def since_newest(ids: tuple[str, ...]) -> list[str]:
        return [i for i in ids if newest is None or i > newest.backup_id]

    if failed := since_newest(counts.corrupt):
        reasons.append(Reason(
            "corrupt",
            f"{len(failed)} corrupt {what} set(s) since the newest good one: {', '.join(failed)} "
            "(checksum mismatch; rerun that run or delete the set)",
        ))
    if failed := since_newest(counts.incomplete):
        reasons.append(Reason(
            "incomplete",
            f"{len(failed)} incomplete {what} set(s) since the newest good one: {', '.join(failed)} "
            f"(no manifest, nothing written for {format_duration(grace)}: a killed or failed run)",
        ))
    if counts.offsite_missing:
        reasons.append(Reason(
            "offsite_missing",
            f"{what} set(s) {', '.join(counts.offsite_missing)} have an offsite receipt on staging "
            "but no manifest in the offsite store",
        ))
    if counts.suspect:
        reasons.append(Reason(
            "suspect",
            f"{len(counts.suspect)} offsite {what} set(s) with a manifest that disagrees with its upload record, "
            "kept and never drilled until checked by hand (rerun its offsite_upload from staging, or delete it): "
            + "; ".join(f"{i}: {suspect_reasons.get(i, 'see `list --from offsite`')}" for i in counts.suspect),
        ))
    return reasons


def plan_status(plan: Plan, now: datetime) -> Status:
    """The plan's row: a breach while service blocks are broken (their DAGs are not loaded)."""
    reasons = tuple(
        Reason("plan_error", f"services.{service} is broken, so its backup DAGs are not loaded: {error}")
        for service, error in sorted(plan.service_errors.items())
    )
    return Status(key=PLAN_KEY, label=f"backup plan {plan.path}", checked_at=_utc(now), reasons=reasons)


def offsite_status(description: str, error: str | None, now: datetime) -> Status:
    reasons = (Reason("offsite_unreachable", f"offsite unreachable: {error}"),) if error else ()
    return Status(key=OFFSITE_KEY, label=f"offsite {description}", checked_at=_utc(now), reasons=reasons)


# --- reading the sets ---------------------------------------------------------------


def _last_write(path: Path) -> datetime:
    newest = path.stat().st_mtime
    for entry in path.rglob("*"):
        try:
            newest = max(newest, entry.lstat().st_mtime)
        except FileNotFoundError:  # removed while we looked
            continue
    return datetime.fromtimestamp(newest, UTC)


def scan_staging(
    root: Path, job: BackupJob, now: datetime, grace: timedelta = GRACE
) -> tuple[list[Manifest], SetCounts]:
    """The staging manifests of OFFSITE sets (newest capture first) and the job's problem sets."""
    offsite_sets: list[Manifest] = []
    incomplete, corrupt, pending = [], [], []
    for backup_set in list_sets(root, job.service, job.backup_type):
        state = backup_set.state
        if state is SetState.OFFSITE:
            try:
                offsite_sets.append(backup_set.manifest())
            except ManifestError as exc:
                log.warning("watchdog: %s: %s", backup_set.key, exc)
                corrupt.append(backup_set.backup_id)
        elif state is SetState.CORRUPT:
            corrupt.append(backup_set.backup_id)
        elif state is SetState.INCOMPLETE and _last_write(backup_set.path) < _utc(now) - grace:
            incomplete.append(backup_set.backup_id)
        else:
            pending.append(backup_set.backup_id)
    offsite_sets.sort(key=lambda m: (_utc(m.captured_finished_at), m.backup_id), reverse=True)
    return offsite_sets, SetCounts(tuple(incomplete), tuple(corrupt), tuple(pending))


def confirm_offsite(
    candidates: list[Manifest], checks: Mapping[str, OffsiteSetCheck]
) -> tuple[Manifest | None, tuple[str, ...]]:
    """The offsite manifest of the first candidate whose offsite copy checks out, and the ids lacking one.

    `checks` are the offsite sets of the job by backup id (erp_backup.offsite_trust). A candidate
    whose offsite manifest is suspect is neither confirmed nor missing: it is reported as suspect.
    """
    missing: list[str] = []
    for local in candidates:
        remote = checks.get(local.backup_id)
        if remote is not None and remote.state is SetState.OFFSITE:
            return remote.manifest, tuple(missing)
        if remote is None or remote.state is not SetState.SUSPECT or remote.manifest_missing:
            missing.append(local.backup_id)
    return None, tuple(missing)


def suspect_sets(checks: Iterable[OffsiteSetCheck]) -> dict[str, str]:
    """Backup id -> why, for the offsite sets whose manifest is there but disagrees with its record."""
    return {c.backup_id: c.why for c in checks if c.state is SetState.SUSPECT and not c.manifest_missing}


def check(plan: Plan, now: datetime, offsite: Offsite) -> list[Status]:
    """A status for every enabled job of the plan, then one for the offsite store, then one for the plan
    while service blocks of it are broken. Never raises for one job."""
    now = _utc(now)
    jobs = plan.enabled_jobs
    offsite_error = None
    if jobs:
        try:  # one cheap probe, so an outage costs one timeout, not one per job
            offsite.list_backup_ids(jobs[0].service, jobs[0].backup_type)
        except Exception as exc:
            offsite_error = one_line(exc)
    carriers = rpo_carriers(jobs, now)
    statuses = []
    for job in jobs:
        try:
            candidates, counts = scan_staging(plan.backup_root, job, now)
            newest, notes, suspect = None, [], {}
            if offsite_error is None:
                try:
                    checks = check_offsite_sets(offsite, job.service, job.backup_type, plan.backup_root)
                    newest, missing = confirm_offsite(candidates, {c.backup_id: c for c in checks})
                    suspect = suspect_sets(checks)
                    counts = replace(counts, offsite_missing=missing, suspect=tuple(sorted(suspect)))
                except Exception as exc:
                    offsite_error = one_line(exc)
            if offsite_error is not None:
                newest = candidates[0] if candidates else None
                notes.append("offsite not confirmed (unreachable): judged from the staging manifest")
            status = evaluate(job, newest, counts, now, carries_rpo=job.dag_id in carriers, suspect_reasons=suspect)
            late = tuple(Reason("unshipped", text) for text in staging.unshipped_alerts(plan, job, now))
            statuses.append(replace(status, reasons=status.reasons + late, notes=tuple(notes)))
        except Exception as exc:
            log.exception("watchdog: checking %s failed", job.dag_id)
            statuses.append(Status(
                key=job.dag_id, label=f"{job.service}/{job.backup_type}", checked_at=now, rpo=job.rpo,
                reasons=(Reason("check_failed", f"the watchdog could not check {plan.backup_root}: {one_line(exc)}"),),
            ))
    statuses.append(offsite_status(offsite.description, offsite_error, now))
    if plan.service_errors:
        statuses.append(plan_status(plan, now))
    return statuses


# --- alerts ---------------------------------------------------------------------------


def _incidents(codes: Iterable[str]) -> set[str]:
    return {"stale" if code in _STALENESS else code for code in codes}


def transitions(
    previous: Mapping[str, Mapping[str, Any]], statuses: Iterable[Status]
) -> tuple[list[Alert], dict[str, dict[str, Any]]]:
    """The alerts a new set of statuses deserves, and the state to keep. Pure.

    - ok -> breach: one "breach" alert.
    - breach -> breach: nothing, unless a new kind of problem appeared ("changed");
      a set only getting older (overdue, then rpo) is the same incident.
    - breach -> ok: one "recovery" alert.
    Keys absent from `statuses` (jobs no longer enabled) are dropped without a message,
    except the plan's: its row is only there while the plan is broken, so its absence is a recovery.
    """
    alerts: list[Alert] = []
    state: dict[str, dict[str, Any]] = {}
    statuses = list(statuses)
    plan_before = previous.get(PLAN_KEY) or {}
    if plan_before.get("status") == BREACH and statuses and all(s.key != PLAN_KEY for s in statuses):
        statuses.append(Status(key=PLAN_KEY, label=str(plan_before.get("label", "backup plan")),
                               checked_at=statuses[0].checked_at))
    for status in statuses:
        before = previous.get(status.key) or {}
        was_breached = before.get("status") == BREACH
        checked = status.checked_at.isoformat()
        if status.breached:
            since = before.get("since", checked) if was_breached else checked
            if not was_breached:
                alerts.append(Alert(status.key, "breach", breach_text(status, status.reasons)))
            else:
                known = _incidents(before.get("reasons") or {})
                new = [r for r in status.reasons if not _incidents([r.code]) <= known]
                if new:
                    alerts.append(Alert(status.key, "changed", breach_text(status, new, since=since)))
            state[status.key] = {
                "status": BREACH, "label": status.label, "since": since, "checked_at": checked,
                "reasons": {r.code: r.text for r in status.reasons},
            }
        else:
            if was_breached:
                alerts.append(Alert(status.key, "recovery", recovery_text(status, before.get("since"))))
            state[status.key] = {"status": OK, "label": status.label, "checked_at": checked}
    return alerts, state


def _newest_line(status: Status) -> str:
    if status.newest_id is None or status.age is None:
        return ""
    rpo = f" (RPO {format_duration(status.rpo)})" if status.rpo is not None else ""
    return f"\nNewest offsite-verified set: `{status.newest_id}`, {format_duration(status.age)} old{rpo}."


def breach_text(status: Status, reasons: Iterable[Reason], since: str | None = None) -> str:
    head = (
        f":rotating_light: *Backup watchdog: {status.label} breach* (`{status.key}`)"
        if since is None
        else f":rotating_light: *Backup watchdog: {status.label} new problem* (`{status.key}`, in breach since {since})"
    )
    bullets = "".join(f"\n• {reason.text}" for reason in reasons)
    notes = "".join(f"\n_{note}_" for note in status.notes)
    return f"{head}{bullets}{_newest_line(status)}{notes}\nAnnounced once; a recovery message follows when it clears."


def recovery_text(status: Status, since: str | None) -> str:
    lasted = ""
    if since:
        lasted = f" after {format_duration(status.checked_at - datetime.fromisoformat(since))} (since {since})"
    return f":white_check_mark: *Backup watchdog: {status.label} recovered* (`{status.key}`){lasted}.{_newest_line(status)}"


def state_path(plan: Plan) -> Path:
    return plan.backup_root / STATE_DIR / STATE_NAME


def read_state(path: Path) -> dict[str, dict[str, Any]]:
    """The alert state; empty (so alerts may repeat once) if it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("watchdog: ignoring unreadable alert state %s (%s); breaches may be announced again", path, exc)
        return {}
    if not isinstance(data, dict):
        log.warning("watchdog: ignoring alert state %s: not a JSON object", path)
        return {}
    return {key: value for key, value in data.items() if isinstance(value, dict)}


def write_state(path: Path, state: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, mode=DIR_MODE, exist_ok=True)
    os.chmod(path.parent, DIR_MODE)
    write_atomic(path, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def announce(
    plan: Plan, statuses: Iterable[Status], send: Callable[[str, str], bool] = slack_send
) -> list[tuple[Alert, bool]]:
    """Send the alerts the statuses deserve and persist the state.

    An alert that could not be sent leaves its key's state as it was, so the
    next check tries again.
    """
    from erp_backup import first_sets

    path = state_path(plan)
    previous = read_state(path)
    held, waiting = first_sets.hold(plan, previous, statuses, GRACE)
    alerts, state = transitions(previous, held)
    first_sets.keep(state, waiting)
    if info := first_sets.info_text(previous, waiting):
        alerts.insert(0, Alert(first_sets.INFO_KEY, "info", info))
    results = []
    for alert in alerts:
        sent = send(plan.slack_conn_id, alert.text)
        results.append((alert, sent))
        if sent:
            log.info("watchdog: sent %s alert for %s", alert.kind, alert.key)
        else:
            log.error("watchdog: %s alert for %s not sent; will retry next check", alert.kind, alert.key)
            if alert.key in previous:
                state[alert.key] = dict(previous[alert.key])
            else:
                state.pop(alert.key, None)
    write_state(path, state)
    return results


# --- report -----------------------------------------------------------------------------


def render_table(statuses: Iterable[Status]) -> str:
    """A plain-text table (job, newest set, age, RPO, problem sets, status) and the breach reasons."""
    statuses = list(statuses)
    header = ("job", "newest set", "age", "RPO", "incomplete", "corrupt", "status")
    rows = [header]
    for status in statuses:
        row = status.as_row()
        rows.append((
            row["job"], row["newest_set"] or "-", row["age"] or "-", row["rpo"] or "-",
            str(row["incomplete"]), str(row["corrupt"]), row["status"].upper(),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    for status in statuses:
        lines.extend(f"{status.label}: {reason.text}" for reason in status.reasons)
        lines.extend(f"{status.label}: note: {note}" for note in status.notes)
    return "\n".join(lines)


def run_check(plan: Plan | None = None, now: datetime | None = None, offsite: Offsite | None = None) -> list[dict]:
    """The `check_freshness` task: check the present (wall clock), log the table, return the rows."""
    from erp_backup.offsite import offsite_from_plan
    from erp_backup.plan import load_plan

    plan = plan or load_plan()
    statuses = check(plan, now or runs.utcnow(), offsite or offsite_from_plan(plan))
    log.info("backup freshness:\n%s", render_table(statuses))
    from erp_backup.drill import ledger, records

    log.info("last DR drill per service:\n%s", "\n".join(ledger.last_drill_lines(records.read_ledger(plan))) or "none yet")
    return [status.as_row() for status in statuses]


def run_alerts(rows: Iterable[Mapping[str, Any]], plan: Plan | None = None) -> list[dict]:
    """The `alert` task: announce the transitions of the rows `run_check` returned."""
    from erp_backup.plan import load_plan

    plan = plan or load_plan()
    results = announce(plan, [Status.from_row(row) for row in rows])
    return [{"key": alert.key, "kind": alert.kind, "sent": sent} for alert, sent in results]
