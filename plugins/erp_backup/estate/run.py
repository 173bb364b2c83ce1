"""One whole-estate recovery end to end: plan the sets, recover, check references, tear down, report.

`recover_estate` is what `erp-restore recover-estate` and the `dr_estate_drill` DAG call.
The report is written to `$BACKUP_ROOT/estate/runs/<run>/report.{json,md}`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from erp_backup.drill.choose import offsite_store
from erp_backup.drill.targets import slug
from erp_backup.estate.choose import EstatePlanOfSets, layers, plan_estate
from erp_backup.estate.recover import EstateRecovery
from erp_backup.estate.references import run_checks
from erp_backup.estate.report import build_report, render_markdown
from erp_backup.manifest import write_atomic
from erp_backup.notify import one_line
from erp_backup.plan import Plan
from erp_backup.services.base import airflow_connection

log = logging.getLogger(__name__)


def runs_dir(plan: Plan, run_id: str) -> Path:
    return Path(plan.backup_root) / "estate" / "runs" / slug(run_id, 64)


def plan_of_sets(plan: Plan, sets: EstatePlanOfSets) -> dict[str, Any]:
    """The dry run's answer: the sets each service would restore, and in which order."""
    depends = plan.estate.depends_on if plan.estate else {}
    return {"at": sets.at.isoformat(), "partial": sets.partial, "missing": dict(sets.missing),
            "order": layers([s.service for s in sets.services], depends),
            "services": {s.service: s.as_dict() for s in sets.services}}


def _checks(plan: Plan, recovery: EstateRecovery, sets: EstatePlanOfSets) -> dict[str, Any]:
    if plan.estate is None or not plan.estate.references:
        return {"status": "not configured", "why": "the plan has no estate.references"}
    try:
        return run_checks(plan.estate.references, recovery.target, {s.service: s for s in sets.services})
    except Exception as exc:
        log.exception("estate reference checks failed")
        return {"status": "error", "why": one_line(exc)}


def write_report(plan: Plan, run_id: str, report: dict[str, Any]) -> Path:
    folder = runs_dir(plan, run_id)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(folder / "report.json", (json.dumps(report, indent=2, sort_keys=True, default=str) + "\n").encode())
    write_atomic(folder / "report.md", render_markdown(report).encode())
    return folder


def recover_estate(plan: Plan, at: datetime, *, run_id: str, allow_partial: bool = False, dry_run: bool = False,
                   keep_scratch: bool = False, offsite: Any = None,
                   get_connection: Callable[[str], Any] = airflow_connection) -> dict[str, Any]:
    """Recover every enabled service to `at` into scratch targets, check references, tear down, report.

    Raises EstateRefused (before anything is started) for a time outside the PITR range, or a
    service without a set at or before `at` unless `allow_partial`.
    """
    store = offsite_store(plan, offsite)
    sets = plan_estate(plan, at, store, allow_partial=allow_partial)
    if dry_run:
        return {"dry_run": True, **plan_of_sets(plan, sets)}
    recovery = EstateRecovery(plan, run_id, store, get_connection=get_connection)
    recovery.clean_leftovers()
    try:
        recovery.recover(sets)
        references = _checks(plan, recovery, sets)
    finally:
        recovery.release()
        teardown = recovery.teardown(keep=keep_scratch)
    report = build_report(plan, run_id, sets, recovery, references, datetime.now(UTC))
    report["teardown"] = teardown
    report["report_dir"] = str(write_report(plan, run_id, report))
    return report
