"""Pure PITR logic: commands, WAL names and LSNs, archive.log, continuity, archiver findings, recovery plans."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import zstandard
from pyrage import x25519

from erp_backup import crypto
from erp_backup.manifest import FileEntry, Manifest
from erp_backup.services import postgres
from erp_backup.services.base import PointInTimeUnavailable
from erp_backup.services.postgres import archiver, wal
from erp_backup.services.postgres import segments as wal_names
from erp_backup.services.postgres import snapshot as snap
from erp_backup.services.postgres.archiver import ArchiverStatus
from erp_backup.services.postgres.pitr import (
    RestoreError,
    SetLocator,
    TargetOutsideArchive,
    build_inventory,
    coverage,
    plan_recovery,
    recovery_settings,
    restore_command,
    stage_wal,
)
from erp_backup.services.postgres.segments import Segment
from erp_backup.services.postgres.wal import ArchivedFile, check_continuity
from erp_backup.sets import BackupSet
from tests.fixtures.factories import make_manifest

UTC = timezone.utc
MB16 = 16 * 1024 * 1024
T0 = datetime(2026, 1, 10, 0, 0, tzinfo=UTC)


def seg(segno: int, timeline: int = 1) -> Segment:
    return Segment(timeline, segno)


# --- commands ----------------------------------------------------------------------------------


def test_basebackup_command_streams_one_tar_with_wal_and_a_sha256_manifest() -> None:
    command = snap.basebackup_command(host="erp-db", port=5433, user="backup", password="s3cret", label="erp_backup 20260110T010000Z")
    assert command.argv == (
        "pg_basebackup",
        "--host=erp-db",
        "--port=5433",
        "--username=backup",
        "--no-password",
        "--pgdata=-",
        "--format=tar",
        "--wal-method=fetch",
        "--checkpoint=fast",
        "--manifest-checksums=SHA256",
        "--label=erp_backup 20260110T010000Z",
    )
    assert command.env == {"PGPASSWORD": "s3cret"}
    assert "s3cret" not in " ".join(command.argv) and "s3cret" not in command.describe()


def test_basebackup_command_options() -> None:
    command = snap.basebackup_command(
        host="h", port=5432, user="u", password=None, label="l", checkpoint="spread", max_rate="50M", binary="/opt/pg/bin/pg_basebackup"
    )
    assert command.argv[0] == "/opt/pg/bin/pg_basebackup"
    assert "--checkpoint=spread" in command.argv and command.argv[-1] == "--max-rate=50M"
    assert command.env == {}


def test_verify_and_controldata_commands(tmp_path: Path) -> None:
    bindir = Path("/usr/lib/postgresql/15/bin")
    assert snap.verifybackup_command(tmp_path, bindir).argv == (f"{bindir}/pg_verifybackup", str(tmp_path))
    assert snap.controldata_command(tmp_path, bindir).argv == (f"{bindir}/pg_controldata", str(tmp_path))


class FakeDockerAPI:
    """docker.APIClient at the API boundary: records exec calls, streams a scripted reply."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def exec_create(self, container: str, cmd: list[str], environment: dict | None = None, user: str = "", stdin: bool = False) -> dict:
        self.calls.append(("exec_create", container, tuple(cmd), dict(environment or {}), user))
        return {"Id": "exec-1"}

    def exec_start(self, exec_id: str, stream: bool = False, demux: bool = False) -> Any:
        self.calls.append(("exec_start", exec_id, stream, demux))
        return iter([(b"tar bytes", None), (None, b"WARNING: skipping special file\n")])

    def exec_inspect(self, exec_id: str) -> dict:
        return {"ExitCode": 0}


def test_docker_mode_runs_pg_basebackup_in_the_container_with_the_password_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    api = FakeDockerAPI()
    monkeypatch.setattr(snap, "docker_api", lambda conn_id=None, base_url=None: api)
    options = {"exec_mode": "docker", "container": "erp-postgres"}
    conn = type("Conn", (), {"host": "erp-db.example", "port": 15432})()
    host, port = snap.basebackup_target(conn, options)
    assert (host, port) == ("127.0.0.1", 5432)  # the server's own port, from inside the container
    command = snap.basebackup_command(host=host, port=port, user="backup", password="pw", label="l")
    executor = snap.executor_for(options)
    assert b"".join(executor.stream(command)) == b"tar bytes"
    assert api.calls[0] == ("exec_create", "erp-postgres", command.argv, {"PGPASSWORD": "pw"}, "postgres")
    assert api.calls[1] == ("exec_start", "exec-1", True, True)
    assert snap.basebackup_target(conn, {"exec_mode": "network"}) == ("erp-db.example", 15432)


def test_ebs_snapshot_request_tags_the_snapshot_with_the_backup_id() -> None:
    request = snap.ebs_snapshot_request("vol-0abc", "20260111T010000Z", {"team": "erp"})
    assert request["VolumeId"] == "vol-0abc"
    assert "20260111T010000Z" in request["Description"]
    assert request["TagSpecifications"] == [
        {
            "ResourceType": "snapshot",
            "Tags": [
                {"Key": "Name", "Value": "erp-postgres-20260111T010000Z"},
                {"Key": "erp_backup:backup_id", "Value": "20260111T010000Z"},
                {"Key": "erp_backup:service", "Value": "postgres"},
                {"Key": "team", "Value": "erp"},
            ],
        }
    ]


def test_ebs_snapshot_needs_a_volume_id() -> None:
    with pytest.raises(snap.SnapshotError, match="ebs_volume_id"):
        snap.take_ebs_snapshot({"ebs_snapshot": True}, "20260111T010000Z", hook=object())


def test_restore_command_and_recovery_settings() -> None:
    wal_dir = Path("/scratch/pitr 1/wal_restore")
    assert restore_command(wal_dir) == "zstd -d -q -f --no-progress -o %p '/scratch/pitr 1/wal_restore'/%f.zst"
    target = datetime(2026, 1, 10, 9, 30, 15, 250000, tzinfo=timezone(timedelta(hours=9)))
    assert recovery_settings(wal_dir, target) == {
        "restore_command": "'zstd -d -q -f --no-progress -o %p ''/scratch/pitr 1/wal_restore''/%f.zst'",
        "recovery_target_timeline": "'latest'",
        "recovery_target_action": "'promote'",
        "recovery_target_time": "'2026-01-10 00:30:15.250000+00:00'",
    }
    assert recovery_settings(wal_dir, None)["recovery_target_time"] == "''"


# --- names and LSNs ----------------------------------------------------------------------------


def test_segment_names_roll_over_after_ff() -> None:
    last_in_id = Segment.parse("0000000100000000000000FF")
    assert last_in_id.segno == 0xFF
    assert seg(0x100).name == "000000010000000100000000"
    assert Segment.parse("000000030000000A00000010") == Segment(3, 0xA * 0x100 + 0x10)
    assert Segment.parse("000000010000000000000003", 64 * 1024 * 1024) == Segment(1, 3, 64 * 1024 * 1024)
    assert Segment(1, 0x41, 64 * 1024 * 1024).name == "000000010000000100000001"  # 64 segments per xlogid
    with pytest.raises(ValueError, match="24 hex"):
        Segment.parse("00000001000000000000000g")
    with pytest.raises(ValueError, match="out of range"):
        Segment.parse("000000010000000000000040", 64 * 1024 * 1024)


def test_lsn_round_trip_and_segment_of_lsn() -> None:
    assert wal_names.parse_lsn("0/2000028") == 0x2000028
    assert wal_names.parse_lsn("1A/FF000000") == (0x1A << 32) | 0xFF000000
    assert wal_names.format_lsn(0x1A_FF000000) == "1A/FF000000"
    assert Segment.of_lsn(wal_names.parse_lsn("0/2000028"), 1).name == "000000010000000000000002"
    assert Segment.of_lsn(wal_names.parse_lsn("1/0"), 2).name == "000000020000000100000000"
    with pytest.raises(ValueError, match="not an LSN"):
        wal_names.parse_lsn("2000028")


def test_wal_file_kinds() -> None:
    assert wal_names.wal_file_kind("000000010000000000000002") == "segment"
    assert wal_names.wal_file_kind("00000002.history") == "history"
    assert wal_names.wal_file_kind("000000010000000000000002.00000028.backup") == "backup"
    assert wal_names.wal_file_kind("000000010000000000000009.partial") == "partial"
    assert wal_names.wal_file_kind("archive.log") is None
    assert wal_names.parse_history("1\t0/3000150\tbefore 2026-01-10 00:00:00+00\n\n2\t0/5000000\tno recovery target\n") == [
        (1, 0x3000150),
        (2, 0x5000000),
    ]


def test_base_end_segment_is_the_one_holding_the_byte_before_end_lsn() -> None:
    info = snap.BaseBackupInfo("l", "", 0x2000028, 0x3000000, 0x2000060, 1, MB16, None)
    assert (info.start_segment.name, info.end_segment.name) == ("000000010000000000000002", "000000010000000000000002")
    info = snap.BaseBackupInfo("l", "", 0x2000028, 0x3000100, 0x2000060, 1, MB16, None)
    assert info.end_segment.name == "000000010000000000000003"


# --- archive.log and windows -------------------------------------------------------------------


def test_archive_log_first_line_wins_and_malformed_lines_are_skipped(caplog: pytest.LogCaptureFixture) -> None:
    digest = "a" * 64
    text = (
        f"2026-01-10T00:00:01.5Z 000000010000000000000001 {digest} {MB16}\n"
        f"garbage line\n"
        f"2026-01-10T00:00:02Z 000000010000000000000001 {'b' * 64} {MB16}\n"
        f"2026-01-10T00:00:03Z not-a-wal-name {digest} 1\n"
        f"2026-01-10T00:00:04Z 00000002.history {digest} 41\n"
    )
    entries = wal.parse_archive_log(text)
    assert [(e.name, e.sha256[0]) for e in entries] == [("000000010000000000000001", "a"), ("00000002.history", "a")]
    assert entries[0].archived_at == datetime(2026, 1, 10, 0, 0, 1, 500000, tzinfo=UTC)
    assert caplog.text.count("skipping malformed line") == 2


def test_window_is_half_open_and_by_archive_time() -> None:
    entries = [ArchivedFile(seg(n).name, T0 + timedelta(hours=n), "a" * 64, MB16) for n in range(1, 8)]
    chosen = wal.files_in_window(entries, T0 + timedelta(hours=2), T0 + timedelta(hours=6))
    assert [e.name for e in chosen] == [seg(n).name for n in (2, 3, 4, 5)]
    assert wal.segment_size_of(entries) == MB16
    assert wal.segment_size_of([]) == wal_names.DEFAULT_SEGMENT_SIZE


def test_duration_option() -> None:
    assert wal.duration_option({"a": 60}, "a", timedelta(0)) == timedelta(seconds=60)
    assert wal.duration_option({"a": "10m"}, "a", timedelta(0)) == timedelta(minutes=10)
    assert wal.duration_option({"a": "90s"}, "a", timedelta(0)) == timedelta(seconds=90)
    assert wal.duration_option({}, "a", timedelta(hours=1)) == timedelta(hours=1)
    with pytest.raises(wal.WalBackupError, match="option a"):
        wal.duration_option({"a": "soon"}, "a", timedelta(0))


# --- continuity --------------------------------------------------------------------------------


def test_continuity_ok_across_a_set_boundary_and_the_ff_rollover() -> None:
    result = check_continuity(seg(0xFD), [seg(0xFE), seg(0xFF), seg(0x100)], {})
    assert result.ok


def test_gap_inside_the_window_names_each_missing_segment() -> None:
    result = check_continuity(None, [seg(1), seg(2), seg(5)], {})
    assert result.missing == [seg(3).name, seg(4).name]


def test_gap_after_the_previous_set() -> None:
    result = check_continuity(seg(9), [seg(11), seg(12)], {})
    assert result.missing == [seg(10).name]


def test_overlap_with_the_previous_set_is_not_a_gap() -> None:
    assert check_continuity(seg(9), [seg(8), seg(9), seg(10)], {}).ok


def test_timeline_switch_with_its_history_file() -> None:
    switches = {2: (1, 5 * MB16 + 0x150)}  # timeline 2 forks from 1 inside segment 5
    assert check_continuity(seg(4), [seg(5, 2), seg(6, 2)], switches).ok
    # Orphaned segments of the old timeline past the switch are fine too.
    assert check_continuity(seg(4), [seg(5, 1), seg(6, 1), seg(5, 2)], switches).ok


def test_timeline_switch_missing_segments_on_either_side() -> None:
    switches = {2: (1, 5 * MB16 + 0x150)}
    assert check_continuity(seg(2), [seg(6, 2)], switches).missing == [seg(3).name, seg(4).name, seg(5, 2).name]


def test_new_timeline_without_history_is_a_problem() -> None:
    result = check_continuity(seg(4), [seg(5, 2)], {})
    assert result.problems == [f"timeline 2 starts at {seg(5, 2).name} but 00000002.history is not in the archive"]


def test_first_set_ever_only_checks_inside_the_window() -> None:
    assert check_continuity(None, [seg(40), seg(41)], {}).ok


# --- archiver findings -------------------------------------------------------------------------


def status(**changes: Any) -> ArchiverStatus:
    base = dict(
        checked_at=T0 + timedelta(hours=6),
        server_version="15.8",
        archive_mode="on",
        archive_timeout_s=60,
        archived_count=100,
        last_archived_wal=seg(100).name,
        last_archived_time=T0 + timedelta(hours=6) - timedelta(seconds=30),
        failed_count=0,
        last_failed_wal=None,
        last_failed_time=None,
        stats_reset=T0 - timedelta(days=30),
        ready_count=0,
        oldest_ready=None,
        oldest_ready_since=None,
    )
    base.update(changes)
    return ArchiverStatus(**base)  # type: ignore[arg-type]


TIMEOUT, MARGIN = timedelta(seconds=60), timedelta(minutes=10)


def test_healthy_archiver_has_no_findings() -> None:
    assert archiver.archiver_findings(status(), None, TIMEOUT, MARGIN) == ([], [])


def test_archive_mode_off_is_a_problem() -> None:
    problems, _ = archiver.archiver_findings(status(archive_mode="off"), None, TIMEOUT, MARGIN)
    assert problems and "archive_mode is 'off'" in problems[0]


def test_failing_archiver_is_a_problem_naming_the_segment() -> None:
    now = T0 + timedelta(hours=6)
    failing = status(failed_count=3, last_failed_wal=seg(101).name, last_failed_time=now - timedelta(seconds=5))
    problems, _ = archiver.archiver_findings(failing, {"failed_count": 0, "stats_reset": failing.stats_reset.isoformat()}, TIMEOUT, MARGIN)
    assert len(problems) == 1 and f"last failure on {seg(101).name}" in problems[0]


def test_failed_count_growth_after_recovery_is_a_warning() -> None:
    now = T0 + timedelta(hours=6)
    recovered = status(failed_count=3, last_failed_wal=seg(99).name, last_failed_time=now - timedelta(minutes=5))
    previous = {"failed_count": 1, "stats_reset": recovered.stats_reset.isoformat()}
    problems, warnings = archiver.archiver_findings(recovered, previous, TIMEOUT, MARGIN)
    assert problems == [] and len(warnings) == 1 and "failed_count grew by 2" in warnings[0]
    assert archiver.archiver_findings(recovered, {**previous, "failed_count": 3}, TIMEOUT, MARGIN) == ([], [])


def test_stats_reset_counts_every_failure_since_the_reset() -> None:
    now = T0 + timedelta(hours=6)
    reset = status(failed_count=1, last_failed_time=now - timedelta(minutes=5), stats_reset=now - timedelta(hours=1))
    _, warnings = archiver.archiver_findings(reset, {"failed_count": 7, "stats_reset": (T0 - timedelta(days=30)).isoformat()}, TIMEOUT, MARGIN)
    assert warnings and "grew by 1" in warnings[0]


def test_a_segment_waiting_longer_than_timeout_plus_margin_is_a_problem() -> None:
    now = T0 + timedelta(hours=6)
    stuck = status(ready_count=4, oldest_ready=seg(101).name, oldest_ready_since=now - timedelta(minutes=12))
    problems, _ = archiver.archiver_findings(stuck, None, TIMEOUT, MARGIN)
    assert len(problems) == 1 and seg(101).name in problems[0] and "4 file(s) waiting" in problems[0]
    fresh = status(ready_count=1, oldest_ready=seg(101).name, oldest_ready_since=now - timedelta(minutes=10))
    assert archiver.archiver_findings(fresh, None, TIMEOUT, MARGIN) == ([], [])


def test_idle_server_with_an_old_last_archive_is_fine_when_nothing_waits() -> None:
    idle = status(last_archived_time=T0)
    assert archiver.archiver_findings(idle, None, TIMEOUT, MARGIN) == ([], [])


def test_without_pg_monitor_an_old_last_archive_is_a_problem() -> None:
    blind = status(last_archived_time=T0, ready_count=None)
    problems, _ = archiver.archiver_findings(blind, None, TIMEOUT, MARGIN)
    assert problems and "pg_monitor" in problems[0]


def test_server_archive_timeout_warnings() -> None:
    assert "archive_timeout is 0" in archiver.archiver_findings(status(archive_timeout_s=0), None, TIMEOUT, MARGIN)[1][0]
    assert "longer than the plan's 60s" in archiver.archiver_findings(status(archive_timeout_s=300), None, TIMEOUT, MARGIN)[1][0]


# --- base backup label and manifest ------------------------------------------------------------


def test_read_base_info_from_label_manifest_and_controldata(tmp_path: Path) -> None:
    (tmp_path / "backup_label").write_text(
        "START WAL LOCATION: 0/6000028 (file 000000020000000000000006)\nCHECKPOINT LOCATION: 0/6000060\n"
        "BACKUP METHOD: streamed\nBACKUP FROM: primary\nSTART TIME: 2026-01-11 01:00:02 UTC\n"
        "LABEL: erp_backup 20260111T010000Z\nSTART TIMELINE: 2\n"
    )
    (tmp_path / "backup_manifest").write_text(
        json.dumps({"WAL-Ranges": [{"Timeline": 2, "Start-LSN": "0/6000028", "End-LSN": "0/7000100"}]})
    )
    control = "Database system identifier:           7312345678901234567\nBytes per WAL segment:                16777216\n"
    info = snap.read_base_info(tmp_path, control)
    assert info.as_details() == {
        "label": "erp_backup 20260111T010000Z",
        "start_time": "2026-01-11 01:00:02 UTC",
        "start_lsn": "0/6000028",
        "end_lsn": "0/7000100",
        "checkpoint_lsn": "0/6000060",
        "timeline": 2,
        "start_segment": "000000020000000000000006",
        "end_segment": "000000020000000000000007",
        "wal_segment_size": MB16,
        "system_identifier": "7312345678901234567",
    }


def test_read_base_info_rejects_a_directory_without_label(tmp_path: Path) -> None:
    with pytest.raises(snap.SnapshotError, match="not a pg_basebackup base backup"):
        snap.read_base_info(tmp_path)


# --- recovery plans ----------------------------------------------------------------------------


def base_manifest(backup_id: str, start: int, end: int, finished: datetime) -> Manifest:
    return make_manifest(
        service="postgres", backup_type="snapshot", backup_id=backup_id,
        captured_started_at=finished - timedelta(minutes=5), captured_finished_at=finished + timedelta(minutes=2),
        files=[FileEntry("base.tar.zst", 1, "0" * 64)],
        details={"start_segment": seg(start).name, "end_segment": seg(end).name, "start_lsn": wal_names.format_lsn(seg(start).start_lsn + 0x28),
                 "wal_segment_size": MB16, "backup_end_time": finished.isoformat()},
    )


def wal_manifest(backup_id: str, segments: dict[int, datetime]) -> Manifest:
    records = [
        {"name": seg(n).name, "kind": "segment", "archived_at": when.isoformat(), "raw_size": MB16, "raw_sha256": "0" * 64, "file": f"wal/{seg(n).name}.zst"}
        for n, when in segments.items()
    ]
    return make_manifest(
        service="postgres", backup_type="wal", backup_id=backup_id, captured_started_at=T0,
        files=[FileEntry(r["file"], 1, "0" * 64) for r in records], details={"wal": records, "wal_segment_size": MB16},
    )


def hourly(first: int, last: int) -> dict[int, datetime]:
    """Segment n archived at T0 + n hours."""
    return {n: T0 + timedelta(hours=n) for n in range(first, last + 1)}


def test_plan_picks_the_newest_base_before_the_target() -> None:
    bases = [base_manifest("B1", 1, 1, T0 + timedelta(minutes=30)), base_manifest("B2", 5, 5, T0 + timedelta(hours=5, minutes=30))]
    inventory = build_inventory(bases, [wal_manifest("W1", hourly(2, 6)), wal_manifest("W2", hourly(7, 12))])
    plan = plan_recovery(inventory, T0 + timedelta(hours=8), lookahead=timedelta(hours=2))
    assert plan.base.backup_id == "B2"
    assert [f.name for f in plan.wal] == [seg(n).name for n in range(5, 11)]  # from the base start to target + lookahead
    assert plan.wal_sets == ["W1", "W2"]
    assert plan_recovery(inventory, T0 + timedelta(hours=3)).base.backup_id == "B1"


def test_a_gap_ends_what_a_base_covers_and_targets_past_it_are_rejected() -> None:
    bases = [base_manifest("B1", 1, 1, T0 + timedelta(minutes=30))]
    inventory = build_inventory(bases, [wal_manifest("W1", {**hourly(2, 4), **hourly(6, 9)})])
    [span] = coverage(inventory)
    assert (span.earliest, span.latest, span.last_segment) == (T0 + timedelta(minutes=30), T0 + timedelta(hours=4), seg(4).name)
    with pytest.raises(TargetOutsideArchive) as caught:
        plan_recovery(inventory, T0 + timedelta(hours=7))
    message = str(caught.value)
    assert "outside what the backups cover: 2026-01-10T00:30:00+00:00 .. 2026-01-10T04:00:00+00:00" in message


def test_targets_before_the_first_base_and_without_bases_are_rejected() -> None:
    inventory = build_inventory([base_manifest("B1", 3, 3, T0 + timedelta(hours=3))], [wal_manifest("W1", hourly(1, 6))])
    with pytest.raises(TargetOutsideArchive, match=r"cover: 2026-01-10T03:00:00\+00:00 \.\. 2026-01-10T06:00:00\+00:00"):
        plan_recovery(inventory, T0 + timedelta(hours=2))
    with pytest.raises(TargetOutsideArchive, match="no usable base backup"):
        plan_recovery(build_inventory([], [wal_manifest("W1", hourly(1, 6))]), T0 + timedelta(hours=2))
    with pytest.raises(RestoreError, match="no timezone"):
        plan_recovery(inventory, datetime(2026, 1, 10, 4))


def test_local_archive_extends_what_the_sets_cover() -> None:
    bases = [base_manifest("B1", 1, 1, T0 + timedelta(minutes=30))]
    archive = [(seg(n).name, T0 + timedelta(hours=n)) for n in range(4, 7)]
    inventory = build_inventory(bases, [wal_manifest("W1", hourly(2, 4))], archive)
    plan = plan_recovery(inventory, T0 + timedelta(hours=5, minutes=30))
    assert [(f.name, f.set_id) for f in plan.wal] == [
        (seg(2).name, "W1"), (seg(3).name, "W1"), (seg(4).name, "W1"), (seg(5).name, None), (seg(6).name, None)
    ]


# --- the service verb plan_point_in_time -------------------------------------------------------


def test_point_in_time_chain_names_the_base_and_the_wal_sets_to_replay() -> None:
    bases = [base_manifest("B1", 1, 1, T0 + timedelta(minutes=30)), base_manifest("B2", 5, 5, T0 + timedelta(hours=5, minutes=30))]
    wal_sets = [wal_manifest("W1", hourly(2, 6)), wal_manifest("W2", hourly(7, 12)), wal_manifest("W3", hourly(13, 14))]
    chain = postgres.plan_point_in_time([*wal_sets, *bases], T0 + timedelta(hours=6, minutes=30))  # + 6 h lookahead
    assert chain.base is bases[1]
    assert chain.sets == (("snapshot", "B2"), ("wal", "W1"), ("wal", "W2"))
    assert chain.replay_bytes == wal_sets[0].total_size + wal_sets[1].total_size
    assert chain.details["base_backup_id"] == "B2" and chain.details["wal_sets"] == ["W1", "W2"]
    assert chain.details["wal_bytes"] == chain.replay_bytes


def test_point_in_time_outside_the_archive_is_unavailable_with_the_covered_range() -> None:
    manifests = [base_manifest("B1", 1, 1, T0 + timedelta(minutes=30)), wal_manifest("W1", {**hourly(2, 4), **hourly(6, 9)})]
    for outside in (T0, T0 + timedelta(hours=7)):
        with pytest.raises(PointInTimeUnavailable, match=r"cover: 2026-01-10T00:30:00\+00:00 \.\. 2026-01-10T04:00:00\+00:00"):
            postgres.plan_point_in_time(manifests, outside)
    with pytest.raises(PointInTimeUnavailable, match="no usable base backup"):
        postgres.plan_point_in_time(manifests[1:], T0 + timedelta(hours=3))
    with pytest.raises(PointInTimeUnavailable, match="has no timezone"):
        postgres.plan_point_in_time(manifests, datetime(2026, 1, 10, 3))


# --- a sealed local archive (archive_wal.sh with ERP_WAL_RECIPIENTS_FILE) ---------------------------


def seal_like_archive_wal(data: bytes, recipient: str) -> bytes:
    """zstd, then age: the bytes archive_wal.sh stores as <name>.zst.age."""
    return crypto.encrypt_bytes(zstandard.ZstdCompressor().compress(data), [recipient])


@pytest.fixture
def sealed_archive(tmp_path: Path) -> tuple[Path, ArchivedFile, bytes, x25519.Identity]:
    identity = x25519.Identity.generate()
    data = (b"\x00WAL page of tenant_acme.orders" * 40000)[: 1 << 20]  # a 1 MiB segment
    sealed = seal_like_archive_wal(data, str(identity.to_public()))
    archive = tmp_path / "archive"
    archive.mkdir()
    name = seg(3).name
    (archive / f"{name}.zst.age").write_bytes(sealed)
    line = (f"2026-01-10T03:00:00Z {name} {hashlib.sha256(data).hexdigest()} {len(data)} "
            f"zst.age {hashlib.sha256(sealed).hexdigest()} {len(sealed)}\n")
    (archive / "archive.log").write_text(line)
    [entry] = wal.read_archive_log(archive)
    return archive, entry, data, identity


def test_a_sealed_archive_line_keeps_the_wal_files_own_hash_and_the_stored_ones(sealed_archive) -> None:
    archive, entry, data, _ = sealed_archive
    assert entry.sealed and entry.stored_name == f"{entry.name}.zst.age"
    assert (entry.sha256, entry.size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert entry.stored_size == (archive / entry.stored_name).stat().st_size
    bad = f"2026-01-10T03:00:00Z {entry.name} {'a' * 64} 5 gzip {'b' * 64} 5\n"
    assert wal.parse_archive_log(bad) == []


def test_a_sealed_file_ships_as_it_is_and_verifies_without_a_key(sealed_archive, tmp_path: Path) -> None:
    archive, entry, data, _ = sealed_archive
    backup_set = BackupSet(tmp_path / "root", "postgres", "wal", "20260110T060000Z")
    backup_set.path.mkdir(parents=True)
    file_entry, record = wal.ship_file(entry, archive, backup_set.path, level=3)
    assert file_entry.path == f"wal/{entry.name}.zst.age"
    assert (backup_set.path / file_entry.path).read_bytes() == (archive / entry.stored_name).read_bytes()
    assert record["sealed"] == "zst.age" and record["raw_sha256"] == hashlib.sha256(data).hexdigest()
    manifest = make_manifest(service="postgres", backup_type="wal", backup_id=backup_set.backup_id,
                             files=[file_entry], details={"wal": [record], "wal_segment_size": len(data)})
    assert wal.verify(backup_set, manifest) == []
    (backup_set.path / file_entry.path).write_bytes(b"age-encryption.org/v1\nsomething else")
    assert [p for p in wal.verify(backup_set, manifest) if "differs from the sealed" in p]


def test_a_damaged_sealed_file_is_not_shipped(sealed_archive, tmp_path: Path) -> None:
    archive, entry, _, _ = sealed_archive
    stored = archive / entry.stored_name
    stored.write_bytes(stored.read_bytes()[:-1] + b"!")
    set_dir = tmp_path / "set"
    set_dir.mkdir()
    with pytest.raises(wal.WalBackupError, match="the archived copy is damaged"):
        wal.ship_file(entry, archive, set_dir, level=3)
    assert not list((set_dir / "wal").iterdir())


def test_staging_a_sealed_file_unseals_it_with_the_identity_or_names_the_keys_tried(sealed_archive, tmp_path: Path) -> None:
    archive, entry, data, identity = sealed_archive
    bases = [base_manifest("B1", 2, 2, T0 + timedelta(hours=2, minutes=30))]
    inventory = build_inventory(bases, [], [(entry.name, entry.archived_at, True)])
    plan = plan_recovery(inventory, T0 + timedelta(hours=2, minutes=45))
    assert [(f.name, f.path, f.sealed) for f in plan.wal] == [(entry.name, entry.stored_name, True)]

    locator = SetLocator(tmp_path / "root", None, tmp_path / "work", identities=lambda: [identity])
    assert stage_wal(plan, inventory, locator, archive, tmp_path / "wal") == 1
    assert zstandard.ZstdDecompressor().decompress((tmp_path / "wal" / f"{entry.name}.zst").read_bytes()) == data

    stranger = x25519.Identity.generate()
    locator = SetLocator(tmp_path / "root", None, tmp_path / "work", identities=lambda: [stranger])
    with pytest.raises(RestoreError, match=f"{entry.name} in the local WAL archive was sealed .*\\("
                                           f"{crypto.fingerprint(str(stranger.to_public()))}"):
        stage_wal(plan, inventory, locator, archive, tmp_path / "wal2")
    assert not (tmp_path / "wal2" / f"{entry.name}.zst").exists()
