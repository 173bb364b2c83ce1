"""Monthly estate drill: recover every service to one random point in time and check cross-service references (erp_backup.estate)."""

from __future__ import annotations

from airflow.sdk import CronTriggerTimetable, Param, TriggerRule, dag, get_current_context, task

from erp_backup.estate import DAG_ID
from erp_backup.estate.drill import render_doc
from erp_backup.factory import DRILL_QUEUE, START_DATE, default_args
from erp_backup.plan import load_plan

PLAN = load_plan()


@dag(
    dag_id=DAG_ID,
    description="Monthly estate drill: every service recovered to one random time T, references checked",
    schedule=CronTriggerTimetable(PLAN.estate.schedule, timezone=PLAN.estate.timezone) if PLAN.estate else None,
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    tags=["drill", "dr", "estate"],
    doc_md=render_doc(PLAN),
    default_args=default_args(PLAN, queue=DRILL_QUEUE),
    params={"at": Param("", type="string", description="Recover to this ISO time with offset "
                                                        "(2026-11-26T10:15:00+09:00); empty: random in the window"),
            "backend": Param(PLAN.drill.backend, type="string", enum=["local", "docker"],
                             description="Where the scratch targets run. Default from the plan (drill.backend); with "
                                         "docker, services that cannot run in a container stay local (the report says why).")},
)
def dr_estate_drill():
    from erp_backup.drill.tasks import fail_fast, run_info
    from erp_backup.estate import drill

    @task(task_id="choose")
    def choose() -> dict:
        context = get_current_context()
        return fail_fast(lambda: drill.choose(load_plan(), run_info(context), context["params"]["at"] or None))

    @task(task_id="recover")
    def recover(chosen: dict) -> dict:
        context = get_current_context()
        return drill.recover(load_plan(), context["dag_run"].run_id, chosen["at"], backend=context["params"]["backend"])

    @task(task_id="teardown")
    def teardown() -> list[str]:
        from erp_backup.estate.run import teardown_phase

        context = get_current_context()
        return teardown_phase(load_plan(), context["dag_run"].run_id, backend=context["params"]["backend"])

    @task(task_id="report", trigger_rule=TriggerRule.ALL_DONE)
    def report() -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        result = drill.finish(load_plan(), get_current_context()["dag_run"].run_id)
        if result["status"] != "passed":
            raise AirflowFailException(f"estate drill failed: {result.get('error') or result.get('report')}")
        return result

    recovered = recover(choose())  # type: ignore[arg-type]  # an XComArg resolves to the dict at run time
    removed = teardown()
    # TaskFlow returns XComArgs; Airflow's stubs do not say they carry .operator and accept setups=
    recovered >> removed.as_teardown(setups=recovered) >> report()  # type: ignore[arg-type]
    removed.operator.trigger_rule = TriggerRule.ALL_DONE  # type: ignore[attr-defined]


dr_estate_drill()
