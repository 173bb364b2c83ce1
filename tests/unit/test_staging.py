"""Bounded staging on real directories: caps on never-offsite sets, the free-space check, the late-upload alert."""

from __future__ import annotations

import shutil
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from erp_backup import staging
from erp_backup.checksum import verify_and_seal
from erp_backup.manifest import FileEntry, sha256_file, write_manifest
from erp_backup.offsite import FilesystemOffsite
from erp_backup.plan import DEFAULT_PLAN_PATH, Plan, PlanError, parse_plan
from erp_backup.sets import BackupSet, SetState, backup_id_for
from erp_backup.watchdog import check
from tests.fixtures.factories import make_manifest

UTC = timezone.utc
NOW = datetime(2026, 3, 20, 3, 0, tzinfo=UTC)


def plan_with(tmp_path: Path, **limits: object) -> Plan:
    data = yaml.safe_load(DEFAULT_PLAN_PATH.read_text())
    for name, service in data["services"].items():
        service["enabled"] = name == "postgres"
        for type_name, backup in service["backups"].items():
            backup["enabled"] = type_name == "full"
    data["staging"] = limits
    data["offsite"].update(kind="filesystem", path=str(tmp_path / "nas"))
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    (tmp_path / "nas").mkdir(exist_ok=True)
    return replace(parse_plan(path, data), backup_root=tmp_path / "staging")


def make_set(plan: Plan, finished: datetime, *, size: int = 100, state: SetState = SetState.VERIFIED,
             declared_size: int | None = None) -> BackupSet:
    backup_set = BackupSet(plan.backup_root, "postgres", "full", backup_id_for(finished))
    backup_set.create_dir()
    data = backup_set.path / "globals.sql.zst"
    data.write_bytes(backup_set.backup_id.encode().ljust(size, b"."))
    real_size, sha256 = sha256_file(data)
    write_manifest(backup_set.path, make_manifest(
        backup_id=backup_set.backup_id, captured_started_at=finished - timedelta(minutes=5), captured_finished_at=finished,
        files=[FileEntry("globals.sql.zst", declared_size or real_size, sha256)],
    ))
    if state is SetState.UNVERIFIED:
        return backup_set
    if state is SetState.CORRUPT:
        backup_set.mark_corrupt(["globals.sql.zst: sha256 mismatch"])
        return backup_set
    verify_and_seal(backup_set)
    if state is SetState.OFFSITE:
        FilesystemOffsite(plan.offsite.path).upload_set(backup_set)
    assert backup_set.state is state
    return backup_set


def days_ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


def ids(sets: list[BackupSet]) -> list[str]:
    return [s.backup_id for s in sets]


def test_limits_default_and_come_from_the_plan(tmp_path: Path):
    assert staging.limits(plan_with(tmp_path)) == staging.StagingLimits()
    plan = plan_with(tmp_path, alert_after_days=3, max_unshipped_sets=4, max_unshipped_bytes=5000, free_space_factor=1.5)
    assert staging.limits(plan) == staging.StagingLimits(timedelta(days=3), 4, 5000, 1.5)
    committed = yaml.safe_load(DEFAULT_PLAN_PATH.read_text())["staging"]
    assert set(committed) == {"alert_after_days", "max_unshipped_sets", "max_unshipped_bytes", "free_space_factor"}


@pytest.mark.parametrize("limits, field", [
    ({"max_unshipped_sets": 0}, "max_unshipped_sets"),
    ({"max_unshipped_bytes": "lots"}, "max_unshipped_bytes"),
    ({"free_space_factor": True}, "free_space_factor"),
    ({"max_sets": 3}, "max_sets"),
])
def test_bad_limits_name_the_file_and_field(tmp_path: Path, limits: dict, field: str):
    plan = plan_with(tmp_path, **limits)
    with pytest.raises(PlanError, match=rf"{plan.path}: plan\.staging\.{field}: "):
        staging.limits(plan)


def test_the_count_cap_removes_corrupt_then_the_oldest_never_offsite_sets(tmp_path: Path, monkeypatch):
    posted: list[str] = []
    monkeypatch.setattr("erp_backup.notify.send", lambda conn_id, text: posted.append(text) or True)
    plan = plan_with(tmp_path, max_unshipped_sets=3)
    shipped = make_set(plan, days_ago(9), state=SetState.OFFSITE)
    oldest = make_set(plan, days_ago(8))
    corrupt = make_set(plan, days_ago(7), state=SetState.CORRUPT)
    middle = make_set(plan, days_ago(6), state=SetState.UNVERIFIED)
    newest = make_set(plan, days_ago(5))
    job = plan.job("postgres", "full")

    removed = staging.enforce_caps(plan, job, NOW, incoming=100, keep="20260320T020000Z")

    assert removed == [corrupt.backup_id, oldest.backup_id]  # 4 waiting -> 2, so the next makes 3
    assert ids(staging.unshipped(plan.backup_root, job)) == [middle.backup_id, newest.backup_id]
    assert shipped.path.exists()
    (text,) = posted
    assert "staging cap reached" in text and f"{corrupt.backup_id}, {oldest.backup_id}" in text


def test_the_byte_cap_counts_the_incoming_set_and_spares_the_newest_good_one(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("erp_backup.notify.send", lambda conn_id, text: True)
    plan = plan_with(tmp_path)
    first = make_set(plan, days_ago(3), size=1000)
    second = make_set(plan, days_ago(2), size=1000)
    both = staging.set_bytes(first.path) + staging.set_bytes(second.path)  # data, manifest and SHA256SUMS
    assert both > 2000
    plan = plan_with(tmp_path, max_unshipped_bytes=both + 400)
    job = plan.job("postgres", "full")
    assert staging.enforce_caps(plan, job, NOW, incoming=400, keep="x") == []
    assert staging.enforce_caps(plan, job, NOW, incoming=401, keep="x") == [first.backup_id]
    # Alone over the cap, the newest good set is still the only copy: kept, and the caller is told.
    assert staging.enforce_caps(plan, job, NOW, incoming=both * 10, keep="x") == []
    assert second.path.exists()


def test_free_space_refuses_naming_root_free_and_needed_bytes(tmp_path: Path):
    plan = plan_with(tmp_path, free_space_factor=2)
    job = plan.job("postgres", "full")
    upcoming = BackupSet(plan.backup_root, "postgres", "full", backup_id_for(NOW))
    assert staging.check_free_space(plan, job, upcoming) == 0  # nothing to compare with yet
    make_set(plan, days_ago(1), size=100)
    assert staging.check_free_space(plan, job, upcoming) == 200
    huge = 1 << 60  # the last set claims more than any disk holds: the real free space cannot fit it
    last = make_set(plan, days_ago(0.5), declared_size=huge, state=SetState.UNVERIFIED)
    with pytest.raises(staging.StagingFull) as caught:
        staging.check_free_space(plan, job, upcoming)
    message = str(caught.value)
    free = shutil.disk_usage(plan.backup_root).free
    assert f"not enough free space under {plan.backup_root} for postgres/full/{upcoming.backup_id}" in message
    assert f"bytes free, {2 * huge} bytes needed" in message and f"the last set {last.backup_id}" in message
    assert int(message.split(": ")[1].split(" bytes free")[0]) == pytest.approx(free, rel=0.01)


def test_the_watchdog_flags_sets_that_did_not_reach_offsite_after_n_days(tmp_path: Path):
    plan = plan_with(tmp_path, alert_after_days=2)
    nas = FilesystemOffsite(plan.offsite.path)
    make_set(plan, NOW - timedelta(hours=3), state=SetState.OFFSITE)
    late = make_set(plan, days_ago(2.5))
    make_set(plan, days_ago(1))  # not late yet
    make_set(plan, days_ago(4), state=SetState.CORRUPT)  # the corrupt rule reports these, not this one

    job_row, _ = check(plan, NOW, nas)

    unshipped = [r for r in job_row.reasons if r.code == "unshipped"]
    assert len(unshipped) == 1 and f"never reached offsite 2 day(s) after capture: {late.backup_id} " in unshipped[0].text
    assert staging.unshipped_alerts(plan, plan.job("postgres", "full"), days_ago(2)) == []


def test_the_one_listing_states_agree_with_each_sets_own_state(tmp_path: Path):
    from erp_backup.sets import FAILED_NAME, OFFSITE_RECEIPT_NAME, SUMS_NAME, staging_states

    markers = {
        SetState.INCOMPLETE: [], SetState.UNVERIFIED: ["manifest.json"],
        SetState.CORRUPT: ["manifest.json", FAILED_NAME], SetState.VERIFIED: ["manifest.json", SUMS_NAME],
        SetState.OFFSITE: ["manifest.json", SUMS_NAME, OFFSITE_RECEIPT_NAME],
    }
    for hour, (expected, names) in enumerate(markers.items()):
        backup_set = BackupSet(tmp_path, "postgres", "full", backup_id_for(NOW + timedelta(hours=hour)))
        backup_set.create_dir()
        (backup_set.path / "data.bin").write_bytes(b"x")
        for name in names:
            (backup_set.path / name).write_text("{}")
        assert backup_set.state is expected
    (tmp_path / "postgres" / "full" / "not-a-set").mkdir()
    states = staging_states(tmp_path, "postgres", "full")
    assert sorted(states.values(), key=list(markers).index) == list(markers)
    assert all(BackupSet(tmp_path, "postgres", "full", bid).state is state for bid, state in states.items())
    assert staging_states(tmp_path, "redis", "rdb") == {}
