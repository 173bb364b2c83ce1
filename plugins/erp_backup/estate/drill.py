"""The monthly estate drill's steps as plain functions (the `dr_estate_drill` DAG wraps them), and its doc.

choose (a random T in the window, or the `at` param) → recover (setup: targets stay up)
→ teardown (always) → report (ledger lines, one Slack summary; fails the run unless passed).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

from erp_backup.drill.ledger import DrillLedgerEntry
from erp_backup.drill.report import _duration
from erp_backup.estate import DAG_ID
from erp_backup.estate.choose import plan_estate
from erp_backup.estate.report import render_markdown
from erp_backup.estate.run import choose_time, plan_of_sets, read_report, recover_phase, runs_dir
from erp_backup.manifest import write_atomic
from erp_backup.notify import one_line
from erp_backup.plan import Plan
from erp_backup.runs import RunInfo

log = logging.getLogger(__name__)

LEDGER_KIND = "estate"


def render_doc(plan: Plan) -> str:
    estate = plan.estate
    schedule = f"`{estate.schedule}` ({estate.timezone})" if estate else "none (the plan has no estate block)"
    window = f"{estate.window.days} d" if estate else "–"
    return f"""# {DAG_ID}

## Purpose
Prove the whole estate can be recovered to one point in time, and measure how far its stores
disagree there. Every enabled service is restored from offsite into fresh scratch targets as of a
random time T within the last {window}: PostgreSQL by PITR to T, every other service from its newest
set captured at or before T, in the plan's dependency order (independent services in parallel).
The cross-service reference checks of the plan's `estate.references` then count and sample
documents without their object (or with a different hash), objects without a document, documents
without their vectors and vectors without a document, each explained by the sets' capture times.

| | |
|---|---|
| Owner | ops-backup |
| Schedule | {schedule} and manual runs (param `at`: recover to that time instead of a random one) |
| Report | `$BACKUP_ROOT/estate/runs/<run>/report.md` + `.json`: sets, capture times, skew, restore times, RTO vs the tightest target |
| Ledger | `$BACKUP_ROOT/drills/ledger.jsonl` (and offsite), one line per service, `kind: estate` |
| Alerts | Slack `{plan.slack_conn_id}`: one summary per run, and any task failure |

## Tasks
`choose` → `recover` (setup) → `teardown` (teardown, always runs) → `report` (always runs; fails
the run unless every service was recovered and every reference gap is explained by capture times).

## Idempotency
This job is idempotent: a rerun derives the same T from the run id, starts fresh scratch targets
(leftovers of earlier runs are removed first) and appends each ledger line once. No backfill.
"""


def choose(plan: Plan, run: RunInfo, at: str | None, *, offsite: Any = None) -> dict[str, Any]:
    """T (the `at` param, else random in the window) and the sets for it; written to the run's plan.json."""
    from erp_backup.drill.choose import offsite_store

    store = offsite_store(plan, offsite)
    if at:
        sets = plan_estate(plan, datetime.fromisoformat(at), store, allow_partial=True)
    else:
        sets = choose_time(plan, run.run_id, run.moment, store)
    chosen = plan_of_sets(plan, sets)
    folder = runs_dir(plan, run.run_id)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(folder / "plan.json", (json.dumps(chosen, indent=2, default=str) + "\n").encode())
    return chosen


def recover(plan: Plan, run_id: str, at: str, *, offsite: Any = None, backend: str | None = None) -> dict[str, Any]:
    """Restore every service to `at` and check references; an error is recorded for the report, then raised."""
    from erp_backup.drill.choose import offsite_store

    try:
        store = offsite_store(plan, offsite)
        sets = plan_estate(plan, datetime.fromisoformat(at), store, allow_partial=True)
        report = recover_phase(plan, sets, run_id=run_id, store=store, backend=backend)
    except Exception as exc:
        write_atomic(runs_dir(plan, run_id) / "error.txt", one_line(exc).encode())
        raise
    return {"status": report["status"], "at": report["at"], "failed": report["failed"]}


def ledger_lines(report: dict[str, Any]) -> list[DrillLedgerEntry]:
    lines = []
    for name, service in report["services"].items():
        for chosen in service["sets"][:1]:  # the base set for PITR
            lines.append(DrillLedgerEntry(
                run_id=report["run_id"], finished_at=datetime.fromisoformat(str(report["finished"])), service=name,
                status="passed" if service["status"] == "restored" else "failed", kind=LEDGER_KIND,
                backup_type=chosen["backup_type"], backup_id=chosen["backup_id"],
                rto_measured_s=service["seconds"].get("total"), rto_extrapolated_s=service["extrapolated_s"],
                rto_target_s=service["rto_target_s"],
                details={"at": report["at"], "skew_s": report["skew"]["seconds"],
                         "reference_gaps_unexplained": report["references"].get("unexplained")}))
    return lines


def slack_text(report: dict[str, Any] | None, error: str | None, run_id: str) -> str:
    if report is None:
        return f":red_circle: *Estate drill FAILED* run `{run_id}`: {error or 'no report (the recover task did not finish)'}"
    ok = report["status"] == "passed" and not report["partial"]
    refs = report["references"]
    gaps = ", ".join(f"{g['name']}: {g['count']}" for g in refs.get("gaps", []) if g["count"]) or "none"
    lines = [f"{':white_check_mark:' if ok else ':red_circle:'} *Estate drill {'passed' if ok else 'FAILED'}* run "
             f"`{run_id}` to {report['at']}" + (" (PARTIAL)" if report["partial"] else ""),
             f"• RTO {_duration(report['rto']['measured_s'])} (extrapolated {_duration(report['rto']['extrapolated_s'])},"
             f" tightest target {_duration(report['rto']['target_s'])}); skew {_duration(report['skew']['seconds'])}",
             f"• reference gaps: {gaps}; unexplained by capture times: {refs.get('unexplained', refs.get('status'))}"]
    lines += [f"• {name}: {why}" for name, why in report["missing"].items()]
    lines += [f"• {name} failed: {s['error'] or '; '.join(s['problems'][:3])}" for name, s in report["services"].items()
              if s["status"] != "restored" or s["problems"]]
    return "\n".join(lines)


def finish(plan: Plan, run_id: str, *, offsite: Any = None, notify: bool = True) -> dict[str, Any]:
    """Ledger (local and offsite) and one Slack summary. Returns {status, report, slack_sent}."""
    from erp_backup.drill.choose import offsite_store
    from erp_backup.drill.report import append_ledger
    from erp_backup.notify import send

    report = read_report(plan, run_id)
    error_path = runs_dir(plan, run_id) / "error.txt"
    error = error_path.read_text() if error_path.is_file() else None
    result: dict[str, Any] = {"status": "failed" if report is None or report["partial"] else report["status"],
                              "error": error}
    if report is not None:
        try:
            result["ledger"] = append_ledger(plan, ledger_lines(report), offsite_store(plan, offsite))
        except Exception as exc:
            log.warning("estate drill: offsite ledger not updated (%s); local only", exc)
            result["ledger"] = append_ledger(plan, ledger_lines(report))
        result["report"] = str(runs_dir(plan, run_id) / "report.md")
        log.info("estate drill %s:\n%s", run_id, render_markdown(report))
    result["slack_sent"] = send(plan.slack_conn_id, slack_text(report, error, run_id)) if notify else False
    return result
