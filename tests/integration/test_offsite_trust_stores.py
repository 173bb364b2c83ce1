"""Tampered offsite manifests on moto S3 and on a NAS directory: every consumer treats the set as suspect.

For each store and each tampering (one edited file hash, a capture back-dated by 489 days,
a deleted manifest): retention keeps the set, the watchdog alerts once, `list --from offsite`
shows it as suspect, the drill does not pick it, and asked for it by id, the drill says the
manifest, not a data file, is at fault.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from zoneinfo import ZoneInfo
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from croniter import croniter

from erp_backup import cli, retention
from erp_backup.drill import runner
from erp_backup.drill.params import DrillParamError
from erp_backup.manifest import MANIFEST_NAME
from erp_backup.runs import RunInfo
from erp_backup.offsite import RECORDS_DIR, FilesystemOffsite, S3Offsite, offsite_from_plan
from erp_backup.offsite_s3 import SHA256_METADATA
from erp_backup.offsite_trust import check_offsite_set
from erp_backup.plan import Plan, load_plan
from erp_backup.sets import BackupSet, SetState
from erp_backup.watchdog import announce, check
from tests.fixtures.s3 import S3Endpoint
from tests.integration.dagrun import write_plan
from tests.unit.test_watchdog import make_offsite_set

pytestmark = pytest.mark.integration

UTC = timezone.utc
PREFIX = "erp"


def only_postgres_full(data: dict) -> None:
    for name, service in data["services"].items():
        service["enabled"] = name == "postgres"
        for type_name, backup in service["backups"].items():
            backup["enabled"] = name == "postgres" and type_name == "full"
    data["services"]["postgres"]["rpo"] = "24h"


@dataclass
class Offsite:
    """One store, and how to tamper with a set's offsite manifest behind the uploader's back."""

    kind: str
    plan: Plan
    store: Any
    s3: S3Endpoint | None = None

    def _object(self, backup_set: BackupSet) -> str:
        return f"{PREFIX}/{backup_set.key}/{MANIFEST_NAME}"

    def manifest(self, backup_set: BackupSet) -> dict:
        if self.s3 is not None:
            body = self.s3.client().get_object(Bucket=self.plan.offsite.bucket, Key=self._object(backup_set))["Body"]
            return json.loads(body.read())
        return json.loads((self.store.root / backup_set.key / MANIFEST_NAME).read_text())

    def put_manifest(self, backup_set: BackupSet, data: dict) -> None:
        """Store an edited manifest and forge its upload record, as someone who knows the scheme would."""
        body = json.dumps(data, indent=2).encode()
        digest = hashlib.sha256(body)
        if self.s3 is not None:
            self.s3.client().put_object(
                Bucket=self.plan.offsite.bucket, Key=self._object(backup_set), Body=body,
                Metadata={SHA256_METADATA: digest.hexdigest()},
                ChecksumSHA256=base64.b64encode(digest.digest()).decode(),
            )
            return
        (self.store.root / backup_set.key / MANIFEST_NAME).write_bytes(body)
        (self.store.root / RECORDS_DIR / backup_set.key / MANIFEST_NAME).write_text(digest.hexdigest())

    def delete_manifest(self, backup_set: BackupSet) -> None:
        if self.s3 is not None:
            self.s3.client().delete_object(Bucket=self.plan.offsite.bucket, Key=self._object(backup_set))
        else:
            (self.store.root / backup_set.key / MANIFEST_NAME).unlink()


@pytest.fixture(params=["filesystem", "s3"])
def offsite(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Offsite:
    staging = tmp_path / "staging"
    monkeypatch.setenv("ERP_BACKUP_ROOT", str(staging))
    if request.param == "s3":
        s3 = request.getfixturevalue("s3_endpoint")
        bucket = request.getfixturevalue("s3_bucket")("trust")
        monkeypatch.setenv("AIRFLOW_CONN_BACKUP_OFFSITE", s3.conn_json())
        plan_path = write_plan(tmp_path / "plan.yaml", only_postgres_full, kind="s3", bucket=bucket, prefix=PREFIX)
    else:
        s3 = None
        (tmp_path / "nas").mkdir()
        plan_path = write_plan(tmp_path / "plan.yaml", only_postgres_full, kind="filesystem", path=str(tmp_path / "nas"))
    monkeypatch.setenv("ERP_BACKUP_PLAN", str(plan_path))
    plan = load_plan(plan_path)
    store = offsite_from_plan(plan)
    assert isinstance(store, S3Offsite if s3 else FilesystemOffsite)
    return Offsite(request.param, plan, store, s3)


def edit_one_hash(offsite: Offsite, victim: BackupSet) -> None:
    data = offsite.manifest(victim)
    data["files"][0]["sha256"] = "0" * 64
    offsite.put_manifest(victim, data)


def back_date_489_days(offsite: Offsite, victim: BackupSet) -> None:
    data = offsite.manifest(victim)
    for field in ("captured_started_at", "captured_finished_at"):
        data[field] = (datetime.fromisoformat(data[field]) - timedelta(days=489)).isoformat()
    offsite.put_manifest(victim, data)


def delete(offsite: Offsite, victim: BackupSet) -> None:
    offsite.delete_manifest(victim)


TAMPERINGS: dict[str, Callable[[Offsite, BackupSet], None]] = {
    "edited": edit_one_hash, "back-dated": back_date_489_days, "deleted": delete,
}


@pytest.mark.parametrize("tampering", sorted(TAMPERINGS))
def test_a_tampered_offsite_manifest_is_suspect_everywhere(offsite: Offsite, tampering: str) -> None:
    plan = offsite.plan
    job = plan.job("postgres", "full")
    # Ten minutes after the job's last fire: its next set is not due yet, so only the tampering is reported,
    # whatever the time of day the test runs at (a wall-clock now made it overdue between 18:00 and 20:00 UTC).
    last_fire = croniter(job.schedule, datetime.now(ZoneInfo(job.timezone))).get_prev(datetime)
    now = last_fire.astimezone(UTC) + timedelta(minutes=10)
    good = make_offsite_set(plan.backup_root, offsite.store, now - timedelta(hours=3))
    victim = make_offsite_set(plan.backup_root, offsite.store, now - timedelta(hours=2))
    announce(plan, check(plan, now, offsite.store), send=lambda conn, text: True)  # all fine: nothing to say
    TAMPERINGS[tampering](offsite, victim)

    # retention: kept, with the reason
    report = retention.prune(plan.job("postgres", "full"), plan.backup_root, offsite.store, now, dry_run=False)
    kept = {d.backup_id: d.reason for d in report.offsite if not d.delete}
    assert victim.backup_id in kept and kept[victim.backup_id].startswith("suspect, never pruned")
    assert report.offsite_deleted == [] and victim.path.is_dir()

    # the watchdog: one alert naming the set, then quiet
    sent: list[str] = []
    statuses = check(plan, now, offsite.store)
    announce(plan, statuses, send=lambda conn, text: sent.append(text) or True)
    announce(plan, check(plan, now + timedelta(minutes=5), offsite.store), send=lambda conn, text: sent.append(text) or True)
    codes = [reason.code for reason in statuses[0].reasons]
    assert codes == (["offsite_missing"] if tampering == "deleted" else ["suspect"])
    assert statuses[0].newest_id == good.backup_id
    assert len(sent) == 1 and victim.backup_id in sent[0] and "postgres/full breach" in sent[0]

    # list --from offsite
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["list", "postgres", "full", "--from", "offsite", "--json"], stdout=out, stderr=err) == 0
    states = {row["backup_id"]: (row["state"], row["note"]) for row in json.loads(out.getvalue())}
    assert states[good.backup_id][0] == "offsite"
    assert states[victim.backup_id][0] == "suspect" and states[victim.backup_id][1]

    # the drill: never picked, and refused by id with the manifest named as the fault
    picks = runner.pick(plan, {"service": "postgres", "source": "offsite"}, RunInfo("dr_drill", "manual__trust", now),
                        offsite=offsite.store)
    assert [p["backup_id"] for p in picks] == [good.backup_id]
    with pytest.raises(DrillParamError) as refused:
        runner.pick(plan, {"service": "postgres", "source": "offsite", "backup_id": victim.backup_id},
                    RunInfo("dr_drill", "manual__trust_by_id", now), offsite=offsite.store)
    message = str(refused.value)
    assert f"backup postgres/full/{victim.backup_id}" in message and "is suspect and cannot be drilled" in message
    assert "offsite manifest, not a data file, is at fault" in message


def test_retention_would_have_deleted_the_back_dated_set_had_it_been_trusted(offsite: Offsite) -> None:
    """The issue's case: '489 days old > 30 days'. The same manifest, trusted, is deleted; checked, kept."""
    plan, now = offsite.plan, datetime.now(UTC)
    make_offsite_set(plan.backup_root, offsite.store, now - timedelta(hours=3))
    victim = make_offsite_set(plan.backup_root, offsite.store, now - timedelta(hours=2))
    back_date_489_days(offsite, victim)
    job = plan.job("postgres", "full")

    trusted = [retention.SetRecord(r.backup_id, SetState.OFFSITE, datetime.fromisoformat(
        offsite.manifest(BackupSet(plan.backup_root, "postgres", "full", r.backup_id))["captured_finished_at"]), True)
        for r in retention.offsite_records(offsite.store, "postgres", "full", plan.backup_root)]
    naive = {d.backup_id: d for d in retention.decide(trusted, job.retention, now, require_offsite=False)}
    assert naive[victim.backup_id].delete and "489" in naive[victim.backup_id].reason

    checked = retention.prune(job, plan.backup_root, offsite.store, now, dry_run=False)
    assert victim.backup_id not in checked.offsite_deleted
    assert victim.backup_id in offsite.store.list_backup_ids("postgres", "full")


def test_without_staging_the_store_record_and_the_object_timestamp_decide(offsite: Offsite) -> None:
    """Staging has pruned the set: no receipt. The stored SHA-256 vouches for it; a forged one is caught by time."""
    plan, now = offsite.plan, datetime.now(UTC)
    victim = make_offsite_set(plan.backup_root, offsite.store, now - timedelta(hours=2))
    shutil.rmtree(victim.path)
    result = check_offsite_set(offsite.store, "postgres", "full", victim.backup_id, plan.backup_root)
    assert result.state is SetState.OFFSITE and result.vouched_by == "store record"

    back_date_489_days(offsite, victim)  # with a forged record: only the object's own timestamp disagrees
    result = check_offsite_set(offsite.store, "postgres", "full", victim.backup_id, plan.backup_root)
    assert result.state is SetState.SUSPECT and "back-dated?" in result.why and "489 days" in result.why
