"""Helpers to run a project DAG end to end with `dag.test()` against real services."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from erp_backup.plan import DEFAULT_PLAN_PATH


def write_plan(plan_path: Path, /, edit=None, **offsite: Any) -> Path:
    """A copy of the committed plan with offsite settings (and any other edit) changed."""
    data = yaml.safe_load(DEFAULT_PLAN_PATH.read_text())
    data["offsite"].update(offsite)
    if edit:
        edit(data)
    plan_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return plan_path


def run_dag(dagbag, dag_id: str, logical_date: datetime, *, retries: int | None = 0, conf: dict | None = None):
    """Run a DAG once in-process; returns (dag_run, {task_id: state}).

    `dag.test()` honours retry delays, so failure tests run with retries=0; the
    retry policy itself is asserted by tests/dags.
    """
    dag = dagbag.dags[dag_id]
    original = {task.task_id: task.retries for task in dag.tasks}
    try:
        if retries is not None:
            for task in dag.tasks:
                task.retries = retries
        dag_run = dag.test(logical_date=logical_date, run_conf=conf)
    finally:
        for task in dag.tasks:  # the DagBag is shared: leave the DAG as parsed
            task.retries = original[task.task_id]
    states = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    return dag_run, states
