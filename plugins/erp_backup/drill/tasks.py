"""Glue between the dr_drill DAG's tasks and the drill's plain functions (run identity, fail-fast errors)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from erp_backup.runs import RunInfo

T = TypeVar("T")


def run_info(context: Mapping[str, Any]) -> RunInfo:
    """The run id and moment (logical date; run_after for a manual run without one)."""
    return RunInfo.from_context(context)


def fail_fast(call: Callable[[], T]) -> T:
    """Run a step; failures that a retry cannot fix (bad params, a missing connection, a broken plan,
    checksum or content mismatches, a production endpoint as target) fail the task at once instead
    of being retried (erp_backup.fail_fast)."""
    from erp_backup import fail_fast as failing
    from erp_backup.checksum import ChecksumMismatch
    from erp_backup.drill.model import DrillFailed
    from erp_backup.drill.targets import ProductionTargetRefused

    return failing.fail_fast(call, also=(DrillFailed, ChecksumMismatch, ProductionTargetRefused))


def report_or_fail(run_id: str) -> dict[str, Any]:
    """Write the report, ledger and Slack summary; fail the task (and the run) if any set failed."""
    from airflow.sdk.exceptions import AirflowFailException

    from erp_backup.drill.report import finish
    from erp_backup.plan import load_plan

    result = finish(load_plan(), run_id)
    if result["status"] != "passed":
        failed = [f"{r['service']} at {r.get('failed_step')}: {r.get('error')}" for r in result["services"]
                  if r["status"] not in ("passed", "prepared")]
        raise AirflowFailException(
            f"DR drill failed: {result.get('error') or '; '.join(failed)} (report {result['report_files']['markdown']})"
        )
    return {"status": result["status"], "report": result["report_files"]["markdown"]}
