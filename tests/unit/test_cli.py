"""The restore CLI in-process, on real sets in tmp dirs and a filesystem (NAS) offsite store.

PostgreSQL restores, S3 offsite and the run-as-a-subprocess-with-Airflow-down
checks are in tests/integration/test_cli.py.
"""

from __future__ import annotations

import io
import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest
import zstandard

from erp_backup import cli
from erp_backup.drill import ledger
from erp_backup.drill.ledger import DrillLedgerEntry
from erp_backup.offsite import FilesystemOffsite
from erp_backup.sets import FAILED_NAME, SUMS_NAME, BackupSet, SetState
from tests.fixtures.factories import drill_entry
from tests.integration.dagrun import write_plan
from tests.unit.test_offsite_fs import flip_byte, make_verified_set

ID_OLD, ID_NEW, ID_BROKEN = "20260101T020000Z", "20260102T020000Z", "20260103T020000Z"
FILES = {"globals.sql.zst": zstandard.compress(b"CREATE ROLE x;\n"), "databases/erp.dump.zst": zstandard.compress(b"d" * 5000)}


class TtyBuffer(io.StringIO):
    def isatty(self) -> bool:
        return True


def run(*argv: str, tty: bool = False) -> tuple[int, str, str]:
    out, err = io.StringIO(), TtyBuffer() if tty else io.StringIO()
    code = cli.main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """Staging with one set in each state: two verified (one also offsite), unverified, corrupt, incomplete."""
    staging = tmp_path / "staging"
    make_verified_set(staging, FILES, backup_id=ID_OLD)
    offsite_set = make_verified_set(staging, FILES, backup_id=ID_NEW)
    offsite_set.write_offsite_receipt({"description": "file:///nas"})
    unverified = make_verified_set(staging, {"dump.rdb.zst": b"rdb"}, service="redis", backup_type="rdb")
    (unverified.path / SUMS_NAME).unlink()
    corrupt = make_verified_set(staging, {"definitions.json": b"{}"}, service="rabbitmq", backup_type="definitions")
    corrupt.mark_corrupt(["definitions.json: sha256 0 != manifest 1"])
    BackupSet(staging, "postgres", "full", ID_BROKEN).create_dir()
    (staging / "postgres/full" / ID_BROKEN / "globals.sql.zst").write_bytes(b"partial")
    return staging


@pytest.fixture
def nas(tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch) -> FilesystemOffsite:
    """A NAS offsite store holding ID_OLD complete and ID_BROKEN without its manifest; the plan points at it."""
    store_root = tmp_path / "nas"
    store_root.mkdir()
    store = FilesystemOffsite(store_root)
    store.upload_set(BackupSet(root, "postgres", "full", ID_OLD))
    partial = store_root / "postgres/full" / ID_BROKEN
    partial.mkdir(parents=True)
    (partial / "globals.sql.zst").write_bytes(b"partial")
    plan = write_plan(tmp_path / "plan.yaml", lambda data: data["offsite"].update(kind="filesystem", path=str(store_root)))
    monkeypatch.setenv("ERP_BACKUP_PLAN", str(plan))
    monkeypatch.delenv("ERP_OFFSITE_PATH", raising=False)
    return store


# --- list ------------------------------------------------------------------------------------------


def test_list_shows_every_set_with_its_state_size_and_file_count(root: Path) -> None:
    code, out, _ = run("list", "--root", str(root), "--json")

    assert code == 0
    rows = {(r["service"], r["backup_id"]): r for r in json.loads(out)}
    assert {key: r["state"] for key, r in rows.items()} == {
        ("postgres", ID_OLD): "verified", ("postgres", ID_NEW): "offsite", ("postgres", ID_BROKEN): "incomplete",
        ("redis", ID_OLD): "unverified", ("rabbitmq", ID_OLD): "corrupt",
    }
    complete = rows[("postgres", ID_OLD)]
    assert complete["size"] == sum(len(data) for data in FILES.values()) and complete["files"] == 2
    assert complete["captured_at"] == "2026-01-01T02:03:00+00:00"
    assert rows[("postgres", ID_BROKEN)]["captured_at"] is None and rows[("postgres", ID_BROKEN)]["size"] == 7

    code, out, _ = run("list", "postgres", "full", "--root", str(root))
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["SERVICE", "TYPE", "BACKUP_ID", "STATE", "CAPTURED", "(UTC)", "SIZE", "FILES"]
    assert [line.split()[2:4] for line in lines[1:]] == [[ID_OLD, "verified"], [ID_NEW, "offsite"], [ID_BROKEN, "incomplete"]]
    assert "2026-01-01 02:03:00Z" in lines[1]


@pytest.mark.parametrize(("argv", "message"), [
    (("list", "postgress"), "unknown service 'postgress' (known: files, gitlab, milvus, minio, postgres, rabbitmq, redis)"),
    (("list", "postgres", "daily"), "unknown backup type 'daily' for postgres (known: full, snapshot, wal)"),
])
def test_list_rejects_unknown_service_or_type(root: Path, argv: tuple[str, ...], message: str) -> None:
    code, out, err = run(*argv, "--root", str(root))

    assert code == 2 and out == "" and message in err


def test_missing_root_is_a_usage_error(tmp_path: Path) -> None:
    code, _, err = run("list", "--root", str(tmp_path / "nowhere"))

    assert code == 2 and f"backup root {tmp_path / 'nowhere'} is not a directory" in err


# --- verify ----------------------------------------------------------------------------------------


def test_verify_ok_changes_no_marker(root: Path) -> None:
    unverified = BackupSet(root, "redis", "rdb", ID_OLD)

    code, out, _ = run("verify", "redis", "rdb", ID_OLD, "--root", str(root))

    assert code == 0 and out.startswith(f"OK: backup redis/rdb/{ID_OLD}") and "1 files" in out
    assert unverified.state is SetState.UNVERIFIED  # no SHA256SUMS written without --seal


def test_verify_names_each_mismatching_file_and_marks_nothing(root: Path) -> None:
    backup_set = BackupSet(root, "postgres", "full", ID_OLD)
    flip_byte(backup_set.path / "databases/erp.dump.zst", 10)
    (backup_set.path / "globals.sql.zst").unlink()
    (backup_set.path / "stray.bin").write_bytes(b"?")

    code, out, err = run("verify", "postgres", "full", ID_OLD, "--root", str(root))

    assert code == 1 and out == ""
    assert "FAILED: backup postgres/full/20260101T020000Z" in err and "(3 problem(s))" in err
    assert "  databases/erp.dump.zst: sha256 " in err and "  globals.sql.zst: missing" in err
    assert "  stray.bin: not in the manifest" in err
    assert backup_set.state is SetState.VERIFIED and not (backup_set.path / FAILED_NAME).exists()


def test_verify_seal_records_the_result_like_the_checksum_task(root: Path) -> None:
    good = make_verified_set(root, FILES, backup_id="20260104T020000Z")
    (good.path / SUMS_NAME).unlink()
    bad = make_verified_set(root, FILES, backup_id="20260105T020000Z")
    flip_byte(bad.path / "globals.sql.zst", 5)

    assert run("verify", "postgres", "full", good.backup_id, "--root", str(root), "--seal")[0] == 0
    assert good.state is SetState.VERIFIED

    code, _, err = run("verify", "postgres", "full", bad.backup_id, "--root", str(root), "--seal")
    assert code == 1 and "globals.sql.zst: sha256" in err
    assert bad.state is SetState.CORRUPT and "globals.sql.zst" in (bad.path / FAILED_NAME).read_text()


def test_verify_deep_runs_the_service_checks(root: Path) -> None:
    backup_set = make_verified_set(root, {"globals.sql.zst": b"not zstd"}, backup_id="20260106T020000Z")

    assert run("verify", "postgres", "full", backup_set.backup_id, "--root", str(root))[0] == 0
    code, _, err = run("verify", "postgres", "full", backup_set.backup_id, "--root", str(root), "--deep")

    assert code == 1 and "globals.sql.zst: does not decompress" in err


@pytest.mark.parametrize("backup_id", ["20990101T000000Z", "../../redis"])
def test_unknown_backup_id_lists_the_valid_ones(root: Path, backup_id: str) -> None:
    code, _, err = run("verify", "postgres", "full", backup_id, "--root", str(root))

    assert code == 2
    assert (f"Valid backup ids, newest first: {ID_BROKEN} (incomplete), {ID_NEW} (offsite), {ID_OLD} (verified)"
            in err)


def test_verify_of_an_incomplete_set_fails(root: Path) -> None:
    code, _, err = run("verify", "postgres", "full", ID_BROKEN, "--root", str(root))

    assert code == 1 and f"postgres/full/{ID_BROKEN}" in err and "is incomplete: it has no manifest.json" in err


# --- restore ---------------------------------------------------------------------------------------


def test_restore_refuses_incomplete_and_corrupt_sets(root: Path, tmp_path: Path) -> None:
    code, _, err = run("restore", "postgres", "full", ID_BROKEN, "--root", str(root), "--target", "host=127.0.0.1")
    assert code == 1 and "is incomplete" in err and "cannot be restored" in err

    code, _, err = run("restore", "rabbitmq", "definitions", ID_OLD, "--root", str(root), "--target", "local")
    assert code == 1 and "was marked corrupt by its checksum task (definitions.json: sha256 0 != manifest 1)" in err


def test_restore_checks_every_file_before_touching_the_target(root: Path, tmp_path: Path) -> None:
    backup_set = make_verified_set(root, {"x.tar": b"tar"}, service="gitlab", backup_id=ID_OLD)
    flip_byte(backup_set.path / "x.tar")
    target = tmp_path / "prepared"

    code, _, err = run("restore", "gitlab", "full", ID_OLD, "--root", str(root), "--target", str(target))

    assert code == 1 and "does not match its manifest, nothing was restored: x.tar: sha256" in err
    assert not target.exists()


def test_every_service_dry_run_goes_through_its_restore_and_changes_nothing(root: Path, tmp_path: Path) -> None:
    make_verified_set(root, {"files.tar.zst": b"tar"}, service="files", backup_id=ID_OLD)
    target = tmp_path / "restored-config"

    code, out, _ = run("restore", "files", "full", ID_OLD, "--root", str(root), "--target", str(target), "--dry-run")

    assert code == 0 and out.startswith("DRY RUN: nothing was changed.")
    assert f"  - extract 0 files (0 bytes), 0 directories and 0 symlinks from files.tar.zst into {target}" in out
    assert not target.exists()


def test_redis_dry_run_goes_through_the_service(root: Path, tmp_path: Path) -> None:
    target = tmp_path / "scratch-redis"

    code, out, _ = run("restore", "redis", "rdb", ID_OLD, "--root", str(root), "--target", str(target),
                       "--dry-run", "--json")

    report = json.loads(out)
    assert code == 0 and report["dry_run"] is True and report["details"]["target_dir"] == str(target)
    assert report["actions"][0].startswith("decompress ") and not target.exists()


@pytest.mark.parametrize(("argv", "message"), [
    (("postgres", "full", "--target", "not a dsn"), "--target is not a PostgreSQL connection string or URL"),
    (("postgres", "full"), "postgres restores need --target"),
    (("postgres", "wal", "--target", "/tmp/x"), "cannot restore 'wal' backups alone (restorable: full). For a point-in-time"),
    (("minio", "full", "--target", "s3://bucket/p"), "minio restores need --target-conn"),
    (("minio", "full", "--target", "/tmp/dir", "--target-conn", "x"), "need --target s3://bucket[/prefix]"),
    (("redis", "rdb", "--target", "/tmp/x", "--schema", "tenant_acme"), "--schema: not an option of redis rdb restores"),
    (("rabbitmq", "definitions", "--target", "http://mq:15672"), "rabbitmq restores take --target local"),
    (("nosuch", "full", "--target", "x"), "unknown service 'nosuch'"),
])
def test_bad_restore_arguments_are_usage_errors(root: Path, argv: tuple[str, ...], message: str) -> None:
    code, _, err = run("restore", argv[0], argv[1], ID_OLD, *argv[2:], "--root", str(root))

    assert code == 2 and message in err


def test_restore_targets_for_each_service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_MINIO_DR", json.dumps(
        {"conn_type": "aws", "login": "k", "password": "s", "extra": {"endpoint_url": "http://minio-dr:9000"}}))
    dsn = "postgresql://postgres@db:5433/postgres"
    assert cli.restore_target("postgres", "full", dsn, None).target == dsn
    minio = cli.restore_target("minio", "full", "s3://restored/docs/2026/", "minio_dr").target
    assert (minio.bucket, minio.prefix.rstrip("/"), minio.conn_id) == ("restored", "docs/2026", "minio_dr")
    assert cli.restore_target("redis", "rdb", str(tmp_path), None).target == {"dir": tmp_path}
    assert cli.restore_target("gitlab", "full", str(tmp_path / "g"), None).target == tmp_path / "g"
    assert cli.restore_target("milvus", "etcd", str(tmp_path / "etcd"), None).target == tmp_path / "etcd"
    assert cli.restore_target("milvus", "full", "http://milvus:19530", None).target.uri == "http://milvus:19530"
    local = cli.restore_target("rabbitmq", "definitions", "local", None).target
    assert (local.mode, local.node) == ("rabbitmqctl", None)
    assert cli.restore_target("rabbitmq", "definitions", "rabbit@mq", None).target.node == "rabbit@mq"
    with pytest.raises(cli.UsageError, match="must be a new directory"):
        cli.restore_target("milvus", "etcd", str(tmp_path), None)


def test_postgres_target_from_an_env_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_PG_DR", json.dumps(
        {"conn_type": "postgres", "host": "dr-db", "port": 5433, "login": "restorer", "password": "s3cret-pw"}))

    chosen = cli.restore_target("postgres", "full", None, "pg_dr")

    assert all(part in chosen.target for part in ("host=dr-db", "port=5433", "user=restorer", "dbname=postgres"))
    assert "s3cret-pw" not in chosen.description


# --- offsite (filesystem store) ----------------------------------------------------------------------


def test_offsite_list_verify_and_incomplete_set(root: Path, nas: FilesystemOffsite) -> None:
    code, out, _ = run("list", "postgres", "full", "--from", "offsite", "--root", str(root), "--json")
    assert code == 0
    assert [(r["backup_id"], r["state"]) for r in json.loads(out)] == [(ID_OLD, "offsite"), (ID_BROKEN, "incomplete")]

    code, out, _ = run("verify", "postgres", "full", ID_OLD, "--from", "offsite", "--root", str(root), "--deep")
    assert code == 0 and "fetched, re-hashed and the postgres checks" in out

    code, _, err = run("verify", "postgres", "full", ID_BROKEN, "--from", "offsite", "--root", str(root))
    assert code == 1 and "is incomplete: it has no manifest.json offsite" in err

    code, _, err = run("verify", "postgres", "full", ID_NEW, "--from", "offsite", "--root", str(root))
    assert code == 2 and f"Valid backup ids, newest first: {ID_BROKEN}, {ID_OLD}" in err


def test_offsite_verify_detects_a_changed_object(root: Path, nas: FilesystemOffsite) -> None:
    flip_byte(nas.root / "postgres/full" / ID_OLD / "databases/erp.dump.zst", 3)

    code, _, err = run("verify", "postgres", "full", ID_OLD, "--from", "offsite", "--root", str(root))

    assert code == 1 and f"postgres/full/{ID_OLD}/databases/erp.dump.zst: sha256" in err


def test_offsite_restore_fetches_into_the_work_dir_and_cleans_up(root: Path, nas: FilesystemOffsite, tmp_path: Path) -> None:
    shutil.rmtree(root / "postgres/full" / ID_OLD)  # only the offsite copy remains
    work = tmp_path / "work"
    work.mkdir()

    code, out, err = run("restore", "gitlab", "full", ID_OLD, "--from", "offsite", "--root", str(root),
                         "--target", str(tmp_path / "t"), "--work-dir", str(work))
    assert code == 2  # no gitlab sets offsite: usage error, nothing fetched

    code, out, err = run("restore", "postgres", "full", ID_OLD, "--from", "offsite", "--root", str(root),
                         "--target", "host=127.0.0.1", "--work-dir", str(work), "--dry-run", "-o", "jobs=1",
                         "--database", "nope")
    assert "fetched and verified 2 files" in err
    assert code == 1 and "has no database 'nope'" in err  # the postgres restore ran on the fetched copy
    assert list(work.iterdir()) == []


# --- drill-report ----------------------------------------------------------------------------------

LEDGER = [
    drill_entry("postgres", backup_type="full", backup_id=ID_OLD, rto_measured_s=754.2, rto_extrapolated_s=900.0,
                rto_target_s=7200, finished_at=datetime.fromisoformat("2026-01-04T06:20:00+09:00")),
    drill_entry("redis", "failed", backup_type="rdb", backup_id=ID_NEW, rto_measured_s=4000, rto_extrapolated_s=4000,
                rto_target_s=3600, failed_step="verify", finished_at=datetime.fromisoformat("2026-01-11T06:05:00+09:00")),
    drill_entry("gitlab", "failed", failed_step="pick", error="no complete gitlab set",
                finished_at=datetime.fromisoformat("2026-01-11T06:06:00+09:00")),
]


def write_ledger(path: Path, entries: list[DrillLedgerEntry], *, broken_line_after: int | None = None) -> Path:
    """The ledger as the drill writes it; optionally a line of garbage after the first n entries."""
    ledger.append(path, entries[:broken_line_after])
    if broken_line_after is not None:
        with path.open("a") as out:
            out.write("{not json\n")
        ledger.append(path, entries[broken_line_after:])
    return path


def test_drill_report_prints_status_and_rto_against_target(root: Path) -> None:
    write_ledger(root / "drills/ledger.jsonl", LEDGER, broken_line_after=2)

    code, out, err = run("drill-report", "--root", str(root))

    assert code == 0 and "line 3 is not JSON, skipped" in err
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["WHEN", "SERVICE", "TYPE", "BACKUP_ID", "STATUS"]
    assert lines[1].split() == ["2026-01-04T06:20:00+09:00", "postgres", "full", ID_OLD, "passed",
                                "12m34s", "/", "15m00s", "/", "2h00m", "yes"]
    assert lines[2].split() == ["2026-01-11T06:05:00+09:00", "redis", "rdb", ID_NEW, "failed", "at", "verify",
                                "1h06m", "/", "1h06m", "/", "1h00m", "NO"]
    assert lines[3].split() == ["2026-01-11T06:06:00+09:00", "gitlab", "-", "-", "failed", "at", "pick",
                                "-", "/", "-", "/", "-", "-"]

    code, out, _ = run("drill-report", "--root", str(root), "--last", "2", "--json")
    assert code == 0 and json.loads(out) == [entry.as_dict() for entry in LEDGER[1:]]


def test_drill_report_skips_lines_that_are_not_ledger_entries(root: Path) -> None:
    path = write_ledger(root / "drills/ledger.jsonl", LEDGER[:1])
    with path.open("a") as out:
        out.write(json.dumps({"service": "redis", "rto_measured_seconds": 5}) + "\n")

    code, out, err = run("drill-report", "--root", str(root), "--json")

    assert code == 0 and "line 2 is not a ledger entry (missing run_id, finished_at, status), skipped" in err
    assert json.loads(out) == [LEDGER[0].as_dict()]


def test_drill_report_without_a_ledger_fails(root: Path) -> None:
    code, _, err = run("drill-report", "--root", str(root))

    assert code == 1 and f"no DR drill ledger at {root / 'drills/ledger.jsonl'}" in err


def test_drill_report_from_offsite(root: Path, nas: FilesystemOffsite, tmp_path: Path) -> None:
    nas.put_file("drills/ledger.jsonl", write_ledger(tmp_path / "ledger.jsonl", LEDGER))

    code, out, _ = run("drill-report", "--from", "offsite", "--root", str(root), "--last", "1", "--json")

    assert code == 0 and json.loads(out) == [LEDGER[-1].as_dict()]


# --- progress and arguments ------------------------------------------------------------------------


def test_progress_line_on_a_tty_only(root: Path) -> None:
    _, _, err = run("verify", "postgres", "full", ID_OLD, "--root", str(root), tty=True)
    assert "\rverifying [1/2] globals.sql.zst" in err and "\rverifying [2/2] databases/erp.dump.zst" in err
    assert err.endswith("\r\x1b[K")  # the line is cleared before results

    _, _, err = run("verify", "postgres", "full", ID_OLD, "--root", str(root))
    assert err == ""


def test_fetch_progress_counts_finished_and_partial_files(root: Path, tmp_path: Path) -> None:
    manifest = BackupSet(root, "postgres", "full", ID_OLD).manifest()
    dest = tmp_path / "dest"
    (dest / "databases").mkdir(parents=True)
    (dest / "globals.sql.zst").write_bytes(FILES["globals.sql.zst"])
    (dest / "databases/.erp.dump.zst.tmp").write_bytes(b"x" * 3)
    total = sum(len(d) for d in FILES.values())
    done = len(FILES["globals.sql.zst"]) + 3

    line = cli.FetchProgress(cli.Console(io.StringIO(), io.StringIO()), dest, manifest, "k").line()

    assert line == (f"fetching k [2/2] databases/erp.dump.zst {done} B/{total} B ({100 * done // total}%)")


def test_help_and_argument_errors() -> None:
    assert run("--help")[0] == 0
    code, _, _ = run("drill-report", "--last", "0")
    assert code == 2


def test_list_orders_sets_by_capture_time_and_shows_slot_and_capture(tmp_path: Path) -> None:
    from datetime import UTC, timedelta

    from tests.unit.test_watchdog import NOW, make_offsite_set

    staging = tmp_path / "staging"
    make_offsite_set(staging, None, NOW - timedelta(hours=2), backup_id="20260310T020000Z")
    make_offsite_set(staging, None, NOW - timedelta(hours=1), backup_id="20260301T020000Z")  # backfilled: old slot, new data
    BackupSet(staging, "postgres", "full", "20260311T020000Z").create_dir()  # incomplete: no capture time

    code, out, _ = run("list", "postgres", "full", "--root", str(staging), "--json")
    assert code == 0
    assert [row["backup_id"] for row in json.loads(out)] == ["20260310T020000Z", "20260301T020000Z", "20260311T020000Z"]

    code, out, _ = run("list", "postgres", "full", "--root", str(staging))
    rows = [line.split() for line in out.splitlines()[1:]]
    assert rows[1][2:4] == ["20260301T020000Z", "verified"] and (NOW - timedelta(hours=1)).astimezone(UTC).strftime(
        "%Y-%m-%d") in " ".join(rows[1])
