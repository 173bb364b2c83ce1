"""The soak: a simulated week of every schedule in the plan, with random faults, then a DR drill.

Every enabled job runs at its cron times through the real steps (real PostgreSQL, WAL
archiving, moto S3 behind a TCP proxy, a Slack receiver); the watchdog checks every hour.
Faults are drawn from SOAK_SEED: the source stopped, S3 refusing connections, a flipped
byte, a full staging disk, a backup SIGKILLed mid-write, an upload that crawls for hours.
Then: the watchdog flagged (and Slack heard of) every window that missed its RPO, no
verified set was lost, nothing corrupt was counted, staging stayed within its caps, and a
drill of the newest sets passes. `make soak` runs it longer (SOAK_DAYS, SOAK_SEED).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from erp_backup import staging
from erp_backup.checksum import find_problems
from erp_backup.offsite import offsite_from_plan
from erp_backup.plan import load_plan
from erp_backup.runs import RunInfo
from erp_backup.sets import BackupSet, SetState, list_sets
from tests.fixtures.s3 import ACCESS_KEY, REGION, SECRET_KEY
from tests.integration.dagrun import write_plan
from tests.integration.soak import faults as fault_schedule
from tests.integration.soak.clock import SimClock
from tests.integration.soak.estate import GitlabSource, MilvusSource, MinioSource, RabbitSource, RedisSource
from tests.integration.soak.proxy import TcpProxy
from tests.integration.soak.report import summary_table
from tests.integration.soak.runner import Soak, fire_times
from tests.integration.soak.sources import PostgresSource, Source, StagingDisk
from tests.integration.soak.truth import STALE_CODES, Truth, lost_sets

pytestmark = pytest.mark.integration

SOAK_DAYS = int(os.environ.get("SOAK_DAYS", "7"))
SOAK_SEED = int(os.environ.get("SOAK_SEED", "15"))
# A Monday 00:00 in Seoul, far enough in the past that every simulated WAL window has closed.
FIXED_START = datetime(2026, 1, 4, 15, 0, tzinfo=timezone.utc)
SOAK_SERVICES = tuple(os.environ.get("SOAK_SERVICES", "postgres,redis,rabbitmq,minio,milvus,gitlab").split(","))
CAPS = {"alert_after_days": 1, "max_unshipped_sets": 4, "max_unshipped_bytes": 64 * 1024 * 1024, "free_space_factor": 1.2}


def soak_start(days: int) -> datetime:
    latest = datetime.now(timezone.utc) - timedelta(days=days + 2)
    return FIXED_START if FIXED_START <= latest else (latest - timedelta(days=latest.weekday())).replace(
        hour=15, minute=0, second=0, microsecond=0)


def plan_edit(sources: list[Source], archive_dir: Path) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        options = {source.service: source.options() for source in sources}
        for name, service in data["services"].items():
            service["enabled"] = name in options
            if name in options:
                service["options"] = options[name]
        data["services"]["postgres"]["backups"]["wal"]["options"] = {"wal_archive_dir": str(archive_dir)}
        data["staging"] = dict(CAPS)
    return edit


def make_sources(tmp_path: Path, s3_endpoint, s3_bucket) -> list[Source]:
    makers = {
        "postgres": PostgresSource,
        "redis": lambda: RedisSource(tmp_path),
        "rabbitmq": RabbitSource,
        "minio": lambda: MinioSource(s3_endpoint, s3_bucket("erp-documents")),
        "milvus": lambda: MilvusSource(tmp_path),
        "gitlab": lambda: GitlabSource(tmp_path),
    }
    sources: list[Source] = []
    try:
        for name in ("postgres", *(n for n in SOAK_SERVICES if n != "postgres")):
            sources.append(makers[name]())
    except BaseException:
        for source in sources:
            source.close()
        raise
    return sources


@pytest.fixture
def soak_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_endpoint, s3_bucket, slack_receiver) -> Iterator[tuple]:
    sources = make_sources(tmp_path, s3_endpoint, s3_bucket)
    postgres = sources[0]
    disk = StagingDisk(tmp_path / "staging", monkeypatch)
    proxy = TcpProxy(int(s3_endpoint.url.rsplit(":", 1)[1]))
    bucket = s3_bucket("soak")
    plan_path = write_plan(tmp_path / "plan.yaml", edit=plan_edit(sources, postgres.archive_dir), bucket=bucket,
                           prefix="erp")
    monkeypatch.setenv("ERP_BACKUP_PLAN", str(plan_path))
    monkeypatch.setenv("ERP_BACKUP_ROOT", str(disk.path))
    monkeypatch.setenv("AIRFLOW_CONN_BACKUP_OFFSITE", json.dumps({
        "conn_type": "aws", "login": ACCESS_KEY, "password": SECRET_KEY,
        "extra": {"endpoint_url": proxy.url, "region_name": REGION},
    }))
    monkeypatch.setenv("AIRFLOW_CONN_SLACK_BACKUP_ALERTS", slack_receiver.conn_json())
    for source in sources:  # the drill's checks read the sources' connections like a task does
        for conn_id, conn in source.connections().items():
            monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", conn.as_json())
    try:
        yield sources, disk, proxy, load_plan(plan_path)
    finally:
        proxy.close()
        for source in sources:
            source.close()
        disk.unmount()


def record_removals(monkeypatch: pytest.MonkeyPatch, truth_holder: list[Truth], clock: SimClock) -> None:
    real_remove = BackupSet.remove

    def remove(self: BackupSet, reason: str) -> None:
        real_remove(self, reason)
        truth_holder[0].removed(self, reason, clock.now())

    monkeypatch.setattr(BackupSet, "remove", remove)


def test_a_simulated_week_with_random_faults(soak_env, monkeypatch, slack_receiver, capsys):
    sources, disk, proxy, plan = soak_env
    began = time.monotonic()
    start = soak_start(SOAK_DAYS)
    end = start + timedelta(days=SOAK_DAYS)
    fires = {job.dag_id: fire_times(job, start, end) for job in plan.enabled_jobs}
    faults = fault_schedule.draw(SOAK_SEED, fires, start, SOAK_DAYS, ["backup_postgres_full"])
    clock = SimClock(start)
    clock.install(monkeypatch)
    soak = Soak(plan, clock, sources, proxy, disk, faults, start, end, slack_receiver.texts)
    record_removals(monkeypatch, [soak.truth], clock)

    truth = soak.run()
    drill = drill_every_service(plan, end)
    elapsed = time.monotonic() - began

    table = summary_table(truth, plan, slack_receiver.texts(), drill, lost=lost_sets(truth, plan), scheduled=faults,
                          seed=SOAK_SEED, days=SOAK_DAYS, disk=disk.kind, elapsed_s=elapsed)
    with capsys.disabled():
        print("\n" + table)

    assert {fault.kind for fault, _ in truth.faults} == set(fault_schedule.PER_WEEK), truth.faults
    assert_rpo_misses_were_flagged_and_announced(truth)
    assert_no_verified_set_was_lost(truth, plan)
    assert_nothing_corrupt_was_counted(truth, plan)
    assert_staging_stayed_bounded(truth, plan)
    assert_killed_backups_left_only_dead_sets(truth, plan)
    assert_every_io_error_had_context(truth)
    assert drill["status"] == "passed", json.dumps(drill["services"], indent=2, default=str)
    assert {r["service"] for r in drill["services"]} == {job.service for job in plan.enabled_jobs}


def assert_rpo_misses_were_flagged_and_announced(truth: Truth) -> None:
    missed = truth.rpo_missed()
    unflagged = [(at, dag_id, why, truth.verdict(at, dag_id)) for at, dag_id, why in missed
                 if not (truth.verdict(at, dag_id)[0] and truth.verdict(at, dag_id)[1] & STALE_CODES)]
    assert unflagged == [], f"RPO missed but not flagged: {unflagged[:5]}"
    silent = [(at, dag_id) for at, dag_id, _ in missed if not announced_breach(truth, dag_id, at)]
    assert silent == [], f"RPO missed but Slack never told: {silent[:5]}"


def announced_breach(truth: Truth, dag_id: str, at: datetime) -> bool:
    """Slack heard a breach for the job at or before `at`, and no recovery since."""
    state = None
    for when, key, kind in truth.alerts:
        if when > at:
            break
        if key == dag_id:
            state = kind
    return state in ("breach", "changed")


def assert_no_verified_set_was_lost(truth: Truth, plan) -> None:
    assert lost_sets(truth, plan) == []


def assert_nothing_corrupt_was_counted(truth: Truth, plan) -> None:
    assert truth.flips and all(flip["caught"] for flip in truth.flips), truth.flips
    for flip in truth.flips:
        corrupt_until = flip["retaken_at"] or datetime.max.replace(tzinfo=timezone.utc)
        named = [c.at for c in truth.checks if flip["at"] <= c.at < corrupt_until
                 and c.verdicts[flip["dag_id"]][2] == flip["backup_id"]]
        assert named == [], f"the watchdog counted the corrupt {flip['backup_id']} as good at {named[:3]}"
    store = offsite_from_plan(plan)
    still_corrupt = {(f["dag_id"], f["backup_id"]) for f in truth.flips if f["retaken_at"] is None}
    for job in plan.enabled_jobs:
        for backup_set in list_sets(plan.backup_root, job.service, job.backup_type):
            if (job.dag_id, backup_set.backup_id) in still_corrupt:
                assert backup_set.state is SetState.CORRUPT
            elif backup_set.state.is_good:
                assert find_problems(backup_set.path, backup_set.manifest()) == [], backup_set.key
        for backup_id in store.list_backup_ids(job.service, job.backup_type):
            assert (job.dag_id, backup_id) not in still_corrupt
            manifest = store.read_manifest(job.service, job.backup_type, backup_id)
            if manifest is not None:
                assert store.verify_set(job.service, job.backup_type, backup_id, manifest) == [], backup_id


def assert_staging_stayed_bounded(truth: Truth, plan) -> None:
    cap = staging.limits(plan)
    over = {dag_id: most for dag_id, most in truth.most_unshipped.items()
            if most[0] > cap.max_sets or most[1] > cap.max_bytes}
    assert over == {}


def assert_killed_backups_left_only_dead_sets(truth: Truth, plan) -> None:
    assert truth.kills
    for kill in truth.kills:
        assert kill["state"] == SetState.INCOMPLETE.value and kill["marker"]["pid"] == kill["pid"], kill
    leftovers = [s.key for job in plan.enabled_jobs for s in list_sets(plan.backup_root, job.service, job.backup_type)
                 if s.state is SetState.INCOMPLETE]
    assert leftovers == []


def assert_every_io_error_had_context(truth: Truth) -> None:
    """A failed task's error names what failed: no bare OSError (set, file and free space, or a clear refusal)."""
    bare = ("OSError", "PermissionError", "FileExistsError", "FileNotFoundError", "IsADirectoryError")
    raw = [failure for failure in truth.failed_tasks if failure[3].startswith(tuple(f"{name}:" for name in bare))]
    assert raw == []


def drill_every_service(plan, end: datetime) -> dict:
    """The weekly drill (every service) at the soak's end: dr_drill's plain functions, in its order."""
    from erp_backup.drill import runner
    from erp_backup.drill.report import finish
    from erp_backup.drill.targets import drill_scratch_root

    run_id = "scheduled__soak-end"
    picks = runner.pick(plan, {"service": "all", "source": "offsite"}, RunInfo("dr_drill", run_id, end))
    runner.clean_leftovers(plan, run_id, "local")
    for chosen in picks:
        try:
            runner.start_target(plan, chosen)
            runner.fetch(plan, chosen)
            runner.restore(plan, chosen)
            runner.verify(plan, chosen)
        except Exception:  # noqa: BLE001 (recorded in the step records; the report says where it failed)
            pass
        finally:
            runner.teardown(plan, chosen)
    report = finish(plan, run_id)
    root = drill_scratch_root(plan)
    if root.exists() and not any(root.iterdir()):
        root.rmdir()
    return report
