"""The PostgreSQL service contract's pure verbs: types, CLI targets, scratch specs and targets, versions, sizes."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from psycopg.conninfo import conninfo_to_dict

from erp_backup.manifest import Manifest
from erp_backup.scratch.postgres import ScratchPostgres
from erp_backup.services import CONTRACT, get_service, postgres
from erp_backup.services.base import ContainerSpec, ScratchSpec, TargetUsageError
from erp_backup.services.postgres.commands import RestoreError
from erp_backup.services.postgres.conninfo import redact_conninfo
from erp_backup.services.postgres.restore import FullRestoreOptions
from tests.fixtures.factories import make_manifest

T0 = datetime(2026, 3, 1, 2, 0, tzinfo=timezone.utc)
SECRET = "s3cret pass'word"


def manifest(backup_type: str, details: dict[str, Any], sizes: tuple[int, ...] = (10,)) -> Manifest:
    return make_manifest(service="postgres", backup_type=backup_type, captured_started_at=T0, sizes=sizes,
                         details=details)


class FakeConnection:
    def __init__(self, **fields: Any):
        for name in ("host", "port", "login", "password", "schema"):
            setattr(self, name, fields.get(name))


def no_connections(conn_id: str) -> Any:
    raise KeyError(conn_id)


# --- the contract ------------------------------------------------------------------------------


def test_the_package_declares_the_whole_contract_and_its_types():
    module = get_service("postgres")
    assert module is postgres
    assert all(hasattr(postgres, verb) for verb in CONTRACT)
    assert postgres.SUPPORTED_TYPES == {"full", "wal", "snapshot"}
    assert postgres.RESTORE_TYPES == {"full"} and postgres.DRILL_TYPES == {"full"}
    assert postgres.PITR_TYPES == {"snapshot", "wal"}


@pytest.mark.parametrize("backup_type", ["snapshot", "wal"])
def test_restore_refuses_a_chain_member_alone_and_names_the_point_in_time_restore(backup_type, tmp_path):
    with pytest.raises(ValueError, match=f"cannot restore a {backup_type} set alone .*restore_to_time.*pitr_restore.sh"):
        postgres.restore(tmp_path, manifest(backup_type, {}), "host=127.0.0.1")


def test_full_restore_options_are_checked_before_anything_connects():
    assert FullRestoreOptions.from_mapping(None) == FullRestoreOptions()
    chosen = FullRestoreOptions.from_mapping({"jobs": "4", "schema": "tenant_acme", "databases": "erp",
                                              "apply_globals": "false"})
    assert (chosen.jobs, chosen.schema, chosen.databases, chosen.apply_globals) == (4, "tenant_acme", ("erp",), False)
    with pytest.raises(RestoreError, match="take the options jobs, schema, databases.*unknown: strict"):
        FullRestoreOptions.from_mapping({"strict": False})
    with pytest.raises(RestoreError, match="jobs must be a whole number >= 1, got 0"):
        FullRestoreOptions.from_mapping({"jobs": 0})
    with pytest.raises(RestoreError, match="apply_globals must be true or false, got 'maybe'"):
        FullRestoreOptions.from_mapping({"apply_globals": "maybe"})


# --- target_from_cli ---------------------------------------------------------------------------


@pytest.mark.parametrize("backup_type", ["snapshot", "wal"])
def test_cli_target_for_a_chain_member_points_at_the_pitr_runbook(backup_type):
    with pytest.raises(TargetUsageError, match="to a point in time: .*include/scripts/pitr_restore.sh --target-time"):
        postgres.target_from_cli(backup_type, "host=db", None, no_connections)


def test_cli_target_is_required_and_must_parse():
    with pytest.raises(TargetUsageError, match="need --target: a libpq conninfo .*postgresql:// URL.*--target-conn"):
        postgres.target_from_cli("full", None, None, no_connections)
    with pytest.raises(TargetUsageError, match="--target is not a PostgreSQL connection string or URL"):
        postgres.target_from_cli("full", "just some words", None, no_connections)


def test_cli_target_conninfo_is_kept_and_described_without_its_password(caplog):
    caplog.set_level(logging.WARNING)
    given = "host=db.internal port=5433 user=restore password=hunter2"
    chosen = postgres.target_from_cli("full", given, None, no_connections)
    assert chosen.target == given
    assert conninfo_to_dict(chosen.description) == {"host": "db.internal", "port": "5433", "user": "restore"}
    assert "contains a password" in caplog.text and "hunter2" not in caplog.text


def test_cli_target_url_without_password_warns_about_nothing(caplog):
    caplog.set_level(logging.WARNING)
    chosen = postgres.target_from_cli("full", "postgresql://restore@db:5432/postgres", None, no_connections)
    assert (chosen.target, chosen.description) == ("postgresql://restore@db:5432/postgres",) * 2
    assert caplog.text == ""


def test_cli_target_from_a_connection_carries_the_password_but_never_shows_it():
    seen: list[str] = []

    def get_connection(conn_id: str) -> FakeConnection:
        seen.append(conn_id)
        return FakeConnection(host="dr-db", port=6432, login="restore", password=SECRET, schema=None)

    chosen = postgres.target_from_cli("full", None, "dr_postgres", get_connection)
    assert seen == ["dr_postgres"]
    assert conninfo_to_dict(chosen.target) == {"host": "dr-db", "port": "6432", "user": "restore", "dbname": "postgres",
                                               "password": SECRET}
    assert SECRET not in chosen.description
    assert conninfo_to_dict(chosen.description) == {"host": "dr-db", "port": "6432", "user": "restore", "dbname": "postgres"}


def test_cli_target_connection_that_does_not_exist_says_how_to_define_it():
    with pytest.raises(TargetUsageError, match="--target-conn: connection 'dr_postgres' is not defined.*AIRFLOW_CONN_DR_POSTGRES"):
        postgres.target_from_cli("full", None, "dr_postgres", no_connections)


def test_redaction_of_urls_and_conninfo():
    assert redact_conninfo("postgresql://admin:hunter2@db:5432/postgres") == "postgresql://admin@db:5432/postgres"
    assert sorted(redact_conninfo("host=db user=admin password=hunter2").split()) == ["host=db", "user=admin"]
    assert redact_conninfo("host='unterminated") == "(unparsable connection string)"


# --- scratch servers ---------------------------------------------------------------------------


def test_scratch_spec_is_the_backed_up_major_or_an_initdb_cluster_for_pitr():
    assert postgres.scratch_spec("snapshot", {}, pitr=True) == ScratchSpec("postgres_cluster", None)
    assert postgres.scratch_spec("snapshot", {"postgres_major": 16}, pitr=True).major == 16  # local binaries of that major
    spec = postgres.scratch_spec("full", {"postgres_major": 16})
    assert spec == ScratchSpec("postgres", ContainerSpec("postgres:16", 5432, {}, None, secret_env=("POSTGRES_PASSWORD",)),
                               major=16)
    assert postgres.scratch_spec("full", {}).container == ContainerSpec(
        "postgres:15", 5432, {}, None, secret_env=("POSTGRES_PASSWORD",))


def target_info(**fields: Any) -> Any:
    """The TargetInfo fields scratch_target reads."""
    return SimpleNamespace(**{"owner": "drill:test", "host": None, "port": None, "base_dir": None, "secret": None, **fields})


def test_scratch_target_of_a_server_is_a_conninfo_with_the_scratch_password_only_when_set():
    plain = postgres.scratch_target(target_info(kind="postgres", host="10.0.0.7", port=15432))
    assert conninfo_to_dict(plain) == {"host": "10.0.0.7", "port": "15432", "user": "postgres", "dbname": "postgres"}
    secret = postgres.scratch_target(target_info(kind="postgres", host="10.0.0.7", port=15432, secret=SECRET))
    assert conninfo_to_dict(secret)["password"] == SECRET


def test_scratch_target_of_a_pitr_cluster_is_the_cluster_in_its_directory(tmp_path: Path):
    cluster = postgres.scratch_target(target_info(kind="postgres_cluster", base_dir=str(tmp_path), port=25432))
    assert isinstance(cluster, ScratchPostgres)
    assert (cluster.base_dir, cluster.data_dir, cluster.port) == (tmp_path, tmp_path / "data", 25432)
    with pytest.raises(ValueError, match="has no base_dir"):
        postgres.scratch_target(target_info(kind="postgres_cluster", port=25432))
    with pytest.raises(ValueError, match="no scratch target of kind 'redis'"):
        postgres.scratch_target(target_info(kind="redis"))


# --- versions and sizes ------------------------------------------------------------------------


def test_versions_come_from_server_version_num():
    assert postgres.versions(manifest("full", {"server_version_num": 150008})) == {"postgres_major": 15}
    assert postgres.versions(manifest("full", {"server_version_num": 90624})) == {"postgres_major": 9}
    assert postgres.versions(manifest("snapshot", {"timeline": 1})) == {}
    assert postgres.versions(manifest("full", {"server_version_num": "150008"})) == {}


def test_source_size_is_the_uncompressed_data_of_the_set():
    assert postgres.source_size(manifest("full", {"raw_bytes": 123_456_789}, sizes=(1, 2))) == 123_456_789
    assert postgres.source_size(manifest("snapshot", {"tar_bytes": 987_654_321})) == 987_654_321
    assert postgres.source_size(manifest("full", {})) is None
    assert postgres.source_size(manifest("full", {"raw_bytes": 0})) is None
    assert postgres.source_size(manifest("wal", {"wal": [{"raw_size": 16 << 20}]})) is None
