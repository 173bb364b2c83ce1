"""A stricter plan: 5-field cron only, duplicate keys rejected by line, a broken service block isolated."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from erp_backup.offsite import offsite_from_plan
from erp_backup.plan import DEFAULT_PLAN_PATH, PlanError, load_plan, parse_plan
from erp_backup.plan_alert import alert_plan_errors
from erp_backup.plan_yaml import load as load_yaml
from erp_backup.watchdog import PLAN_KEY, announce, check, transitions

PLAN_TEXT = DEFAULT_PLAN_PATH.read_text()
DAGS = DEFAULT_PLAN_PATH.parents[1] / "dags"


def raw_plan() -> dict:
    return yaml.safe_load(PLAN_TEXT)


def line_of(text: str, needle: str, start: int = 0) -> int:
    """1-based line number of the first line containing `needle` at or after line `start`."""
    lines = text.splitlines()
    return next(i + 1 for i in range(start, len(lines)) if needle in lines[i])


@pytest.mark.parametrize("schedule", ["0 0 2 * * *", "30 2 * * 1-5 15"])
def test_a_six_field_cron_is_rejected_naming_the_field_and_why(schedule):
    data = raw_plan()
    data["services"]["redis"]["backups"]["rdb"]["schedule"] = schedule
    with pytest.raises(PlanError) as caught:
        parse_plan(Path("plan.yaml"), data)
    message = str(caught.value)
    assert "plan.services.redis.backups.rdb.schedule" in message and "has 6 field(s): use exactly 5" in message
    assert "croniter reads a 6th field as seconds" in message


def test_the_drill_schedule_and_cron_aliases_need_five_fields_too():
    data = raw_plan()
    data["drill"]["schedule"] = "0 0 6 * * 0"
    with pytest.raises(PlanError, match=r"plan\.drill\.schedule: cron expression '0 0 6 \* \* 0' has 6 field"):
        parse_plan(Path("plan.yaml"), data)
    data = raw_plan()
    data["services"]["gitlab"]["backups"]["full"]["schedule"] = "@daily"
    with pytest.raises(PlanError, match=r"plan\.services\.gitlab\.backups\.full\.schedule: .* has 1 field\(s\)"):
        parse_plan(Path("plan.yaml"), data)


def test_the_drill_docker_block_sets_the_pull_policy_and_an_image_per_scratch_kind():
    plan = parse_plan(Path("plan.yaml"), raw_plan())
    assert (plan.drill.docker.pull, plan.drill.docker.images) == ("if-missing", {})
    assert plan.drill.docker.image_for("postgres", "postgres:15") == "postgres:15"
    data = raw_plan()
    data["drill"]["docker"] = {"pull": "never", "images": {"postgres": "erp-local/postgres:{tag}",
                                                           "rabbitmq": "mirror.example:5000/{image}"}}
    docker = parse_plan(Path("plan.yaml"), data).drill.docker
    assert docker.pull == "never"
    assert docker.image_for("postgres", "postgres:16") == "erp-local/postgres:16"
    assert docker.image_for("rabbitmq", "rabbitmq:3.10-management") == "mirror.example:5000/rabbitmq:3.10-management"
    assert docker.image_for("s3", "minio/minio:latest") == "minio/minio:latest"


@pytest.mark.parametrize(("block", "error"), [
    ({"pull": "sometimes"}, r"plan\.drill\.docker\.pull: must be one of if-missing, always, never, got 'sometimes'"),
    ({"images": {"postgress": "x:{tag}"}}, r"plan\.drill\.docker\.images\.postgress: unknown scratch kind 'postgress'"),
    ({"images": {"postgres": "x:{major}"}}, r"plan\.drill\.docker\.images\.postgres: image 'x:\{major\}' may use only"),
    ({"images": {"postgres": 15}}, r"plan\.drill\.docker\.images\.postgres: must be str, got 15"),
    ({"registry": "x"}, r"plan\.drill\.docker\.registry: unknown key 'registry'"),
])
def test_a_bad_drill_docker_block_names_the_field(block, error):
    data = raw_plan()
    data["drill"]["docker"] = block
    with pytest.raises(PlanError, match=error):
        parse_plan(Path("plan.yaml"), data)


def test_yaml_duplicate_keys_are_found_with_their_lines():
    data, duplicates = load_yaml("a: 1\nb:\n  c: 2\n  c: 3\na: 4\nlist:\n  - {x: 1, x: 2}\n")
    assert data["a"] == 4  # what plain YAML would silently do
    assert [(d.where, d.key, d.line, d.first_line) for d in duplicates] == [
        ("plan.b", "c", 4, 3), ("plan", "a", 5, 1), ("plan.list[0]", "x", 7, 7),
    ]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    return path


def test_a_duplicate_key_in_a_service_block_breaks_only_that_service_naming_the_line(tmp_path):
    first = line_of(PLAN_TEXT, 'schedule: "0 2 * * *"')
    text = PLAN_TEXT.replace('        schedule: "0 2 * * *"\n', '        schedule: "0 2 * * *"\n        schedule: "0 3 * * *"\n', 1)
    plan = load_plan(write(tmp_path, text))

    assert set(plan.service_errors) == {"postgres"}
    error = plan.service_errors["postgres"]
    assert f"line {first + 1}: duplicate key 'schedule' in plan.services.postgres.backups.full" in error
    assert f"(first at line {first})" in error
    assert not any(job.service == "postgres" for job in plan.jobs)
    assert {job.service for job in plan.jobs} == {"minio", "milvus", "gitlab", "redis", "rabbitmq", "files"}
    with pytest.raises(PlanError, match="duplicate key 'schedule'"):
        plan.job("postgres", "full")


def test_a_duplicate_service_block_breaks_that_service(tmp_path):
    text = PLAN_TEXT + "  redis:\n    enabled: false\n"
    plan = load_plan(write(tmp_path, text))
    assert set(plan.service_errors) == {"redis"}
    assert f"line {len(PLAN_TEXT.splitlines()) + 1}: duplicate key 'redis' in plan.services" in plan.service_errors["redis"]


def test_a_duplicate_key_outside_the_services_fails_the_whole_plan_naming_the_line(tmp_path):
    text = PLAN_TEXT.replace("timezone: Asia/Seoul\n", "timezone: Asia/Seoul\ntimezone: UTC\n", 1)
    path = write(tmp_path, text)
    with pytest.raises(PlanError, match=rf"{path}: line {line_of(PLAN_TEXT, 'timezone: Asia/Seoul') + 1}: "
                                        r"duplicate key 'timezone' in plan \(first at line"):
        load_plan(path)


def test_a_bad_service_block_is_left_out_and_the_rest_of_the_plan_loads(tmp_path):
    data = raw_plan()
    data["services"]["redis"]["backups"]["rdb"]["schedule"] = "0 0 2 * * *"
    data["services"]["rabbitmq"]["rpo"] = "soon"
    plan = load_plan(write(tmp_path, yaml.safe_dump(data, sort_keys=False)))

    assert set(plan.service_errors) == {"redis", "rabbitmq"}
    assert "plan.services.redis.backups.rdb.schedule" in plan.service_errors["redis"]
    assert {job.service for job in plan.enabled_jobs} == {"postgres", "minio", "milvus", "gitlab", "files"}
    with pytest.raises(PlanError) as caught:
        plan.raise_for_errors()
    assert "2 service block(s) of the backup plan are broken" in str(caught.value)
    assert plan.service_errors["rabbitmq"] in str(caught.value)
    load_plan(DEFAULT_PLAN_PATH).raise_for_errors()  # the committed plan is whole


def test_a_bad_block_fails_only_its_own_dags(tmp_path, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    data = raw_plan()
    data["services"]["redis"]["backups"]["rdb"]["schedule"] = "0 0 2 * * *"
    monkeypatch.setenv("ERP_BACKUP_PLAN", str(write(tmp_path, yaml.safe_dump(data, sort_keys=False))))
    bag = DagBag(dag_folder=str(DAGS))

    assert [Path(path).name for path in bag.import_errors] == ["backup_plan_check.py"]
    assert "plan.services.redis.backups.rdb.schedule" in next(iter(bag.import_errors.values()))
    assert {"backup_watchdog", "dr_drill", "backup_postgres_full", "backup_rabbitmq_definitions"} <= set(bag.dags)
    assert "backup_redis_rdb" not in bag.dags


@pytest.fixture
def broken_plan(tmp_path):
    data = raw_plan()
    data["services"]["redis"]["backups"]["rdb"]["schedule"] = "0 0 2 * * *"
    data["offsite"].update(kind="filesystem", path=str(tmp_path / "nas"))
    (tmp_path / "nas").mkdir()
    for name, service in data["services"].items():  # nothing to check but the plan itself
        service["enabled"] = name == "redis"
    plan = parse_plan(tmp_path / "plan.yaml", data, isolate_services=True)
    return replace(plan, backup_root=tmp_path / "staging")


def test_the_watchdog_posts_the_plan_errors_once_and_a_recovery_when_fixed(broken_plan):
    now = datetime(2026, 3, 10, 20, 0, tzinfo=timezone.utc)
    sent: list[str] = []

    def send(conn_id: str, text: str) -> bool:
        sent.append(text)
        return True

    statuses = check(broken_plan, now, offsite_from_plan(broken_plan))
    plan_row = statuses[-1]
    assert plan_row.key == PLAN_KEY and [r.code for r in plan_row.reasons] == ["plan_error"]
    assert "services.redis is broken" in plan_row.reasons[0].text
    announce(broken_plan, statuses, send=send)
    announce(broken_plan, check(broken_plan, now, offsite_from_plan(broken_plan)), send=send)
    assert len(sent) == 1 and "plan.services.redis.backups.rdb.schedule" in sent[0] and "breach" in sent[0]

    fixed = replace(broken_plan, service_errors={})
    assert all(status.key != PLAN_KEY for status in check(fixed, now, offsite_from_plan(fixed)))
    announce(fixed, check(fixed, now, offsite_from_plan(fixed)), send=send)
    assert len(sent) == 2 and "recovered" in sent[1] and "(`plan`)" in sent[1]
    assert transitions({PLAN_KEY: {"status": "ok"}}, [])[0] == []  # an ok plan row leaves quietly


def test_the_drill_alert_names_every_broken_block(broken_plan):
    sent: list[tuple[str, str]] = []
    assert alert_plan_errors(broken_plan, "dr_drill", send=lambda conn, text: sent.append((conn, text)) or True)
    ((conn_id, text),) = sent
    assert conn_id == broken_plan.slack_conn_id and "dr_drill: the backup plan has broken service blocks" in text
    assert "`redis`" in text and "plan.services.redis.backups.rdb.schedule" in text
    assert not alert_plan_errors(replace(broken_plan, service_errors={}), "dr_drill", send=lambda c, t: True)
