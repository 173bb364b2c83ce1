"""The watchdog's rules (evaluate, transitions) and its readers on real staging and NAS directories."""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from erp_backup.checksum import verify_and_seal
from erp_backup.manifest import FileEntry, Manifest, sha256_file, write_manifest
from erp_backup.offsite import FilesystemOffsite
from erp_backup.plan import DEFAULT_PLAN_PATH, BackupJob, Plan, parse_plan
from erp_backup.sets import BackupSet, SetState, backup_id_for
from erp_backup.watchdog import (
    OFFSITE_KEY,
    Reason,
    SetCounts,
    Status,
    announce,
    check,
    evaluate,
    format_duration,
    longest_gap,
    read_state,
    render_table,
    rpo_carriers,
    run_check,
    state_path,
    transitions,
)
from tests.fixtures.factories import make_manifest

UTC = timezone.utc
SLACK_ENV = "AIRFLOW_CONN_SLACK_BACKUP_ALERTS"


def make_job(schedule: str = "0 2 * * *", rpo: timedelta = timedelta(days=7), *, service: str = "milvus",
             backup_type: str = "etcd", tz: str = "Asia/Seoul") -> BackupJob:
    return BackupJob(
        service=service, backup_type=backup_type, schedule=schedule, timezone=tz, retention=timedelta(days=7),
        method="test", rpo=rpo, rto=timedelta(hours=2), connections={"source": "src"}, enabled=True,
    )


def etcd_manifest(started: datetime, finished: datetime) -> Manifest:
    """A milvus etcd set captured from `started` to `finished` (the job these tests watch)."""
    return make_manifest(service="milvus", backup_type="etcd", captured_started_at=started, captured_finished_at=finished)


def codes(status: Status) -> list[str]:
    return [reason.code for reason in status.reasons]


# 02:00 Asia/Seoul is 17:00 UTC the day before. 2026-03-10 is a Tuesday, 2026-03-13 a Friday.
LAST_RUN = datetime(2026, 3, 9, 17, 0, tzinfo=UTC)
LAST_SET = etcd_manifest(LAST_RUN + timedelta(seconds=5), LAST_RUN + timedelta(minutes=10))


# --- evaluate -----------------------------------------------------------------------


def test_a_fresh_set_is_ok_with_age_and_deadline():
    now = LAST_RUN + timedelta(hours=5)
    status = evaluate(make_job(), LAST_SET, SetCounts(), now)
    assert status.reasons == () and not status.breached
    assert status.key == "backup_milvus_etcd" and status.newest_id == "20260309T170005Z"
    assert status.age == timedelta(hours=4, minutes=50)
    # next fire (02:00 KST) + the set's 9m55s capture + 1 h grace
    assert status.due_by == datetime(2026, 3, 10, 18, 9, 55, tzinfo=UTC)


def test_overdue_after_the_next_fire_plus_capture_time_plus_grace():
    job = make_job()
    just_in_time = evaluate(job, LAST_SET, SetCounts(), datetime(2026, 3, 10, 18, 5, tzinfo=UTC))
    late = evaluate(job, LAST_SET, SetCounts(), datetime(2026, 3, 10, 18, 15, tzinfo=UTC))
    assert just_in_time.reasons == ()
    assert codes(late) == ["overdue"]
    assert "20260309T170005Z" in late.reasons[0].text and "2026-03-11 03:09 KST" in late.reasons[0].text


def test_a_long_backup_gets_its_own_duration_before_it_is_overdue():
    slow = etcd_manifest(LAST_RUN, LAST_RUN + timedelta(minutes=90))
    job = make_job()
    assert evaluate(job, slow, SetCounts(), datetime(2026, 3, 10, 19, 20, tzinfo=UTC)).reasons == ()
    assert codes(evaluate(job, slow, SetCounts(), datetime(2026, 3, 10, 19, 40, tzinfo=UTC))) == ["overdue"]


def test_weekday_schedule_is_not_overdue_over_the_weekend():
    job = make_job("0 2 * * 1-5")
    friday = datetime(2026, 3, 12, 17, 0, tzinfo=UTC)  # Fri 02:00 KST
    friday_set = etcd_manifest(friday, friday + timedelta(minutes=10))
    saturday_noon = datetime(2026, 3, 14, 3, 0, tzinfo=UTC)
    monday_0330 = datetime(2026, 3, 15, 18, 30, tzinfo=UTC)
    assert evaluate(job, friday_set, SetCounts(), saturday_noon).reasons == ()
    assert codes(evaluate(job, friday_set, SetCounts(), monday_0330)) == ["overdue"]


def test_older_than_the_rpo_is_a_breach_even_before_overdue():
    job = make_job(rpo=timedelta(hours=24))
    status = evaluate(job, LAST_SET, SetCounts(), LAST_RUN + timedelta(hours=24, minutes=15))
    assert codes(status) == ["rpo"]
    assert "24h 5m old, over the RPO of 24h" in status.reasons[0].text


def test_a_schedule_slower_than_the_rpo_is_flagged_on_the_rpo_carrier_only():
    daily_with_6h_rpo = make_job(rpo=timedelta(hours=6), service="postgres", backup_type="full")
    fresh = LAST_RUN + timedelta(hours=1)
    carrier = evaluate(daily_with_6h_rpo, LAST_SET, SetCounts(), fresh, carries_rpo=True)
    other = evaluate(daily_with_6h_rpo, LAST_SET, SetCounts(), LAST_RUN + timedelta(hours=12), carries_rpo=False)
    assert codes(carrier) == ["rpo_unmet_by_schedule"]
    assert "RPO 6h of postgres cannot be met" in carrier.reasons[0].text and "24h" in carrier.reasons[0].text
    assert other.reasons == ()  # 11h 50m old: over the RPO, but another type carries it


def test_rpo_carriers_are_each_services_most_frequent_types():
    jobs = [
        make_job("0 2 * * *", service="postgres", backup_type="full"),
        make_job("0 */6 * * *", service="postgres", backup_type="wal"),
        make_job("0 1 * * 0", service="postgres", backup_type="snapshot"),
        make_job("0 5 * * 0", service="milvus", backup_type="full"),
        make_job("30 2 * * *", service="milvus", backup_type="etcd"),
        make_job("15 3 * * *", service="redis", backup_type="rdb"),
    ]
    now = LAST_RUN
    assert rpo_carriers(jobs, now) == {"backup_postgres_wal", "backup_milvus_etcd", "backup_redis_rdb"}
    assert longest_gap("0 9 * * 1-5", "Asia/Seoul", now) == timedelta(hours=72)


def test_no_set_at_all_is_a_breach():
    status = evaluate(make_job(), None, SetCounts(), LAST_RUN)
    assert codes(status) == ["no_set"] and status.newest_id is None and status.age is None


def test_failed_sets_since_the_newest_good_one_are_breaches_older_ones_only_counted():
    counts = SetCounts(
        incomplete=("20260310T170000Z",),
        corrupt=("20260301T170000Z", "20260310T170000Z"),
        pending=("20260311T170000Z",),
    )
    status = evaluate(make_job(), LAST_SET, counts, LAST_RUN + timedelta(hours=5))
    assert codes(status) == ["corrupt", "incomplete"]
    assert "1 corrupt milvus/etcd set(s) since the newest good one: 20260310T170000Z" in status.reasons[0].text
    assert "20260301T170000Z" not in status.reasons[0].text
    row = status.as_row()
    assert (row["incomplete"], row["corrupt"], row["pending"]) == (1, 2, 1)


def test_a_set_missing_offsite_is_a_breach():
    status = evaluate(make_job(), LAST_SET, SetCounts(offsite_missing=("20260310T170000Z",)), LAST_RUN + timedelta(hours=5))
    assert codes(status) == ["offsite_missing"] and "20260310T170000Z" in status.reasons[0].text


def test_ages_are_real_time_across_a_dst_change():
    job = make_job(tz="America/New_York")
    saturday_0205_est = datetime(2026, 3, 7, 7, 5, tzinfo=UTC)
    set_ = etcd_manifest(saturday_0205_est - timedelta(minutes=5), saturday_0205_est)
    # Sunday 2026-03-08: 02:00 does not exist, the run fires at 03:00 EDT = 07:00 UTC (24 h later).
    before = evaluate(job, set_, SetCounts(), datetime(2026, 3, 8, 8, 0, tzinfo=UTC))
    after = evaluate(job, set_, SetCounts(), datetime(2026, 3, 8, 8, 10, tzinfo=UTC))
    assert before.reasons == () and before.as_row()["age"] == "24h 55m"
    assert codes(after) == ["overdue"]


def test_format_duration():
    assert [format_duration(timedelta(**kw)) for kw in (
        {"minutes": 42}, {"hours": 6}, {"hours": 25, "minutes": 10}, {"days": 7}, {"days": 3, "hours": 4, "minutes": 9},
    )] == ["42m", "6h", "25h 10m", "7d", "3d 4h"]


def test_a_status_survives_the_xcom_round_trip():
    status = replace(
        evaluate(make_job(), LAST_SET, SetCounts(corrupt=("20260310T170000Z",)), LAST_RUN + timedelta(hours=30)),
        notes=("offsite not confirmed",),
    )
    row = json.loads(json.dumps(status.as_row()))
    assert Status.from_row(row) == status
    assert row["status"] == "breach" and row["age"] == "29h 50m" and row["rpo"] == "7d"


# --- transitions ----------------------------------------------------------------------

T0 = datetime(2026, 3, 10, 0, 0, tzinfo=UTC)


def job_status(*reason_codes: str, key: str = "backup_milvus_etcd", at: datetime = T0) -> Status:
    return Status(
        key=key, label="milvus/etcd", checked_at=at, newest_id="20260309T170005Z", captured_at=at - timedelta(hours=30),
        rpo=timedelta(days=7), reasons=tuple(Reason(code, f"{code} happened") for code in reason_codes),
    )


def test_ok_stays_quiet():
    alerts, state = transitions({}, [job_status()])
    assert alerts == [] and state["backup_milvus_etcd"]["status"] == "ok"


def test_a_breach_is_announced_once_and_its_recovery_once():
    alerts1, state1 = transitions({}, [job_status("overdue")])
    alerts2, state2 = transitions(state1, [job_status("overdue", at=T0 + timedelta(hours=1))])
    alerts3, state3 = transitions(state2, [job_status("overdue", "rpo", at=T0 + timedelta(hours=2))])
    alerts4, state4 = transitions(state3, [job_status(at=T0 + timedelta(hours=3))])
    alerts5, _ = transitions(state4, [job_status(at=T0 + timedelta(hours=4))])

    assert [a.kind for a in alerts1] == ["breach"]
    assert "milvus/etcd breach" in alerts1[0].text and "overdue happened" in alerts1[0].text
    assert "`20260309T170005Z`, 30h old (RPO 7d)" in alerts1[0].text
    assert alerts2 == [] and alerts3 == []  # the same set getting older is the same incident
    assert state3["backup_milvus_etcd"]["since"] == T0.isoformat()
    assert set(state3["backup_milvus_etcd"]["reasons"]) == {"overdue", "rpo"}
    assert [a.kind for a in alerts4] == ["recovery"]
    assert "recovered" in alerts4[0].text and "after 3h" in alerts4[0].text
    assert state4["backup_milvus_etcd"] == {"status": "ok", "label": "milvus/etcd", "checked_at": (T0 + timedelta(hours=3)).isoformat()}
    assert alerts5 == []


def test_a_new_kind_of_problem_during_a_breach_is_announced_once():
    _, state = transitions({}, [job_status("overdue")])
    alerts, state = transitions(state, [job_status("overdue", "corrupt", at=T0 + timedelta(hours=1))])
    assert [(a.kind, a.key) for a in alerts] == [("changed", "backup_milvus_etcd")]
    assert "corrupt happened" in alerts[0].text and "overdue happened" not in alerts[0].text
    assert f"in breach since {T0.isoformat()}" in alerts[0].text
    again, state = transitions(state, [job_status("overdue", "corrupt", at=T0 + timedelta(hours=2))])
    assert again == []
    # it clears, then a new corrupt set appears: new information
    _, state = transitions(state, [job_status("overdue", at=T0 + timedelta(hours=3))])
    back, _ = transitions(state, [job_status("overdue", "corrupt", at=T0 + timedelta(hours=4))])
    assert [a.kind for a in back] == ["changed"]


def test_keys_are_independent_and_dropped_jobs_are_forgotten_quietly():
    previous = {"backup_gone_full": {"status": "breach", "since": T0.isoformat(), "reasons": {"overdue": "x"}}}
    statuses = [job_status("overdue"), job_status(key="backup_redis_rdb"), job_status("offsite_unreachable", key=OFFSITE_KEY)]
    alerts, state = transitions(previous, statuses)
    assert sorted((a.key, a.kind) for a in alerts) == [("backup_milvus_etcd", "breach"), (OFFSITE_KEY, "breach")]
    assert set(state) == {"backup_milvus_etcd", "backup_redis_rdb", OFFSITE_KEY}
    assert "backup_gone_full" in previous  # pure: the input is not changed


# --- real staging and NAS -----------------------------------------------------------------


def make_offsite_set(root: Path, nas: FilesystemOffsite | None, finished: datetime, *, backup_id: str | None = None,
                     service: str = "postgres", backup_type: str = "full") -> BackupSet:
    """A real set: data file, manifest, SHA256SUMS, and (with `nas`) uploaded and receipted (state OFFSITE)."""
    started = finished - timedelta(minutes=5)
    backup_set = BackupSet(root, service, backup_type, backup_id or backup_id_for(started))
    backup_set.create_dir()
    data = backup_set.path / "globals.sql.zst"
    data.write_bytes(f"data of {backup_set.backup_id}".encode())
    size, sha256 = sha256_file(data)
    write_manifest(backup_set.path, make_manifest(
        service=service, backup_type=backup_type, backup_id=backup_set.backup_id,
        captured_started_at=started, captured_finished_at=finished, files=[FileEntry("globals.sql.zst", size, sha256)],
    ))
    verify_and_seal(backup_set)
    if nas is not None:
        nas.upload_set(backup_set)
        assert backup_set.state is SetState.OFFSITE
    return backup_set


def plan_for(tmp_path: Path, *, rpo: str = "24h", offsite_path: Path | None = None) -> Plan:
    data = yaml.safe_load(DEFAULT_PLAN_PATH.read_text())
    for name, service in data["services"].items():  # only postgres full, whatever the committed plan enables
        service["enabled"] = name == "postgres"
        for type_name, backup in service["backups"].items():
            backup["enabled"] = type_name == "full"
    data["services"]["postgres"]["rpo"] = rpo
    data["offsite"].update(kind="filesystem", path=str(offsite_path or tmp_path / "nas"))
    plan = parse_plan(tmp_path / "plan.yaml", data)
    return replace(plan, backup_root=tmp_path / "staging")


@pytest.fixture
def plan(tmp_path: Path) -> Plan:
    (tmp_path / "nas").mkdir()
    return plan_for(tmp_path)


@pytest.fixture
def nas(plan: Plan) -> FilesystemOffsite:
    return FilesystemOffsite(plan.offsite.path)


NOW = datetime(2026, 3, 10, 20, 0, tzinfo=UTC)


def test_check_reports_the_newest_set_the_nas_holds(plan: Plan, nas: FilesystemOffsite):
    assert [job.dag_id for job in plan.enabled_jobs] == ["backup_postgres_full"]
    make_offsite_set(plan.backup_root, nas, NOW - timedelta(hours=30))
    newest = make_offsite_set(plan.backup_root, nas, NOW - timedelta(hours=3))

    job_row, offsite_row = check(plan, NOW, nas)

    assert job_row.key == "backup_postgres_full" and job_row.newest_id == newest.backup_id
    assert job_row.age == timedelta(hours=3) and job_row.reasons == () and job_row.notes == ()
    assert offsite_row.key == OFFSITE_KEY and not offsite_row.breached and nas.description in offsite_row.label


def test_check_falls_back_when_the_newest_manifest_is_gone_offsite(plan: Plan, nas: FilesystemOffsite):
    older = make_offsite_set(plan.backup_root, nas, NOW - timedelta(hours=27))
    newest = make_offsite_set(plan.backup_root, nas, NOW - timedelta(hours=3))
    (Path(plan.offsite.path) / newest.key / "manifest.json").unlink()

    job_row, _ = check(plan, NOW, nas)

    assert job_row.newest_id == older.backup_id and job_row.counts.offsite_missing == (newest.backup_id,)
    assert codes(job_row) == ["overdue", "rpo", "offsite_missing"]


def test_check_counts_failed_and_running_sets(plan: Plan, nas: FilesystemOffsite):
    make_offsite_set(plan.backup_root, nas, NOW - timedelta(hours=20))
    corrupt = make_offsite_set(plan.backup_root, None, NOW - timedelta(hours=10))
    corrupt.mark_corrupt(["globals.sql.zst: sha256 mismatch"])
    killed = BackupSet(plan.backup_root, "postgres", "full", "20260310T150000Z")
    killed.create_dir()
    (killed.path / "db").mkdir()
    (killed.path / "db" / "part.zst").write_bytes(b"half")
    long_ago = (NOW - timedelta(hours=2)).timestamp()
    for path in (killed.path / "db" / "part.zst", killed.path / "db", killed.path):
        os.utime(path, (long_ago, long_ago))
    running = BackupSet(plan.backup_root, "postgres", "full", "20260310T190000Z")
    running.create_dir()
    (running.path / "globals.sql.zst").write_bytes(b"still writing")  # mtime: the real now
    unverified = make_offsite_set(plan.backup_root, None, NOW - timedelta(hours=1), backup_id="20260310T185500Z")
    (unverified.path / "SHA256SUMS").unlink()

    now = datetime.now(UTC)  # the running set was written just now
    job_row, _ = check(plan, now, nas)

    assert job_row.counts.corrupt == (corrupt.backup_id,)
    assert job_row.counts.incomplete == (killed.backup_id,)
    assert set(job_row.counts.pending) == {running.backup_id, unverified.backup_id}
    assert {"corrupt", "incomplete"} <= set(codes(job_row))


def test_an_unreachable_nas_is_its_own_breach_and_jobs_are_still_judged(tmp_path: Path):
    plan = plan_for(tmp_path, offsite_path=tmp_path / "unmounted")
    nas_elsewhere = tmp_path / "was-mounted"
    nas_elsewhere.mkdir()
    make_offsite_set(plan.backup_root, FilesystemOffsite(nas_elsewhere), NOW - timedelta(hours=30))

    job_row, offsite_row = check(plan, NOW, FilesystemOffsite(plan.offsite.path))

    assert offsite_row.breached and codes(offsite_row) == ["offsite_unreachable"]
    assert "offsite unreachable" in offsite_row.reasons[0].text and "is the NAS mounted?" in offsite_row.reasons[0].text
    assert codes(job_row) == ["overdue", "rpo"]
    assert job_row.notes == ("offsite not confirmed (unreachable): judged from the staging manifest",)
    table = render_table([job_row, offsite_row])
    assert "offsite unreachable" in table and "note: offsite not confirmed" in table


def test_render_table_lists_every_column_and_the_reasons(plan: Plan, nas: FilesystemOffsite):
    newest = make_offsite_set(plan.backup_root, nas, NOW - timedelta(hours=26))
    table = render_table(check(plan, NOW, nas))
    lines = table.splitlines()
    assert lines[0].split() == ["job", "newest", "set", "age", "RPO", "incomplete", "corrupt", "status"]
    assert lines[2].split() == ["postgres/full", newest.backup_id, "26h", "24h", "0", "0", "BREACH"]
    assert lines[3].split()[:3] == ["offsite", f"file://{plan.offsite.path}", "-"] and lines[3].endswith("OK")
    assert any(line.startswith("postgres/full: newest set") and "over the RPO of 24h" in line for line in lines)


def test_run_check_logs_the_table_and_returns_json_rows(plan: Plan, nas: FilesystemOffsite, caplog):
    newest = make_offsite_set(plan.backup_root, nas, NOW - timedelta(hours=2))
    with caplog.at_level(logging.INFO, logger="erp_backup.watchdog"):
        rows = run_check(plan, NOW, nas)
    assert json.loads(json.dumps(rows)) == rows
    assert [(row["key"], row["newest_set"], row["age"], row["status"]) for row in rows] == [
        ("backup_postgres_full", newest.backup_id, "2h", "ok"), (OFFSITE_KEY, None, None, "ok"),
    ]
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "backup freshness:" in logged
    assert ["postgres/full", newest.backup_id, "2h", "24h", "0", "0", "OK"] in [line.split() for line in logged.splitlines()]


# --- announce: Slack and the state file ---------------------------------------------------


def test_announce_posts_a_breach_once_then_the_recovery_once(plan: Plan, nas: FilesystemOffsite, slack_receiver, monkeypatch):
    monkeypatch.setenv(SLACK_ENV, slack_receiver.conn_json())
    make_offsite_set(plan.backup_root, nas, NOW - timedelta(hours=30))

    announce(plan, check(plan, NOW, nas))
    announce(plan, check(plan, NOW + timedelta(hours=1), nas))
    assert len(slack_receiver.messages) == 1
    assert "postgres/full breach" in slack_receiver.texts()[0] and "`backup_postgres_full`" in slack_receiver.texts()[0]

    path = state_path(plan)
    assert path == plan.backup_root / "watchdog" / "state.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    state = json.loads(path.read_text())
    assert state["backup_postgres_full"]["status"] == "breach" and state[OFFSITE_KEY]["status"] == "ok"

    make_offsite_set(plan.backup_root, nas, NOW + timedelta(hours=1, minutes=30))
    results = announce(plan, check(plan, NOW + timedelta(hours=2), nas))
    announce(plan, check(plan, NOW + timedelta(hours=3), nas))
    assert [(alert.kind, sent) for alert, sent in results] == [("recovery", True)]
    assert len(slack_receiver.messages) == 2 and "postgres/full recovered" in slack_receiver.texts()[1]
    assert read_state(path)["backup_postgres_full"]["status"] == "ok"


def test_an_alert_that_could_not_be_sent_is_sent_by_the_next_check(plan: Plan, nas: FilesystemOffsite, slack_receiver, monkeypatch):
    make_offsite_set(plan.backup_root, nas, NOW - timedelta(hours=30))
    monkeypatch.delenv(SLACK_ENV, raising=False)

    results = announce(plan, check(plan, NOW, nas))
    assert [(alert.kind, sent) for alert, sent in results] == [("breach", False)]
    assert "backup_postgres_full" not in read_state(state_path(plan))

    monkeypatch.setenv(SLACK_ENV, slack_receiver.conn_json())
    announce(plan, check(plan, NOW + timedelta(hours=1), nas))
    assert len(slack_receiver.messages) == 1 and "postgres/full breach" in slack_receiver.texts()[0]


def test_an_unreadable_state_file_is_logged_and_starts_over(plan: Plan, caplog):
    path = state_path(plan)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    sent: list[str] = []

    with caplog.at_level(logging.WARNING, logger="erp_backup.watchdog"):
        results = announce(plan, [job_status("overdue")], send=lambda conn_id, text: sent.append(conn_id) or True)

    assert [alert.kind for alert, _ in results] == ["breach"] and sent == ["slack_backup_alerts"]
    assert any(str(path) in record.getMessage() for record in caplog.records)
    assert read_state(path)["backup_milvus_etcd"]["status"] == "breach"


# --- a fresh install: jobs without any set wait for their first run (erp_backup.first_sets) ------------


def test_a_fresh_install_posts_one_informational_message_then_alerts_only_a_late_first_set(
        plan: Plan, nas: FilesystemOffsite, slack_receiver, monkeypatch):
    monkeypatch.setenv(SLACK_ENV, slack_receiver.conn_json())
    due = plan.enabled_jobs[0]

    results = announce(plan, check(plan, NOW, nas))
    assert [(alert.kind, sent) for alert, sent in results] == [("info", True)]
    (info,) = slack_receiver.texts()
    assert info.startswith(":information_source:") and "postgres/full: first set due by" in info
    assert ":rotating_light:" not in info and "None" not in info

    announce(plan, check(plan, NOW + timedelta(hours=1), nas))  # still before the first run is due
    assert len(slack_receiver.messages) == 1
    state = read_state(state_path(plan))
    assert state[due.dag_id]["status"] == "ok" and state[due.dag_id]["waiting_since"] == NOW.isoformat()

    results = announce(plan, check(plan, NOW + timedelta(days=2), nas))  # its first run came and went
    assert [alert.kind for alert, _ in results] == ["breach"]
    late = slack_receiver.texts()[1]
    assert "no complete, offsite-verified postgres/full set exists" in late and "first checked at" in late


def test_a_first_set_in_time_ends_the_wait_silently(plan: Plan, nas: FilesystemOffsite, slack_receiver, monkeypatch):
    monkeypatch.setenv(SLACK_ENV, slack_receiver.conn_json())
    announce(plan, check(plan, NOW, nas))
    make_offsite_set(plan.backup_root, nas, NOW + timedelta(hours=2))

    results = announce(plan, check(plan, NOW + timedelta(hours=3), nas))

    assert results == [] and len(slack_receiver.messages) == 1
    assert "waiting_since" not in read_state(state_path(plan))["backup_postgres_full"]


def test_a_job_whose_first_run_failed_is_not_waiting(plan: Plan, nas: FilesystemOffsite):
    failed = BackupSet(plan.backup_root, "postgres", "full", backup_id_for(NOW - timedelta(hours=5)))
    failed.path.mkdir(parents=True)
    (failed.path / "globals.sql.zst").write_bytes(b"partial")
    os.utime(failed.path / "globals.sql.zst", (0, 0))
    os.utime(failed.path, (0, 0))
    sent: list[str] = []

    results = announce(plan, check(plan, NOW, nas), send=lambda conn_id, text: sent.append(text) or True)

    assert [alert.kind for alert, _ in results] == ["breach"]
    assert "no complete, offsite-verified postgres/full set exists" in sent[0] and "1 incomplete" in sent[0]


def test_run_check_logs_each_services_last_drill_from_the_ledger(plan: Plan, nas: FilesystemOffsite, caplog):
    from erp_backup.drill import ledger, records
    from tests.fixtures.factories import drill_entry

    ledger.append(records.ledger_path(plan), [
        drill_entry("postgres", "failed", run_id="a", failed_step="verify", finished_at=NOW - timedelta(days=8)),
        drill_entry("postgres", run_id="b", backup_type="full", backup_id="20260301T170000Z", finished_at=NOW - timedelta(days=1),
                    rto_measured_s=80.0, rto_extrapolated_s=200.0, rto_target_s=7200.0),
    ])
    with caplog.at_level(logging.INFO, logger="erp_backup.watchdog"):
        run_check(plan, NOW, nas)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert (f"postgres: passed {(NOW - timedelta(days=1)).isoformat()} (full/20260301T170000Z), "
            "RTO 200.0 s within the target 7200 s") in logged
