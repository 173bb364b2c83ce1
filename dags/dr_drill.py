"""DR drill: restore random backup sets into scratch targets, verify and time them (erp_backup.drill)."""

from __future__ import annotations

from airflow.sdk import CronTriggerTimetable, TriggerRule, dag, get_current_context, task, task_group

from erp_backup.drill import DAG_ID, render_doc
from erp_backup.drill.params import drill_params
from erp_backup.drill.tasks import REPORT_TASK, drill_default_args, fail_fast, report_or_fail, run_info
from erp_backup.factory import DRILL_QUEUE, START_DATE, default_args
from erp_backup.plan import load_plan
from erp_backup.plan_alert import alert_plan_errors

PLAN = load_plan()


@dag(
    dag_id=DAG_ID,
    description="Weekly DR drill: random complete sets restored into scratch targets, verified, timed",
    schedule=CronTriggerTimetable(PLAN.drill.schedule, timezone=PLAN.drill.timezone),
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    tags=["drill", "dr"],
    doc_md=render_doc(PLAN),
    default_args=drill_default_args(default_args(PLAN, queue=DRILL_QUEUE), PLAN.slack_conn_id),
    params=drill_params(PLAN),
)
def dr_drill():
    from erp_backup.drill import runner

    @task(task_id="pick")
    def pick() -> list[dict]:
        context = get_current_context()
        fail_fast(lambda: alert_plan_errors(load_plan(), DAG_ID))
        return fail_fast(lambda: runner.pick(load_plan(), context["params"], run_info(context)))

    @task(task_id="clean_leftovers")
    def clean_leftovers() -> list[str]:
        context = get_current_context()
        return runner.clean_leftovers(load_plan(), context["dag_run"].run_id, context["params"]["backend"])

    @task(task_id="start_target")
    def start_target(chosen: dict) -> dict:
        return fail_fast(lambda: runner.start_target(load_plan(), chosen))

    @task(task_id="fetch")
    def fetch(chosen: dict) -> dict:
        return fail_fast(lambda: runner.fetch(load_plan(), chosen))

    @task(task_id="restore")
    def restore(chosen: dict) -> dict:
        return fail_fast(lambda: runner.restore(load_plan(), chosen))

    @task(task_id="verify")
    def verify(chosen: dict) -> dict:
        return fail_fast(lambda: runner.verify(load_plan(), chosen))

    @task(task_id="teardown")
    def teardown(chosen: dict) -> dict:
        return runner.teardown(load_plan(), chosen)

    @task_group(group_id="drill")
    def drill(chosen: dict) -> None:
        target = start_target(chosen)
        removed = teardown(chosen)
        # TaskFlow returns XComArgs; Airflow's stubs do not say they carry .operator and accept setups=
        [target, fetch(chosen)] >> restore(chosen) >> verify(chosen) >> removed.as_teardown(setups=target)  # type: ignore[arg-type]
        removed.operator.trigger_rule = TriggerRule.ALL_DONE  # type: ignore[attr-defined]  # also after a failed setup

    @task(task_id=REPORT_TASK, trigger_rule=TriggerRule.ALL_DONE)
    def report() -> dict:
        return report_or_fail(get_current_context()["dag_run"].run_id)

    picks = pick()
    drills = drill.expand(chosen=picks)
    reported = report()
    picks >> clean_leftovers() >> drills >> reported
    drills.children["drill.teardown"] >> reported  # type: ignore[attr-defined]  # the report records what teardown removed


dr_drill()
