"""One whole-estate recovery, in the phases the CLI and the `dr_estate_drill` DAG share.

- `choose_time`: the drill's random T within the plan's window, among times the backups cover.
- `recover_phase`: plan the sets, restore, check references; the targets stay up, listed in
  `targets.json` so a teardown in another process can remove them.
- `teardown_phase`: stop and remove the targets and the fetched files (always runs).
- `finish_phase`: ledger (local and offsite, one line per service), Slack summary.

`recover_estate` is the CLI's: recover, then always tear down. Reports go to
`$BACKUP_ROOT/estate/runs/<run>/report.{json,md}`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from erp_backup.drill.choose import offsite_store
from erp_backup.drill.targets import slug
from erp_backup.estate.choose import EstatePlanOfSets, EstateRefused, layers, plan_estate
from erp_backup.estate.recover import EstateRecovery
from erp_backup.estate.references import run_checks
from erp_backup.estate.report import build_report, render_markdown
from erp_backup.manifest import write_atomic
from erp_backup.notify import one_line
from erp_backup.plan import Plan
from erp_backup.services.base import airflow_connection

log = logging.getLogger(__name__)

TIME_ATTEMPTS = 8


def runs_dir(plan: Plan, run_id: str) -> Path:
    return Path(plan.backup_root) / "estate" / "runs" / slug(run_id, 64)


def plan_of_sets(plan: Plan, sets: EstatePlanOfSets) -> dict[str, Any]:
    """The dry run's answer: the sets each service would restore, and in which order."""
    depends = plan.estate.depends_on if plan.estate else {}
    return {"at": sets.at.isoformat(), "partial": sets.partial, "missing": dict(sets.missing),
            "order": layers([s.service for s in sets.services], depends),
            "services": {s.service: s.as_dict() for s in sets.services}}


def choose_time(plan: Plan, run_id: str, now: datetime, store: Any) -> EstatePlanOfSets:
    """A random T (seeded by the run id) within the plan's window before `now` that every PITR service covers.

    A refused T lowers the upper bound (the newest WAL is shipped hours after it is written);
    after TIME_ATTEMPTS refusals the last refusal (naming the covered range) is raised.
    """
    window = plan.estate.window if plan.estate else None
    if window is None:
        raise EstateRefused(f"{plan.path}: the plan has no estate block (estate.window)")
    rng = random.Random(int(hashlib.sha256(run_id.encode()).hexdigest()[:12], 16))
    low, high = now - window, now
    refused: EstateRefused | None = None
    for _ in range(TIME_ATTEMPTS):
        at = (low + (high - low) * rng.random()).replace(microsecond=0)
        try:
            return plan_estate(plan, at, store, allow_partial=True)
        except EstateRefused as exc:
            refused, high = exc, at
    assert refused is not None
    raise refused


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


def read_report(plan: Plan, run_id: str) -> dict[str, Any] | None:
    path = runs_dir(plan, run_id) / "report.json"
    return json.loads(path.read_text()) if path.is_file() else None


def recover_phase(plan: Plan, sets: EstatePlanOfSets, *, run_id: str, store: Any,
                  get_connection: Callable[[str], Any] = airflow_connection,
                  identities: Callable[[], Sequence[Any]] | None = None, backend: str | None = None) -> dict[str, Any]:
    """Restore the planned sets and check references; targets stay up (see teardown_phase). Writes the report.

    Sealed sets are decrypted with `identities`, by default the plan's identity connection. `backend`
    (local | docker) defaults to the plan's drill.backend."""
    recovery = EstateRecovery(plan, run_id, store, get_connection=get_connection, identities=identities, backend=backend)
    recovery.clean_leftovers()
    try:
        recovery.recover(sets)
        references = _checks(plan, recovery, sets)
    finally:
        recovery.release()
        recovery.save_targets(runs_dir(plan, run_id) / "targets.json")
    report = build_report(plan, run_id, sets, recovery, references, datetime.now(UTC))
    report["report_dir"] = str(runs_dir(plan, run_id))
    write_report(plan, run_id, report)
    return report


def teardown_phase(plan: Plan, run_id: str, *, keep_scratch: bool = False,
                   get_connection: Callable[[str], Any] = airflow_connection, backend: str | None = None) -> list[str]:
    """Stop and remove the run's targets and fetched files; record what was done in its report."""
    recovery = EstateRecovery(plan, run_id, None, get_connection=get_connection, backend=backend)
    done = recovery.teardown(keep=keep_scratch, saved=runs_dir(plan, run_id) / "targets.json")
    report = read_report(plan, run_id)
    if report is not None:
        report["teardown"] = done
        write_report(plan, run_id, report)
    log.info("estate %s teardown: %s", run_id, "; ".join(done) or "nothing to remove")
    return done


def recover_estate(plan: Plan, at: datetime, *, run_id: str, allow_partial: bool = False, dry_run: bool = False,
                   keep_scratch: bool = False, offsite: Any = None,
                   get_connection: Callable[[str], Any] = airflow_connection,
                   identities: Callable[[], Sequence[Any]] | None = None, backend: str | None = None) -> dict[str, Any]:
    """Recover every enabled service to `at` into scratch targets, check references, always tear down, report.

    `backend` (local | docker, default the plan's drill.backend) is where the scratch targets run.

    Raises EstateRefused (before anything is started) for a time outside the PITR range, or a
    service without a set at or before `at` unless `allow_partial`.
    """
    store = offsite_store(plan, offsite)
    sets = plan_estate(plan, at, store, allow_partial=allow_partial)
    if dry_run:
        return {"dry_run": True, **plan_of_sets(plan, sets)}
    try:
        recover_phase(plan, sets, run_id=run_id, store=store, get_connection=get_connection, identities=identities,
                      backend=backend)
    finally:
        teardown_phase(plan, run_id, keep_scratch=keep_scratch, get_connection=get_connection, backend=backend)
    report = read_report(plan, run_id)
    assert report is not None
    return report
