"""The soak's summary table: faults injected, alerts sent, windows flagged, sets kept."""

from __future__ import annotations

from collections import Counter
from typing import Any

from erp_backup import staging
from erp_backup.offsite import offsite_from_plan
from erp_backup.plan import Plan
from erp_backup.sets import list_sets
from tests.integration.soak.faults import Fault
from tests.integration.soak.truth import Truth

ALERT_KINDS = (
    ("task failure", ":red_circle: *Failed*"),
    ("watchdog breach", "Backup watchdog:", "breach*"),
    ("watchdog new problem", "Backup watchdog:", "new problem*"),
    ("watchdog recovery", "Backup watchdog:", "recovered*"),
    ("staging cap", "staging cap reached"),
    ("DR drill", "DR drill"),
)


def alert_kind(text: str) -> str:
    for name, *fragments in ALERT_KINDS:
        if all(fragment in text for fragment in fragments):
            return name
    return "other"


def rows(title: str, items: list[tuple[str, Any]]) -> list[str]:
    width = max((len(name) for name, _ in items), default=0)
    return [title, *(f"  {name.ljust(width)}  {value}" for name, value in items)]


def summary_table(truth: Truth, plan: Plan, slack: list[str], drill: dict[str, Any], *, lost: list[Any],
                  scheduled: list[Fault], seed: int, days: int, disk: str, elapsed_s: float) -> str:
    start = truth.checks[0].at if truth.checks else None
    head = [f"SOAK: {days} simulated days from {start:%Y-%m-%d %H:%M}Z (first check), seed {seed}, "
            f"staging on {disk}, {elapsed_s:.0f} s real time"]
    faults = Counter(fault.kind for fault, _ in truth.faults)
    fault_rows = [(kind, f"{faults[kind]}: " + "; ".join(f.describe() for f, _ in truth.faults if f.kind == kind))
                  for kind in sorted(faults)]
    landed = {fault for fault, _ in truth.faults}
    fault_rows += [("not landed", f.describe()) for f in scheduled if f not in landed]
    alerts = Counter(alert_kind(text) for text in slack)
    flagged = truth.flagged()
    reasons = Counter(code for _, _, codes in flagged for code in codes)
    missed = truth.rpo_missed()
    jobs = plan.enabled_jobs
    window_rows = [
        ("hourly checks x jobs", f"{len(truth.checks)} x {len(jobs)} = {len(truth.checks) * len(jobs)}"),
        ("flagged (job breached)", f"{len(flagged)}: " + ", ".join(f"{c} {n}" for c, n in sorted(reasons.items()))),
        ("RPO missed (truth)", f"{len(missed)}, every one flagged and announced"),
        ("watchdog runs failed", f"{len(truth.watchdog_failures)} (alert state unwritable on a full disk)"),
    ]
    return "\n".join([
        *head,
        *rows("Faults injected", fault_rows),
        *rows("Alerts sent (Slack messages received)", [(k, n) for k, n in sorted(alerts.items())] + [("total", len(slack))]),
        *rows("Windows", window_rows),
        *rows("Sets", [*set_rows(truth, plan), ("verified sets lost", len(lost))]),
        *rows("Failed tasks (after retries), by cause", failure_rows(truth)),
        *rows(f"Drill at the end: {drill['status']}", [
            (f"{r['service']}/{r['backup_type']}/{r['backup_id']}",
             f"{r['status']}, {r['sizes'].get('fetched_bytes')} bytes, {len(r.get('checks') or [])} checks")
            for r in drill["services"]]),
    ])


def failure_rows(truth: Truth) -> list[tuple[str, Any]]:
    causes = Counter((f"{dag_id}.{task_id}", f"{error.partition(': ')[0]}: {error.partition(': ')[2][:110]}")
                     for dag_id, task_id, _, error in truth.failed_tasks)
    return [(f"{where} x{n}", cause) for (where, cause), n in sorted(causes.items())]


def set_rows(truth: Truth, plan: Plan) -> list[tuple[str, Any]]:
    records = list(truth.sets.values())
    cap = staging.limits(plan)
    store = offsite_from_plan(plan)
    kept, offsite = Counter(), Counter()
    for job in plan.enabled_jobs:
        kept[job.dag_id] = sum(1 for s in list_sets(plan.backup_root, job.service, job.backup_type) if s.state.is_good)
        offsite[job.dag_id] = sum(1 for i in store.list_backup_ids(job.service, job.backup_type)
                                  if store.read_manifest(job.service, job.backup_type, i) is not None)
    removed = Counter("staging cap" if "staging cap" in why else "incomplete" if why.startswith("incomplete")
                      else "retention" for _, why in truth.removals)
    most = ", ".join(f"{d} {n}/{cap.max_sets} sets {b}/{cap.max_bytes} B" for d, (n, b) in sorted(truth.most_unshipped.items()))
    return [
        ("taken (manifest written)", sum(1 for r in records if r.captured_at)),
        ("verified", sum(1 for r in records if r.verified_at)),
        ("reached offsite", sum(1 for r in records if r.offsite_at)),
        ("flipped byte caught (corrupt)", f"{sum(1 for f in truth.flips if f['caught'])} of {len(truth.flips)}, "
                                          f"{sum(1 for f in truth.flips if f['retaken_at'])} taken again"),
        ("runs cleared by the operator", ", ".join(f"{d}.{t} {n}" for (d, t), n in sorted(truth.cleared_tasks.items())) or 0),
        ("killed mid-write, then removed", f"{len(truth.kills)} killed; " + ", ".join(f"{k} {n}" for k, n in sorted(removed.items()))),
        ("failed tasks (after retries)", len(truth.failed_tasks)),
        ("kept on staging (good), by job", dict(kept)),
        ("offsite at the end, by job", dict(offsite)),
        ("most never-offsite on staging", most),
    ]
