"""PostgreSQL command builders, endpoints, dump file names and globals/TOC parsing: exact argv, no secrets."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from erp_backup.runner import Command
from erp_backup.services import postgres
from erp_backup.services.base import SourceUnavailable
from erp_backup.services.postgres import dump
from erp_backup.services.postgres.commands import (
    PgEndpoint,
    PostgresBackupError,
    SourceServer,
    dump_dir_for,
    dump_file_for,
    globals_for_target,
    pg_dump_command,
    pg_dump_directory_command,
    pg_dumpall_globals_command,
    pg_restore_command,
    pg_restore_list_command,
    psql_script_command,
    roles_created_by,
    schema_header_entries,
    tool_version_command,
)
from erp_backup.services.postgres.parallel import layout_for

SECRET = "s3cret pass'word"
NETWORK = PgEndpoint({"host": "db.internal", "port": "5432", "user": "backup"}, SECRET)
SOCKET = PgEndpoint({"user": "backup"}, SECRET)
ARCHIVE = Path("/tmp/restore/database.dump")


class FakeConnection:
    """The fields of an Airflow connection that the service reads."""

    def __init__(self, **fields):
        self.host = fields.get("host")
        self.port = fields.get("port")
        self.login = fields.get("login")
        self.password = fields.get("password")
        self.schema = fields.get("schema")


def assert_no_secret(command: Command) -> None:
    assert not any(SECRET in arg for arg in command.argv)
    assert SECRET not in command.describe()
    assert command.env == {"PGPASSWORD": SECRET}


def test_pg_dump_command_network():
    command = pg_dump_command(NETWORK, "erp", "00000003-0000001B-1")
    assert command.argv == (
        "pg_dump", "--no-password", "--format=custom", "--compress=0", "--snapshot=00000003-0000001B-1",
        "--dbname=host=db.internal port=5432 user=backup dbname=erp",
    )
    assert_no_secret(command)


def test_pg_dump_command_docker_socket_quotes_the_database_name():
    command = pg_dump_command(SOCKET, "odd name's db", "00000003-0000001B-1", bindir="/usr/lib/postgresql/15/bin")
    assert command.argv == (
        "/usr/lib/postgresql/15/bin/pg_dump", "--no-password", "--format=custom", "--compress=0",
        "--snapshot=00000003-0000001B-1", "--dbname=user=backup dbname='odd name\\'s db'",
    )
    assert_no_secret(command)


def test_pg_dump_directory_command_runs_jobs_workers_into_a_directory():
    command = pg_dump_directory_command(NETWORK, "erp data", "00000003-0000001B-1", Path("/set/.spool-1/dump"), jobs=4)
    assert command.argv == (
        "pg_dump", "--no-password", "--format=directory", "--compress=0", "--jobs=4", "--verbose",
        "--snapshot=00000003-0000001B-1", "--file=/set/.spool-1/dump",
        "--dbname=host=db.internal port=5432 user=backup dbname='erp data'",
    )
    assert dump_dir_for("erp data") == "databases/erp%20data.dir"
    assert_no_secret(command)


@pytest.mark.parametrize(("size_mb", "options", "layout"), [
    (2048, {"parallel_dump_min_mb": 1024, "dump_jobs": 4}, ("directory", 4)),
    (1023, {"parallel_dump_min_mb": 1024, "dump_jobs": 4}, ("custom", 1)),
    (2048, {"dump_jobs": 3}, ("directory", 3)),  # default threshold: 1 GiB
    (2048, {"parallel_dump_min_mb": 1024, "dump_jobs": 4, "exec_mode": "docker"}, ("custom", 1)),
    (5, {"parallel_dump_min_mb": 0}, ("directory", os.cpu_count() or 1)),  # default jobs: the worker's cores
])
def test_layout_for_a_database_size(size_mb, options, layout):
    assert layout_for(size_mb * 2**20, options) == layout


def test_pg_dumpall_globals_command():
    assert pg_dumpall_globals_command(NETWORK, "postgres").argv == (
        "pg_dumpall", "--no-password", "--globals-only",
        "--dbname=host=db.internal port=5432 user=backup dbname=postgres",
    )
    command = pg_dumpall_globals_command(SOCKET, "maint", no_role_passwords=True)
    assert command.argv == (
        "pg_dumpall", "--no-password", "--globals-only", "--no-role-passwords", "--dbname=user=backup dbname=maint",
    )
    assert_no_secret(command)


def test_tool_version_commands():
    assert tool_version_command("pg_dump") == Command(("pg_dump", "--version"))
    assert tool_version_command("pg_dumpall", "/opt/pg/bin").argv == ("/opt/pg/bin/pg_dumpall", "--version")


def test_pg_restore_full_with_create():
    command = pg_restore_command(NETWORK, "postgres", ARCHIVE, jobs=4, create=True)
    assert command.argv == (
        "pg_restore", "--no-password", "--exit-on-error", "--jobs=4", "--create",
        "--dbname=host=db.internal port=5432 user=backup dbname=postgres", "/tmp/restore/database.dump",
    )
    assert_no_secret(command)


def test_pg_restore_single_schema_and_use_list():
    assert pg_restore_command(NETWORK, "erp", ARCHIVE, jobs=2, schema="tenant_acme").argv == (
        "pg_restore", "--no-password", "--exit-on-error", "--jobs=2", "--schema=tenant_acme",
        "--dbname=host=db.internal port=5432 user=backup dbname=erp", "/tmp/restore/database.dump",
    )
    assert pg_restore_command(SOCKET, "erp", ARCHIVE, use_list=Path("/tmp/restore/schema.list")).argv == (
        "pg_restore", "--no-password", "--exit-on-error", "--jobs=1", "--use-list=/tmp/restore/schema.list",
        "--dbname=user=backup dbname=erp", "/tmp/restore/database.dump",
    )


def test_pg_restore_list_and_psql_commands():
    assert pg_restore_list_command(ARCHIVE) == Command(("pg_restore", "--list", "/tmp/restore/database.dump"))
    command = psql_script_command(NETWORK, "postgres")
    assert command.argv == (
        "psql", "--no-psqlrc", "--quiet", "--no-password", "--set=ON_ERROR_STOP=1",
        "--dbname=host=db.internal port=5432 user=backup dbname=postgres", "--file=-",
    )
    assert_no_secret(command)


def test_target_dsn_password_moves_to_the_environment():
    quoted_secret = SECRET.replace("'", "\\'")
    target = PgEndpoint.parse(f"host=127.0.0.1 port=6543 user=restorer password='{quoted_secret}'")
    assert target.password == SECRET
    assert target.maintenance_db == "postgres"
    command = pg_restore_command(target, "erp", ARCHIVE)
    assert command.argv[-2] == "--dbname=user=restorer host=127.0.0.1 port=6543 dbname=erp"
    assert_no_secret(command)
    uri = PgEndpoint.parse("postgresql://restorer:pw@10.0.0.5:5433/maint?sslmode=require")
    assert (uri.maintenance_db, uri.env(), uri.describe()) == (
        "maint", {"PGPASSWORD": "pw"}, "user=restorer host=10.0.0.5 port=5433 sslmode=require"
    )
    assert "pw" not in repr(uri)


def test_source_endpoints_per_exec_mode():
    source = SourceServer.from_connection(
        "erp_postgres", FakeConnection(host="erp-db", port=6432, login="backup", password=SECRET, schema="")
    )
    assert (source.address, source.maintenance_db) == ("erp-db:6432", "postgres")
    assert source.tool_endpoint("network") == PgEndpoint({"host": "erp-db", "port": "6432", "user": "backup"}, SECRET)
    assert source.tool_endpoint("docker") == PgEndpoint({"user": "backup"}, SECRET)
    assert SECRET not in repr(source)


def test_source_without_host_names_the_connection():
    with pytest.raises(SourceUnavailable, match="'erp_postgres' has no host"):
        SourceServer.from_connection("erp_postgres", FakeConnection(host=None))


def test_dump_file_names():
    assert dump_file_for("erp_prod") == "databases/erp_prod.dump.zst"
    assert dump_file_for("a/b c%d") == "databases/a%2Fb%20c%25d.dump.zst"
    assert dump_file_for("..") == "databases/...dump.zst"
    assert dump_file_for("회계") == "databases/%ED%9A%8C%EA%B3%84.dump.zst"


@given(st.text(min_size=1, max_size=63).filter(lambda s: "\x00" not in s and len(s.encode()) <= 63))
def test_dump_file_names_are_safe_and_reversible(name):
    """PostgreSQL names are at most 63 bytes; their file names stay within NAME_MAX (255 bytes)."""
    relative = dump_file_for(name)
    file_name = relative.removeprefix("databases/")
    assert "/" not in file_name and file_name.endswith(".dump.zst")
    assert len(file_name.encode()) <= 255
    assert unquote(file_name.removesuffix(".dump.zst"), errors="strict") == name


GLOBALS = '''--
-- PostgreSQL database cluster dump
--

SET default_transaction_read_only = off;

CREATE ROLE erp_app_1;
ALTER ROLE erp_app_1 WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB NOLOGIN NOREPLICATION NOBYPASSRLS;
CREATE ROLE postgres;
ALTER ROLE postgres WITH SUPERUSER INHERIT CREATEROLE CREATEDB LOGIN REPLICATION BYPASSRLS;
CREATE ROLE "Report ""Reader""";
ALTER ROLE "Report ""Reader""" WITH NOSUPERUSER INHERIT NOCREATEROLE NOCREATEDB LOGIN NOREPLICATION NOBYPASSRLS;
'''


def test_roles_created_by_reads_plain_and_quoted_names():
    assert roles_created_by(GLOBALS) == ["erp_app_1", "postgres", 'Report "Reader"']


def test_globals_for_target_comments_out_only_the_create_of_existing_roles():
    script = globals_for_target(GLOBALS, {"postgres", 'Report "Reader"', "unrelated"}, own_role="nobody")
    assert roles_created_by(script) == ["erp_app_1"]
    assert "-- CREATE ROLE postgres; skipped: the role exists on the target\n" in script
    assert "ALTER ROLE postgres WITH SUPERUSER" in script
    assert script.count("\n") == GLOBALS.count("\n")


TOC = """;
; Archive created at 2026-11-26 11:26:56 UTC
;
7; 2615 16388 SCHEMA - tenant_acme postgres
3401; 0 0 COMMENT - SCHEMA tenant_acme postgres
3353; 0 0 ACL - SCHEMA tenant_acme postgres
6; 2615 16392 SCHEMA - tenant_acme_old postgres
216; 1259 16389 TABLE tenant_acme customers postgres
3344; 0 16389 TABLE DATA tenant_acme customers postgres
"""


def test_schema_header_entries_select_the_schema_itself_only():
    assert schema_header_entries(TOC, "tenant_acme") == [
        "7; 2615 16388 SCHEMA - tenant_acme postgres",
        "3401; 0 0 COMMENT - SCHEMA tenant_acme postgres",
        "3353; 0 0 ACL - SCHEMA tenant_acme postgres",
    ]
    assert schema_header_entries(TOC, "tenant.acme") == []


QUOTED_TOC = """;
10; 2615 16390 SCHEMA - Tenant_Upper Tenant "Owner"
3362; 0 0 ACL - SCHEMA "Tenant_Upper" Tenant "Owner"
8; 2615 16392 SCHEMA - ten"ant postgres
3357; 0 0 COMMENT - SCHEMA "ten""ant" postgres
3358; 0 0 ACL - SCHEMA "ten""ant" postgres
7; 2615 16393 SCHEMA - ten"ant x postgres
3363; 0 0 ACL - SCHEMA "ten""ant x" postgres
6; 2615 16391 SCHEMA - tenant-hyphen postgres
9; 2615 16389 SCHEMA - 테넌트 읽기 role
3359; 0 0 COMMENT - SCHEMA "테넌트" 읽기 role
3360; 0 0 ACL - SCHEMA "테넌트" 읽기 role
219; 1259 16396 TABLE ten"ant t postgres
3361; 0 0 ACL ten"ant TABLE t postgres
2043; 826 16394 DEFAULT ACL ten"ant DEFAULT PRIVILEGES FOR TABLES postgres
3364; 0 0 ACL - SCHEMA "select" postgres
11; 2615 16395 SCHEMA - select postgres
"""


@pytest.mark.parametrize(("schema", "owners", "wanted"), [
    ("Tenant_Upper", {'Tenant "Owner"'}, ["10;", "3362;"]),
    ('ten"ant', {"postgres"}, ["8;", "3357;", "3358;"]),
    ('ten"ant', None, ["8;", "3357;", "3358;"]),  # one-word owner: the decoy 'ten"ant x' is not taken
    ('ten"ant x', {"postgres"}, ["7;", "3363;"]),
    ("tenant-hyphen", {"postgres"}, ["6;"]),
    ("테넌트", {"읽기 role"}, ["9;", "3359;", "3360;"]),
    ("테넌트", None, ["3359;", "3360;"]),  # a two-word owner needs the recorded one
    ("select", {"postgres"}, ["3364;", "11;"]),  # a keyword: pg_dump quotes it
])
def test_schema_header_entries_match_names_that_need_quoting(schema, owners, wanted):
    assert [line.split(" ")[0] for line in schema_header_entries(QUOTED_TOC, schema, owners)] == wanted


def test_dispatch_names_supported_types():
    assert frozenset({"full", "wal", "snapshot"}) == postgres.SUPPORTED_TYPES
    with pytest.raises(ValueError, match="cannot back up backup type 'hourly' \\(supported: full, snapshot, wal\\)"):
        postgres._handler(postgres._BACKUPS, "hourly", "back up")
    with pytest.raises(ValueError, match="cannot restore backup type 'hourly' \\(supported: full\\)"):
        postgres._handler(postgres._RESTORES, "hourly", "restore")


DATABASES = [
    dump.SourceDatabase("erp", "UTF8", "C.UTF-8", "C.UTF-8", "erp_owner", False, True),
    dump.SourceDatabase("postgres", "UTF8", "C.UTF-8", "C.UTF-8", "postgres", False, True),
    dump.SourceDatabase("template1", "UTF8", "C.UTF-8", "C.UTF-8", "postgres", True, True),
    dump.SourceDatabase("archived", "UTF8", "C.UTF-8", "C.UTF-8", "postgres", False, False),
]


def test_database_selection_skips_templates_and_closed_databases():
    names = lambda options: [db.name for db in dump._select_databases(DATABASES, options)]  # noqa: E731
    assert names({}) == ["erp", "postgres"]
    assert names({"databases": ["erp"]}) == ["erp"]
    assert names({"exclude_databases": ["postgres"]}) == ["erp"]
    with pytest.raises(PostgresBackupError, match="options.databases names 'archived', 'nope'"):
        names({"databases": ["erp", "archived", "nope"]})


def test_applying_globals_keeps_the_restoring_roles_own_password():
    """Found by the compose drill: the backed-up superuser password locked the restore out of its target."""
    script = ("CREATE ROLE postgres;\n"
              "ALTER ROLE postgres WITH SUPERUSER INHERIT LOGIN PASSWORD 'SCRAM-SHA-256$4096:abc=$x=:y=';\n"
              "CREATE ROLE erp_app;\n"
              "ALTER ROLE erp_app WITH NOSUPERUSER LOGIN PASSWORD 'SCRAM-SHA-256$4096:o''k';\n"
              'ALTER ROLE "Odd ""one""" WITH LOGIN PASSWORD \'md5abc\';\n')
    kept = globals_for_target(script, (), own_role="postgres")
    assert "ALTER ROLE postgres WITH SUPERUSER INHERIT LOGIN;\n" in kept
    assert "ALTER ROLE erp_app WITH NOSUPERUSER LOGIN PASSWORD 'SCRAM-SHA-256$4096:o''k';\n" in kept
    assert globals_for_target(script, (), own_role='Odd "one"').endswith('ALTER ROLE "Odd ""one""" WITH LOGIN;\n')
    assert globals_for_target(script, (), own_role="nobody") == script
    both = globals_for_target(script, {"postgres"}, own_role="postgres")
    assert both.startswith("-- CREATE ROLE postgres; skipped: the role exists on the target\n"
                           "ALTER ROLE postgres WITH SUPERUSER INHERIT LOGIN;\n")
