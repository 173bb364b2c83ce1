"""The plan: the committed file is valid and matches the seed; malformed plans fail clearly."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from erp_backup.plan import DEFAULT_PLAN_PATH, PlanError, load_plan, parse_plan

SEED_TABLE = {
    ("postgres", "full"): ("0 2 * * *", 30),
    ("postgres", "wal"): ("0 */6 * * *", 7),
    ("postgres", "snapshot"): ("0 1 * * 0", 90),
    ("minio", "full"): ("0 3 * * *", 30),
    ("minio", "snapshot"): ("30 3 * * 0", 90),
    ("milvus", "full"): ("0 5 * * 0", 30),
    ("milvus", "etcd"): ("30 2 * * *", 7),
    ("gitlab", "full"): ("0 4 * * *", 60),
    ("redis", "rdb"): ("15 3 * * *", 7),
    ("rabbitmq", "definitions"): ("45 3 * * *", 7),
}
SEED_RPO_RTO = {"postgres": (6, 2), "minio": (24, 4), "milvus": (7 * 24, 4), "gitlab": (24, 2)}


def raw_plan() -> dict:
    return yaml.safe_load(DEFAULT_PLAN_PATH.read_text())


def test_committed_plan_matches_the_seed_tables():
    plan = load_plan(DEFAULT_PLAN_PATH)
    seeded = {service for service, _ in SEED_TABLE}  # services the seed names; others (files) are our own additions
    assert {(job.service, job.backup_type): (job.schedule, job.retention.days) for job in plan.jobs
            if job.service in seeded} == SEED_TABLE
    for job in plan.jobs:
        assert job.timezone == "Asia/Seoul"
        assert job.connections["source"]
        if job.service in SEED_RPO_RTO:
            rpo, rto = SEED_RPO_RTO[job.service]
            assert (job.rpo, job.rto) == (timedelta(hours=rpo), timedelta(hours=rto))
    assert plan.drill.schedule == "0 6 * * 0"
    assert plan.job("postgres", "wal").interval == timedelta(hours=6)


def test_backup_root_env_overrides_the_plan(monkeypatch, tmp_path):
    monkeypatch.setenv("ERP_BACKUP_ROOT", str(tmp_path))
    assert load_plan(DEFAULT_PLAN_PATH).backup_root == tmp_path


def mutate(edit) -> dict:
    data = raw_plan()
    edit(data)
    return data


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d["services"]["postgres"]["backups"]["full"].update(schedule="0 25 * * *"),
         "plan.services.postgres.backups.full.schedule: invalid cron expression"),
        (lambda d: d["services"]["minio"]["backups"]["full"].update(retention_days=-3),
         "plan.services.minio.backups.full.retention_days: must be a positive number of days, got -3"),
        (lambda d: d["services"]["redis"]["backups"]["rdb"].update(keep="7d"),
         "plan.services.redis.backups.rdb.keep: unknown key 'keep'"),
        (lambda d: d["services"]["gitlab"]["backups"]["full"].pop("method"),
         "plan.services.gitlab.backups.full.method: missing required field"),
        (lambda d: d["services"].update(mongodb={"enabled": True}),
         "plan.services.mongodb: unknown service"),
        (lambda d: d["services"]["postgres"]["backups"].update(hourly={"schedule": "@hourly"}),
         "plan.services.postgres.backups.hourly: unknown backup type"),
        (lambda d: d["services"]["postgres"].update(rpo="six hours"),
         "plan.services.postgres.rpo: invalid duration 'six hours'"),
        (lambda d: d["services"]["postgres"]["connections"].pop("source"),
         "plan.services.postgres.connections: must map 'source'"),
        (lambda d: d["offsite"].update(kind="tape"), "plan.offsite.kind: must be 's3' or 'filesystem'"),
        (lambda d: d["offsite"].update(kind="filesystem", path=""), "plan.offsite.path: required when kind is 'filesystem'"),
        (lambda d: d["offsite"].update(object_lock={"mode": "LEGAL_HOLD", "margin": "1d"}),
         "plan.offsite.object_lock.mode: must be one of GOVERNANCE, COMPLIANCE, got 'LEGAL_HOLD'"),
        (lambda d: d["offsite"].update(object_lock={"mode": "COMPLIANCE", "margin": "a week"}),
         "plan.offsite.object_lock.margin: invalid duration 'a week'"),
        (lambda d: d["offsite"].update(object_lock={"mode": "COMPLIANCE"}),
         "plan.offsite.object_lock.margin: missing required field"),
        (lambda d: d["offsite"].update(object_lock={"mode": "GOVERNANCE", "margin": "1d", "until": "2030"}),
         "plan.offsite.object_lock.until: unknown key 'until'"),
        (lambda d: d["offsite"].update(kind="filesystem", path="/nas", object_lock={"mode": "GOVERNANCE", "margin": "1d"}),
         "plan.offsite.object_lock: S3 Object Lock needs kind 's3'"),
        (lambda d: d["services"]["postgres"]["backups"]["full"].update(enabled="yes"),
         "plan.services.postgres.backups.full.enabled: must be bool, got 'yes'"),
    ],
)
def test_malformed_plan_names_file_service_and_field(edit, expected):
    path = Path("/etc/erp/backup_plan.yaml")
    with pytest.raises(PlanError) as caught:
        parse_plan(path, mutate(edit))
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert expected in message, message


def test_object_lock_is_off_unless_the_plan_sets_it():
    assert parse_plan(Path("plan.yaml"), mutate(lambda d: None)).offsite.object_lock is None
    lock = parse_plan(Path("plan.yaml"), mutate(
        lambda d: d["offsite"].update(object_lock={"mode": "COMPLIANCE", "margin": "36h"}))).offsite.object_lock
    assert (lock.mode, lock.margin) == ("COMPLIANCE", timedelta(hours=36))


def test_unreadable_and_invalid_yaml_files(tmp_path):
    with pytest.raises(PlanError, match="cannot read the backup plan"):
        load_plan(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("services: [unclosed")
    with pytest.raises(PlanError, match=f"{broken}: not valid YAML"):
        load_plan(broken)


def test_disabled_service_disables_all_its_jobs():
    data = mutate(lambda d: d["services"]["postgres"].update(enabled=False))
    plan = parse_plan(Path("plan.yaml"), data)
    assert not any(job.service == "postgres" for job in plan.enabled_jobs)


def test_bad_plan_fails_dag_import_with_the_message(tmp_path, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    bad = tmp_path / "plan.yaml"
    bad.write_text(yaml.safe_dump(mutate(lambda d: d["services"]["postgres"]["backups"]["full"].update(schedule="nope"))))
    monkeypatch.setenv("ERP_BACKUP_PLAN", str(bad))
    bag = DagBag(dag_folder=str(DEFAULT_PLAN_PATH.parents[1] / "dags"))
    errors = "\n".join(bag.import_errors.values())
    assert f"{bad}: plan.services.postgres.backups.full.schedule: invalid cron expression 'nope'" in errors


def test_offsite_kind_and_path_env_choose_a_nas(monkeypatch, tmp_path):
    monkeypatch.setenv("ERP_OFFSITE_KIND", "filesystem")
    monkeypatch.setenv("ERP_OFFSITE_PATH", str(tmp_path))
    offsite = load_plan(DEFAULT_PLAN_PATH).offsite
    assert (offsite.kind, offsite.path) == ("filesystem", str(tmp_path))
    monkeypatch.setenv("ERP_OFFSITE_KIND", "tape")
    with pytest.raises(PlanError, match="plan.offsite.kind: must be 's3' or 'filesystem', got 'tape'"):
        load_plan(DEFAULT_PLAN_PATH)
