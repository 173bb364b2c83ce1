"""The drill report (JSON + Markdown), the drill ledger, and the Slack summary.

RTO, per drilled set:

- measured RTO = fetch + restore + verify seconds (starting the scratch target and
  teardown are not part of a recovery's critical path here and are reported apart);
- extrapolated RTO = measured RTO × production bytes / drilled bytes, where both
  sizes use the same measure from the manifests: the source size in the details
  (`source_bytes`, `database_bytes`, `raw_bytes` or `rdb_bytes`, the first present),
  else the set size; "production" is the newest complete set of the same service
  and type. Linear in size, fixed start-up costs included, so it errs high for
  small sets. When the drilled set is the newest, both RTOs are equal.

The ledger (`$BACKUP_ROOT/drills/ledger.jsonl`, one line per drilled set, and
`drills/ledger.jsonl` offsite) is append-only; a rerun of the report step does
not add a run's lines twice.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from erp_backup.drill import ledger
from erp_backup.drill.choose import offsite_store
from erp_backup.drill.ledger import DrillLedgerEntry
from erp_backup.drill.records import (
    LEDGER_KEY,
    ServiceState,
    ledger_path,
    read_json,
    run_dir,
    work_dir,
    write_json,
)
from erp_backup.manifest import write_atomic
from erp_backup.plan import Plan
from erp_backup.runs import utcnow

log = logging.getLogger(__name__)

PASSED, FAILED, SKIPPED, NOTHING_YET = "passed", "failed", "skipped", "no_backups_yet"
DRILLED = frozenset({PASSED, "prepared"})
STEPS = ("start_target", "fetch", "restore", "verify", "teardown")
RTO_STEPS = ("fetch", "restore", "verify")
RTO_FORMULA = (
    "measured RTO = fetch + restore + verify; extrapolated RTO = measured RTO × production bytes / drilled bytes "
    "(same size measure from both manifests: details source_bytes/database_bytes/raw_bytes/rdb_bytes, else set size; "
    "production = newest complete set of the same service and type)"
)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _size(value: int | None) -> str:
    if value is None:
        return "–"
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= factor:
            return f"{value / factor:.2f} {unit}"
    return f"{value} B"


def _outcome(steps: Mapping[str, dict[str, Any] | None]) -> tuple[str, str | None, str | None]:
    """(status, the step that failed, its error) from the step records."""
    failed = next((name for name in STEPS[:-1] if (steps[name] or {}).get("status") == "failed"), None)
    not_run = next((name for name in STEPS[:-1] if steps[name] is None), None)
    verify = steps["verify"] or {}
    if failed:
        status = "failed"
    elif not_run or verify.get("status") not in ("ok", "prepared"):
        status, failed = "failed", not_run or "verify"
    else:
        status = "prepared" if verify.get("status") == "prepared" else "passed"
    error = (steps[failed] or {}).get("error") if failed else None
    if failed and error is None:
        error = f"{failed} did not run (an earlier step failed or was skipped)"
    return status, failed, error


def _measured(durations: Mapping[str, Any], status: str) -> tuple[float | None, float | None]:
    """(measured RTO, prepare time): fetch + restore + verify; a set only prepared has no RTO."""
    values = [durations.get(name) for name in RTO_STEPS]
    if status == "failed" or not all(isinstance(value, int | float) for value in values):
        return None, None
    elapsed = round(sum(float(value) for value in values if value is not None), 3)
    return (None, elapsed) if status == "prepared" else (elapsed, None)


def _rto(pick: Mapping[str, Any], measured: float | None, prepare: float | None) -> dict[str, Any]:
    """The measured RTO, extrapolated to the production size, against the plan's target."""
    drilled_bytes = int((pick.get("size_measure") or {}).get("bytes") or pick.get("set_bytes") or 0)
    production_bytes = int((pick.get("production") or {}).get("bytes") or drilled_bytes)
    scale = production_bytes / drilled_bytes if drilled_bytes else 1.0
    extrapolated = round(measured * scale, 3) if measured is not None else None
    target = float(pick.get("rto_target_s") or 0) or None
    return {
        "measured_s": measured,
        "target_s": target,
        "extrapolated_s": extrapolated,
        "scale": round(scale, 4),
        "within_target": (extrapolated <= target) if (extrapolated is not None and target) else None,
        "formula": RTO_FORMULA,
        **({"prepare_s": prepare, "note": "not restored here, so no RTO was measured"} if prepare is not None else {}),
    }


def service_result(plan: Plan, pick: Mapping[str, Any]) -> dict[str, Any]:
    """One drilled set: what happened in each step, timings, throughput and RTO."""
    from erp_backup.drill.pitr_pick import rpo_of, slot  # a point-in-time pick records under its own slot

    state = ServiceState(plan, pick["run_id"], slot(pick))
    steps = {name: state.read(name) for name in STEPS}
    durations = {name: (record or {}).get("seconds") for name, record in steps.items()}
    status, failed, error = _outcome(steps)
    measured, prepare = _measured(durations, status)
    fetch, restore, verify = steps["fetch"] or {}, steps["restore"] or {}, steps["verify"] or {}
    restored = (restore.get("report") or {}).get("details") or {}
    return {
        "service": pick["service"],
        "backup_type": pick["backup_type"],
        "backup_id": pick["backup_id"],
        "captured_at": pick.get("captured_at"),
        "pitr": pick.get("pitr"),
        "source": pick.get("source"),
        "source_description": pick.get("source_description"),
        "backend": pick.get("backend"),
        "target": (steps["start_target"] or {}).get("target"),
        "status": status,
        "failed_step": failed,
        "error": error,
        "seed": pick.get("seed"),
        "choice": pick.get("choice"),
        "sizes": {
            "set_bytes": pick.get("set_bytes"),
            "files": pick.get("files"),
            "fetched_bytes": fetch.get("bytes"),
            "restored_bytes": restore.get("restored_bytes"),
            "size_measure": pick.get("size_measure"),
            "production": pick.get("production"),
        },
        "durations_s": durations,
        "throughput_mb_s": {"fetch": fetch.get("mb_per_s"), "restore": restore.get("mb_per_s")},
        "rto": _rto(pick, measured, prepare),
        "checks": verify.get("checks") or [],
        "problems": verify.get("problems") or [],
        "restore_summary": {k: restored[k] for k in ("tables_checked", "rows_checked", "keys_restored",
                                                     "runbook_command_text", "replay_mb_per_s", "wal_bytes_replayed")
                            if k in restored},
        "teardown": (steps["teardown"] or {}).get("done"),
        "rpo": rpo_of(pick, restored, (steps["restore"] or {}).get("finished_at")),
    }


def _problem_result(problem: Mapping[str, Any]) -> dict[str, Any]:
    """A service the pick could not drill: skipped if it has no backup at all yet, else failed at pick."""
    skipped = bool(problem.get("never_backed_up"))
    return {"service": problem["service"], "status": SKIPPED if skipped else FAILED,
            "failed_step": None if skipped else "pick", "error": problem["error"], "backup_type": None, "backup_id": None}


def overall_status(results: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(run status, error): failed if any set failed; no backups yet if every service was skipped for that."""
    if any(r["status"] == FAILED for r in results):
        return FAILED, None
    if any(r["status"] in DRILLED for r in results):
        return PASSED, None
    if results:
        return NOTHING_YET, None
    return FAILED, "nothing was drilled"


def build_report(plan: Plan, run_id: str) -> dict[str, Any]:
    pick_record = read_json(run_dir(plan, run_id) / "pick.json") or {}
    results = [service_result(plan, pick) for pick in pick_record.get("picks") or []]
    results += [_problem_result(problem) for problem in pick_record.get("problems") or []]
    if pick_record.get("status") != "ok":
        status, error = FAILED, pick_record.get("error") or "the pick step did not run"
    else:
        status, error = overall_status(results)
    return {
        "run_id": run_id,
        "status": status,
        "error": error,
        "finished_at": utcnow().isoformat(),
        "request": pick_record.get("request") or {"params": pick_record.get("params")},
        "plan": str(plan.path),
        "services": results,
    }


def set_name(result: Mapping[str, Any]) -> str:
    """`<type>/<id>` of a result, or "no set" when none was picked (never "None/None")."""
    if result.get("backup_type") and result.get("backup_id"):
        return f"{result['backup_type']}/{result['backup_id']}"
    return "no set"


def _or_dash(value: Any) -> str:
    return "–" if value is None or value == "" else str(value)


HEADLINES = {PASSED: "PASSED", FAILED: "FAILED", NOTHING_YET: "nothing to drill yet (no backups exist)"}


def render_markdown(report: Mapping[str, Any]) -> str:
    request = report.get("request") or {}
    lines = [
        f"# DR drill {report['run_id']}: {HEADLINES.get(report['status'], report['status'])}",
        "",
        f"- Finished: {report['finished_at']}",
        f"- Request: service `{_or_dash(request.get('service'))}`, source `{_or_dash(request.get('source'))}`, "
        f"backend `{_or_dash(request.get('backend'))}`, seed {_or_dash(request.get('seed'))} "
        f"(from {_or_dash(request.get('seed_from'))}), keep_scratch {_or_dash(request.get('keep_scratch'))}"
        + (f", target_time {request['target_time']}" if request.get("target_time") else ""),
    ]
    if report.get("error"):
        lines.append(f"- Error: {report['error']}")
    lines += ["", "| Service | Set | Status | Fetch | Restore | Verify | Measured RTO | Extrapolated RTO | RTO target |",
              "|---|---|---|---|---|---|---|---|---|"]
    for result in report["services"]:
        durations = result.get("durations_s") or {}
        rto = result.get("rto") or {}
        status = result["status"] + (f" at {result['failed_step']}" if result.get("failed_step") else "")
        lines.append(
            f"| {result['service']} | {set_name(result)} | {status} | "
            f"{_duration(durations.get('fetch'))} | {_duration(durations.get('restore'))} | {_duration(durations.get('verify'))} | "
            f"{_duration(rto.get('measured_s'))} | {_duration(rto.get('extrapolated_s'))} | {_duration(rto.get('target_s'))} |"
        )
    for result in report["services"]:
        lines += _service_section(result)
    lines += ["", f"RTO formula: {RTO_FORMULA}.", ""]
    return "\n".join(lines)


def _service_section(result: Mapping[str, Any]) -> list[str]:
    """One drilled set's section: failure, origin and sizes, steps and RTO, PITR, checks, teardown."""
    lines = ["", f"## {result['service']} {set_name(result)}: {result['status']}", ""]
    if result.get("status") == SKIPPED:
        lines.append(f"- Not drilled: {result.get('error')}")
    elif result.get("error"):
        lines.append(f"- **Failed at {result.get('failed_step')}**: {result['error']}")
    if result.get("status") == "prepared":
        lines.append("- **Prepared, not restored**: the files were fetched, verified and placed for the restore "
                     "runbook; the service itself was not restored in this drill.")
    if result.get("source_description"):
        lines += _origin_lines(result) + _timing_lines(result)
    if result.get("pitr"):
        pitr = result["pitr"]
        replayed = ", ".join("/".join(item) for item in pitr.get("sets") or []) or "none"
        lines.append(f"- PITR: target {pitr.get('target_time')}, base {set_name(result)}, replayed {replayed}")
    lines += [f"- ✓ {check}" for check in result.get("checks") or []]
    lines += [f"- ✗ {problem}" for problem in result.get("problems") or []]
    from erp_backup.drill.pitr_pick import rpo_lines  # the achieved RPO of a point-in-time pick

    lines += rpo_lines(result.get("rpo"))
    if result.get("teardown"):
        lines.append("- Teardown: " + "; ".join(result["teardown"]))
    return lines


def _origin_lines(result: Mapping[str, Any]) -> list[str]:
    sizes = result.get("sizes") or {}
    choice = result.get("choice") or {}
    measure, production = sizes.get("size_measure") or {}, sizes.get("production") or {}
    return [
        f"- From: {result['source']} ({result['source_description']}), captured {_or_dash(result.get('captured_at'))}",
        f"- Picked: probability {_or_dash(choice.get('probability'))} among {_or_dash(choice.get('candidates'))} sets "
        f"(last drilled: {choice.get('last_drilled') or 'never'}), seed {_or_dash(result.get('seed'))}",
        f"- Target: {_or_dash(result.get('target'))}",
        f"- Size: {_size(sizes.get('set_bytes'))} in {_or_dash(sizes.get('files'))} files; restored "
        f"{_size(sizes.get('restored_bytes'))}; size measure {_size(measure.get('bytes'))} "
        f"({_or_dash(measure.get('from'))}); production (newest set {_or_dash(production.get('backup_id'))}) "
        f"{_size(production.get('bytes'))}",
    ]


def _timing_lines(result: Mapping[str, Any]) -> list[str]:
    durations = result.get("durations_s") or {}
    throughput = result.get("throughput_mb_s") or {}
    rto = result.get("rto") or {}
    lines = ["- Steps: " + ", ".join(f"{name} {_duration(durations.get(name))}" for name in STEPS),
             f"- Throughput: fetch {_or_dash(throughput.get('fetch'))} MB/s, restore {_or_dash(throughput.get('restore'))} MB/s"]
    if rto.get("note"):
        lines.append(f"- RTO: {rto['note']}; fetch, checks and preparing the runbook files took "
                     f"{_duration(rto.get('prepare_s'))} (target {_duration(rto.get('target_s'))})")
    else:
        verdict = {True: "within", False: "OVER", None: "not measured against"}[rto.get("within_target")]
        lines.append(f"- RTO: measured {_duration(rto.get('measured_s'))}, extrapolated {_duration(rto.get('extrapolated_s'))} "
                     f"(× {_or_dash(rto.get('scale'))}), {verdict} the target {_duration(rto.get('target_s'))}")
    return lines


_SLACK_HEADS = {
    PASSED: ":white_check_mark: *DR drill passed*",
    FAILED: ":red_circle: *DR drill FAILED*",
    NOTHING_YET: ":information_source: *DR drill: nothing to drill yet*, no backup exists so far",
}


def slack_text(report: Mapping[str, Any]) -> str:
    lines = [f"{_SLACK_HEADS.get(report['status'], report['status'])} run `{report['run_id']}`"]
    if report.get("error"):
        lines.append(f"error: {report['error']}")
    for result in report["services"]:
        rto = result.get("rto") or {}
        where = result["service"] + (f" {set_name(result)}" if result.get("backup_id") else "")
        if result["status"] == SKIPPED:
            lines.append(f"• {where}: not drilled, {result.get('error')}")
        elif result["status"] == "prepared":
            lines.append(f"• {where}: prepared (fetched, checksums verified, files placed for the runbook; not restored)")
        elif result["status"] == PASSED:
            lines.append(
                f"• {where}: passed from {_or_dash(result.get('source'))}, RTO {_duration(rto.get('measured_s'))} "
                f"(extrapolated {_duration(rto.get('extrapolated_s'))}, target {_duration(rto.get('target_s'))})"
            )
        else:
            lines.append(f"• {where}: failed at {_or_dash(result.get('failed_step'))}: {_or_dash(result.get('error'))}")
    if report.get("links"):
        lines.append(f"<{report['links']['run']}|The run and its report> · <{report['links']['backups']}|Backups page>")
    return "\n".join(lines)


def ledger_lines(report: Mapping[str, Any]) -> list[DrillLedgerEntry]:
    """One entry per service of the report, a service whose set could not be picked included."""
    lines = []
    for result in report["services"]:
        rto = result.get("rto") or {}
        captured = result.get("captured_at")
        lines.append(DrillLedgerEntry(
            run_id=report["run_id"],
            finished_at=datetime.fromisoformat(report["finished_at"]),
            service=result["service"],
            status=result["status"],
            backup_type=result.get("backup_type"),
            backup_id=result.get("backup_id"),
            captured_at=datetime.fromisoformat(captured) if captured else None,
            failed_step=result.get("failed_step"),
            error=result.get("error"),
            source=result.get("source"),
            backend=result.get("backend"),
            seed=result.get("seed"),
            rto_measured_s=rto.get("measured_s"),
            rto_extrapolated_s=rto.get("extrapolated_s"),
            rto_target_s=rto.get("target_s"),
        ))
    return lines


def append_ledger(plan: Plan, lines: list[DrillLedgerEntry], offsite: Any = None) -> dict[str, Any]:
    """Append to the local ledger, then to the offsite one (fetched first, so other workers' lines stay)."""
    local = ledger_path(plan)
    result: dict[str, Any] = {"local": str(local), "local_added": ledger.append(local, lines)}
    if offsite is not None:
        scratch = work_dir(plan, "ledger-write") / "ledger.jsonl"
        try:
            scratch.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            existing = scratch.read_text() if offsite.get_file(LEDGER_KEY, scratch) else ""
            merged, added_offsite = ledger.merge(existing, lines)
            write_atomic(scratch, merged.encode())
            offsite.put_file(LEDGER_KEY, scratch)
            result.update(offsite=f"{offsite.description}/{LEDGER_KEY}", offsite_added=added_offsite)
        finally:
            shutil.rmtree(scratch.parent, ignore_errors=True)
    return result


def finish(plan: Plan, run_id: str, *, offsite: Any = None, notify: bool = True, ui_base: str | None = None) -> dict[str, Any]:
    """Write report.json and report.md, append the ledger (local and offsite), post the Slack summary.

    Returns the report; the caller fails the run when `report["status"]` is not "passed".
    A broken offsite store or Slack does not hide the drill's result: both are recorded in the report.
    """
    from erp_backup.drill import DAG_ID
    from erp_backup.drill.run_note import base_url, links
    from erp_backup.notify import send

    report = build_report(plan, run_id)
    report["links"] = links(ui_base or base_url(), DAG_ID, run_id)
    directory = run_dir(plan, run_id)
    store = None
    try:
        store = offsite_store(plan, offsite)
    except Exception as exc:
        report.setdefault("warnings", []).append(f"offsite store unavailable for the ledger: {exc}")
    try:
        report["ledger"] = append_ledger(plan, ledger_lines(report), store)
    except Exception as exc:
        report.setdefault("warnings", []).append(f"offsite ledger not updated: {exc}")
        report["ledger"] = {"local": str(ledger_path(plan))}
    markdown = render_markdown(report)
    write_json(directory / "report.json", report)
    write_atomic(directory / "report.md", markdown.encode())
    if store is not None:
        try:
            store.put_file(f"drills/runs/{directory.name}/report.md", directory / "report.md")
            store.put_file(f"drills/runs/{directory.name}/report.json", directory / "report.json")
        except Exception as exc:
            log.warning("drill report not copied offsite: %s", exc)
    report["report_files"] = {"json": str(directory / "report.json"), "markdown": str(directory / "report.md")}
    if notify:
        report["slack_sent"] = send(plan.slack_conn_id, slack_text(report))
    write_json(directory / "report.json", report)
    log.info("DR drill %s %s; report %s\n%s", run_id, report["status"], directory / "report.md", markdown)
    return report
