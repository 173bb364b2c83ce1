"""The estate recovery's report: sets and capture times, skew, restore times, RTO, reference gaps (JSON and Markdown).

RTO: the measured total is the recovery's wall time (layers in order, each layer's services
in parallel). Extrapolated: each service's time × its production size / restored size, as
the drill does; the total is the sum over layers of the slowest service in each. It is
compared with the tightest RTO target of the services recovered.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from erp_backup.drill.report import _duration
from erp_backup.estate.choose import EstatePlanOfSets
from erp_backup.estate.recover import EstateRecovery, ServiceRun
from erp_backup.plan import Plan

RTO_FORMULA = ("total RTO = wall time of the recovery (layers in dependency order, services of a layer in parallel); "
               "extrapolated = Σ over layers of max(service time × production bytes / restored bytes)")


def _scale(run: ServiceRun) -> float:
    restored = run.chosen.sets[0].size_measure if run.chosen.pitr else sum(s.size_measure for s in run.chosen.sets)
    return run.chosen.production_bytes / restored if restored and run.chosen.production_bytes else 1.0


def _rto_target(plan: Plan, run: ServiceRun) -> float:
    return min(plan.job(run.service, s.backup_type).rto.total_seconds() for s in run.chosen.sets)


def _service(plan: Plan, run: ServiceRun, at: datetime) -> dict[str, Any]:
    total = run.seconds.get("total")
    scale = _scale(run)
    details = (run.reports.get(run.chosen.sets[0].backup_type) or {}).get("details") or {}
    return {**run.as_dict(), "lag_behind_at_s": round((at - run.chosen.captured_at).total_seconds(), 3),
            "last_replayed_commit": details.get("last_replayed_commit") if run.chosen.pitr else None,
            "scale": round(scale, 4), "extrapolated_s": round(total * scale, 3) if total is not None else None,
            "rto_target_s": _rto_target(plan, run)}


def build_report(plan: Plan, run_id: str, sets: EstatePlanOfSets, recovery: EstateRecovery,
                 references: Mapping[str, Any], finished: datetime) -> dict[str, Any]:
    services = {name: _service(plan, run, sets.at) for name, run in recovery.runs.items()}
    captured = {name: datetime.fromisoformat(s["captured_at"]) for name, s in services.items()}
    skew = (max(captured.values()) - min(captured.values())).total_seconds() if captured else 0.0
    extrapolated = sum(max((services[n]["extrapolated_s"] or 0.0) for n in layer) for layer in recovery.layers)
    target = min((s["rto_target_s"] for s in services.values()), default=None)
    failed = sorted(n for n, s in services.items() if s["status"] != "restored" or s["problems"])
    unexplained = int(references.get("unexplained") or 0)
    status = "failed" if failed or unexplained or references.get("status") not in ("checked", "not configured") else "passed"
    return {
        "run_id": run_id, "at": sets.at.isoformat(), "finished": finished.isoformat(), "status": status,
        "partial": sets.partial, "missing": dict(sets.missing), "failed": failed, "services": services,
        "order": recovery.layers,
        "skew": {"seconds": round(skew, 3),
                 "oldest": min(captured, key=lambda n: captured[n]) if captured else None,
                 "newest": max(captured, key=lambda n: captured[n]) if captured else None},
        "rto": {"measured_s": recovery.wall_seconds, "extrapolated_s": round(extrapolated, 3), "target_s": target,
                "within_target": (extrapolated <= target) if target else None, "formula": RTO_FORMULA},
        "references": dict(references),
    }


def _set_names(service: Mapping[str, Any]) -> str:
    return ", ".join(f"{s['backup_type']}/{s['backup_id']}" for s in service["sets"])


def _gap_lines(references: Mapping[str, Any]) -> list[str]:
    if references.get("status") != "checked":
        return [f"Reference checks: {references.get('status')} ({references.get('why', '')})"]
    lines = [f"Reference checks: {references['documents']} documents, {references['objects']} objects, "
             f"{references['vectors']} vectors; {references['unexplained']} gap(s) the capture times do not explain.", "",
             "| Direction | Count | Explained by capture times | Sample |", "|---|---|---|---|"]
    for gap in references["gaps"]:
        explained = "n/a" if gap["explained"] is None else f"{gap['explained']}/{gap['count']}"
        lines.append(f"| {gap['name']} | {gap['count']} | {explained} | {'; '.join(gap['sample']) or '–'} |")
    lines.append("")
    lines += [f"- {gap['name']}: {gap['explanation']}" for gap in references["gaps"] if gap["count"]]
    return lines


def render_markdown(report: Mapping[str, Any]) -> str:
    rto = report["rto"]
    lines = [f"# Estate recovery {report['run_id']}: {report['status'].upper()}" + (" (PARTIAL)" if report["partial"] else ""),
             "", f"- Recovered to: {report['at']}", f"- Finished: {report['finished']}",
             f"- Order: {' → '.join('[' + ', '.join(layer) + ']' for layer in report['order'])}",
             f"- Skew between services: {_duration(report['skew']['seconds'])} "
             f"(oldest {report['skew']['oldest']}, newest {report['skew']['newest']})",
             f"- RTO: measured {_duration(rto['measured_s'])}, extrapolated {_duration(rto['extrapolated_s'])}, "
             f"tightest target {_duration(rto['target_s'])}: {'within' if rto['within_target'] else 'NOT within'}"]
    lines += [f"- Not recovered: {name}: {why}" for name, why in report["missing"].items()]
    lines += ["", "| Service | Sets | Captured | Behind T | Status | Backend | Fetch | Start | Restore | Total | Extrapolated "
              "| RTO target |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in report["services"].items():
        sec = s["seconds"]
        captured = s["captured_at"] + (f" (last commit {s['last_replayed_commit']})" if s["last_replayed_commit"] else "")
        lines.append(f"| {name} | {_set_names(s)} | {captured} | {_duration(s['lag_behind_at_s'])} | {s['status']} | {s.get('backend', 'local')} | "
                     f"{_duration(sec.get('fetch'))} | {_duration(sec.get('start'))} | {_duration(sec.get('restore'))} | "
                     f"{_duration(sec.get('total'))} | {_duration(s['extrapolated_s'])} | {_duration(s['rto_target_s'])} |")
    notes = [f"- {name}: {s['backend_note']}" for name, s in report["services"].items() if s.get("backend_note")]
    if notes:
        lines += ["", "Kept on the local backend:", *notes]
    problems = [f"- {name}: {s['error'] or '; '.join(s['problems'][:5])}" for name, s in report["services"].items()
                if s["error"] or s["problems"]]
    if problems:
        lines += ["", "Problems:", *problems]
    lines += ["", *_gap_lines(report["references"])]
    return "\n".join(lines) + "\n"
