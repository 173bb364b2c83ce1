"""Glue between the dr_drill DAG's tasks and the drill's plain functions (run identity, fail-fast errors)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from airflow.sdk.exceptions import AirflowFailException

from erp_backup.notify import FailureAlert
from erp_backup.runs import RunInfo

T = TypeVar("T")
REPORT_TASK = "report"


class DrillReported(Exception):
    """Marks the report task's failure after it posted the run's summary (the run's one alert)."""


class DrillFailureAlert(FailureAlert):
    """The drill's failure callback: one alert per failed run.

    The `report` task always runs (ALL_DONE) and posts the run's summary, failures included, so
    a failed step posts nothing itself. The report task alerts only when it failed without
    posting that summary (it crashed, or Slack refused the summary).
    """

    def __call__(self, context: dict[str, Any]) -> None:
        ti = context.get("ti") or context.get("task_instance")
        if getattr(ti, "task_id", None) != REPORT_TASK or isinstance(context.get("exception"), DrillReported):
            return
        super().__call__(context)


def drill_default_args(base: dict[str, Any], slack_conn_id: str) -> dict[str, Any]:
    return {**base, "on_failure_callback": DrillFailureAlert(slack_conn_id)}


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


class DrillFailedAndReported(DrillReported, AirflowFailException):
    """The drill failed and its summary was posted: fail the run, with no further alert and no retry."""


def report_or_fail(run_id: str) -> dict[str, Any]:
    """Write the report, ledger and Slack summary; fail the task (and the run) if any set failed."""
    from erp_backup.drill import DAG_ID
    from erp_backup.drill.report import FAILED, HEADLINES, finish
    from erp_backup.drill.run_note import note_markdown, set_note
    from erp_backup.plan import load_plan

    result = finish(load_plan(), run_id)
    set_note(DAG_ID, run_id, note_markdown(result, HEADLINES.get(result["status"], result["status"])))
    if result["status"] == FAILED:
        failed = [f"{r['service']} at {r.get('failed_step')}: {r.get('error')}" for r in result["services"]
                  if r["status"] == FAILED]
        message = (f"DR drill failed: {result.get('error') or '; '.join(failed)} "
                   f"(report {result['report_files']['markdown']})")
        raise (DrillFailedAndReported if result.get("slack_sent") else AirflowFailException)(message)
    return {"status": result["status"], "report": result["report_files"]["markdown"]}
