"""The drill ledger's one schema, the report's messages (no `None`, quiet first start) and one alert per failed drill."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from erp_backup.drill import ledger
from erp_backup.drill import report as drill_report
from erp_backup.drill.records import ServiceState, run_dir, write_json
from erp_backup.drill.tasks import DrillFailedAndReported, DrillFailureAlert
from tests.fixtures.factories import drill_entry
from tests.unit.test_drill_pick import plan_with

NOW = datetime(2026, 11, 29, 21, 0, tzinfo=UTC)
NONE_WORD = re.compile(r"\bNone\b")


def test_entries_round_trip_through_the_file_the_writer_appends(tmp_path: Path) -> None:
    entries = [
        drill_entry("postgres", backup_type="full", backup_id="20261120T170000Z", captured_at=NOW,
                    rto_measured_s=80.0, rto_extrapolated_s=200.0, rto_target_s=7200.0),
        drill_entry("redis", "failed", failed_step="pick", error="no complete redis set"),
    ]
    path = tmp_path / "drills/ledger.jsonl"
    assert ledger.append(path, entries) == 2 and ledger.append(path, entries) == 0

    assert ledger.parse(path.read_text()) == entries
    assert (entries[0].rto_met, entries[1].rto_met) == (True, None)
    assert (entries[0].set_name, entries[1].set_name) == ("full/20261120T170000Z", None)


def test_the_rto_is_met_by_the_extrapolated_time_not_the_measured_one() -> None:
    entry = drill_entry("postgres", rto_measured_s=600.0, rto_extrapolated_s=9000.0, rto_target_s=7200.0)
    assert entry.rto_met is False


def test_lines_that_are_not_entries_are_reported_and_skipped() -> None:
    good = drill_entry("redis").to_line()
    bad: list[tuple[int, str]] = []
    entries = ledger.parse(good + "{oops\n" + '{"service": "redis", "rto_measured_seconds": 5}\n[]\n',
                           lambda number, why: bad.append((number, why)))
    assert len(entries) == 1
    assert bad == [(2, "is not JSON"), (3, "is not a ledger entry (missing run_id, finished_at, status)"),
                   (4, "is not a JSON object")]


def test_latest_by_service_takes_the_newest_finish() -> None:
    old = drill_entry("redis", finished_at=datetime(2026, 11, 1, tzinfo=UTC), run_id="a")
    new = drill_entry("redis", "failed", finished_at=datetime(2026, 11, 8, tzinfo=UTC), run_id="b")
    assert ledger.latest_by_service([new, old]) == {"redis": new}


def write_pick(plan, run_id: str, picks: list[dict], problems: list[dict], status: str = "ok", error: str | None = None):
    write_json(run_dir(plan, run_id) / "pick.json", {
        "run_id": run_id, "status": status, "error": error, "picks": picks, "problems": problems,
        "request": {"service": "all", "source": "offsite", "backend": "local", "seed": 1, "seed_from": "run id",
                    "keep_scratch": False},
    })


def all_text(report: dict) -> str:
    return drill_report.render_markdown(report) + "\n" + drill_report.slack_text(report)


def test_a_fresh_install_gives_one_informational_summary(tmp_path: Path) -> None:
    plan = plan_with("redis", root=tmp_path)
    never = "no {0} backup (full) exists yet at s3://b/erp; the watchdog alerts if its first backup is late"
    write_pick(plan, "scheduled__1", [], [{"service": s, "never_backed_up": True, "error": never.format(s)}
                                           for s in ("postgres", "redis")])

    report = drill_report.build_report(plan, "scheduled__1")

    assert report["status"] == drill_report.NOTHING_YET and report["error"] is None
    text = drill_report.slack_text(report)
    assert text.startswith(":information_source:") and ":red_circle:" not in text
    assert "• postgres: not drilled, no postgres backup" in text
    assert not NONE_WORD.search(all_text(report)), all_text(report)
    assert [e.status for e in drill_report.ledger_lines(report)] == ["skipped", "skipped"]


def test_a_service_without_a_usable_set_fails_the_drill_and_prints_no_none(tmp_path: Path) -> None:
    plan = plan_with("milvus", root=tmp_path)
    pick = {"run_id": "manual__2", "service": "postgres", "backup_type": "full", "backup_id": "20261120T170000Z",
            "rto_target_s": 7200.0, "set_bytes": 100, "source": "offsite", "source_description": "s3://b/erp"}
    state = ServiceState(plan, "manual__2", "postgres")
    for step in ("start_target", "fetch", "restore", "verify", "teardown"):
        state.write(step, {"status": "ok", "seconds": 1.0})
    write_pick(plan, "manual__2", [pick], [{"service": "milvus", "error": "no complete milvus set within retention"}])

    report = drill_report.build_report(plan, "manual__2")

    assert report["status"] == "failed"
    text = drill_report.slack_text(report)
    assert "• milvus: failed at pick: no complete milvus set within retention" in text
    assert "• postgres full/20261120T170000Z: passed from offsite" in text
    assert not NONE_WORD.search(all_text(report)), all_text(report)
    assert "| milvus | no set | failed at pick |" in drill_report.render_markdown(report)


def test_a_failed_pick_reports_its_error_once_without_none(tmp_path: Path) -> None:
    plan = plan_with(root=tmp_path)
    write_pick(plan, "manual__3", [], [], status="failed",
               error="DrillParamError: no backup postgres/20260101T000000Z at s3://b/erp; complete sets: full/X")

    report = drill_report.build_report(plan, "manual__3")

    assert report["status"] == "failed" and report["services"] == []
    text = drill_report.slack_text(report)
    assert text.count("no backup postgres/20260101T000000Z") == 1 and not NONE_WORD.search(all_text(report))


def alert_context(task_id: str, exception: BaseException) -> dict:
    ti = SimpleNamespace(dag_id="dr_drill", task_id=task_id, run_id="manual__4", try_number=1,
                         task=SimpleNamespace(retries=2), log_url="http://airflow.test/x")
    return {"ti": ti, "exception": exception}


@pytest.mark.parametrize(("task_id", "exception", "alerts"), [
    ("pick", RuntimeError("bad backup_id"), 0),  # the report task, which always runs, posts the summary
    ("fetch", RuntimeError("checksum"), 0),
    ("report", DrillFailedAndReported("DR drill failed: ..."), 0),  # its summary was the alert
    ("report", RuntimeError("report crashed"), 1),  # no summary was posted
])
def test_a_failed_drill_alerts_once(slack_receiver, monkeypatch, task_id, exception, alerts) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_SLACK_BACKUP_ALERTS", slack_receiver.conn_json())
    DrillFailureAlert("slack_backup_alerts")(alert_context(task_id, exception))
    assert len(slack_receiver.messages) == alerts


def test_the_run_note_fits_airflows_limit_and_keeps_its_links(tmp_path: Path) -> None:
    from erp_backup.drill.run_note import NOTE_LIMIT, links, note_markdown

    services = [{"service": f"service{i}", "backup_type": "full", "backup_id": "20261120T170000Z", "status": "passed",
                 "rto": {"measured_s": 80.0, "extrapolated_s": 200.0, "target_s": 7200.0}} for i in range(30)]
    report = {"run_id": "manual__5", "status": "passed", "error": None, "services": services,
              "links": links("http://airflow.test", "dr_drill", "manual__5"),
              "report_files": {"markdown": "/backup/drills/runs/manual__5/report.md"}}

    note = note_markdown(report, "PASSED")

    assert len(note) <= NOTE_LIMIT and note.startswith("**DR drill: PASSED**")
    assert "- **service0 full/20261120T170000Z**: passed, RTO 80.0 s (extrapolated 3.3 min, target 2.00 h)" in note
    assert "…(more in the full report)" in note and note.endswith(
        "[Backups page](http://airflow.test/plugin/backups) · Full report: `/backup/drills/runs/manual__5/report.md`")
    assert not NONE_WORD.search(note)


def test_a_failed_drills_note_gives_its_error_its_own_paragraph() -> None:
    from erp_backup.drill.run_note import note_markdown

    report = {"run_id": "manual__7", "status": "failed", "error": "DrillParamError: no backup redis/20200102T000000Z",
              "services": []}

    note = note_markdown(report, "FAILED")

    assert [part.strip() for part in note.split("\n\n")] == [
        "**DR drill: FAILED**", "Error: DrillParamError: no backup redis/20200102T000000Z"]


def test_the_slack_summary_links_the_run_and_the_backups_page() -> None:
    from erp_backup.drill.run_note import links

    report = {"run_id": "manual__6+00:00", "status": "passed", "error": None, "services": [],
              "links": links("http://airflow.test/", "dr_drill", "manual__6+00:00")}

    text = drill_report.slack_text(report)

    assert text.endswith("<http://airflow.test/dags/dr_drill/runs/manual__6%2B00%3A00|The run and its report> · "
                         "<http://airflow.test/plugin/backups|Backups page>")
