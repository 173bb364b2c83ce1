"""The Backups page: its rows from real staging sets, a NAS offsite and a written ledger; the HTML; the login."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest

from erp_backup.backups_page.model import BREACHED, LATE, NO_SET, OK, build_page
from erp_backup.backups_page.render import render
from erp_backup.drill import ledger, records
from erp_backup.offsite import FilesystemOffsite
from erp_backup.sets import BackupSet, backup_id_for
from tests.fixtures.factories import drill_entry
from tests.unit.test_watchdog import NOW, make_offsite_set, plan_for

TZ_TEXT = "Times in Asia/Seoul"


@pytest.fixture
def nas(tmp_path: Path) -> FilesystemOffsite:
    (tmp_path / "nas").mkdir()
    return FilesystemOffsite(tmp_path / "nas")


def page_for(tmp_path: Path, nas: FilesystemOffsite, *ages_hours: float, rpo: str = "24h"):
    plan = plan_for(tmp_path, rpo=rpo)
    for hours in ages_hours:
        make_offsite_set(plan.backup_root, nas, NOW - timedelta(hours=hours))
    return plan, build_page(plan, NOW, nas, records.read_ledger(plan, nas))


@pytest.mark.parametrize(("ages", "rpo", "level"), [
    ((50, 2), "24h", OK),
    ((30,), "48h", LATE),  # the next daily run is overdue, the RPO not yet passed
    ((30,), "24h", BREACHED),
    ((), "24h", NO_SET),
])
def test_freshness_against_the_rpo(tmp_path, nas, ages, rpo, level) -> None:
    _, page = page_for(tmp_path, nas, *ages, rpo=rpo)
    (row,) = page.jobs
    assert row.freshness == level
    html = render(page)
    assert re.search(rf'data-job="postgres/full".*?data-freshness="{level}"><span class="badge" style="background:#\w+">'
                     rf"{level}</span>", html, re.S)


def test_the_newest_set_is_the_newest_capture_and_shows_slot_and_capture_time(tmp_path, nas) -> None:
    plan = plan_for(tmp_path)
    make_offsite_set(plan.backup_root, nas, NOW - timedelta(hours=20))
    backfilled = make_offsite_set(plan.backup_root, nas, NOW - timedelta(hours=1),
                                  backup_id=backup_id_for(NOW - timedelta(days=3)))  # a past slot, captured now

    page = build_page(plan, NOW, nas, [])

    (row,) = page.jobs
    assert row.newest is not None and row.newest.backup_id == backfilled.backup_id
    assert [p.backup_id for p in row.sizes][-1] == backfilled.backup_id and len(row.sizes) == 2
    assert row.age == timedelta(hours=1)
    html = render(page)
    assert f"{backfilled.backup_id}<br><span class='muted'>captured 2026-03-11 04:00 KST" in html
    assert TZ_TEXT in html and "<polyline" in html


def test_problem_sets_on_staging_are_counted(tmp_path, nas) -> None:
    plan = plan_for(tmp_path)
    make_offsite_set(plan.backup_root, nas, NOW - timedelta(hours=2))
    unverified = make_offsite_set(plan.backup_root, None, NOW - timedelta(hours=5))
    (unverified.path / "SHA256SUMS").unlink()
    corrupt = make_offsite_set(plan.backup_root, None, NOW - timedelta(hours=6))
    (corrupt.path / "CHECKSUM_FAILED").write_text("globals.sql.zst")
    BackupSet(plan.backup_root, "postgres", "full", backup_id_for(NOW - timedelta(hours=7))).create_dir()

    (row,) = build_page(plan, NOW, nas, []).jobs

    assert (row.incomplete, row.unverified, row.corrupt) == (1, 1, 1)


def test_drills_per_service_from_the_ledger(tmp_path, nas) -> None:
    plan = plan_for(tmp_path)
    ledger.append(records.ledger_path(plan), [
        drill_entry("postgres", run_id="a", backup_type="full", backup_id="20260301T170000Z",
                    finished_at=NOW - timedelta(days=7), rto_measured_s=80.0, rto_extrapolated_s=200.0,
                    rto_target_s=7200.0),
        drill_entry("postgres", "failed", run_id="b", backup_type="full", backup_id="20260308T170000Z",
                    failed_step="verify", finished_at=NOW - timedelta(days=1)),
    ])

    page = build_page(plan, NOW, nas, records.read_ledger(plan, nas))

    (service,) = page.services
    assert service.last_drill is not None and service.last_drill.run_id == "b"
    assert [d.run_id for d in service.drills] == ["a", "b"] and service.rto_target == timedelta(hours=2)
    html = render(page)
    row = re.search(r'<tr data-service="postgres">(.*?)</tr>', html, re.S)
    assert row is not None
    assert ">failed</span> 2026-03-10 05:00 KST" in row.group(1) and "failed at verify" in row.group(1)
    assert row.group(1).count("<circle") == 1 and row.group(1).count(">×</text>") == 1  # one RTO, one failure


def test_an_unreachable_offsite_is_a_banner_not_an_error(tmp_path) -> None:
    plan = plan_for(tmp_path, offsite_path=tmp_path / "missing")
    page = build_page(plan, NOW, FilesystemOffsite(tmp_path / "missing"), [])
    html = render(page)
    assert page.offsite_error and "unreachable" in html and 'data-freshness="unknown"' in html


def test_the_page_never_prints_none(tmp_path, nas) -> None:
    _, page = page_for(tmp_path, nas)
    assert not re.search(r"\bNone\b", render(page))


def test_the_plugin_route_refuses_a_request_without_airflows_login() -> None:
    from fastapi.testclient import TestClient

    import erp_backups_plugin

    response = TestClient(erp_backups_plugin.app).get("/")
    assert response.status_code == 401 and response.json() == {"detail": "Not authenticated"}
    assert erp_backups_plugin.ErpBackupsPlugin.external_views[0]["href"] == "/erp-backups/"


def test_short_rtos_are_shown_in_seconds() -> None:
    from erp_backup.backups_page.render import seconds_text

    assert (seconds_text(3.24), seconds_text(7200), seconds_text(None)) == ("3.2 s", "2h", "–")
