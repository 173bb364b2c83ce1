"""The seed's deployment on a real engine: PostgreSQL 15 in a container named erp-postgres.

- `backup_postgres_full` in docker-exec mode (pg_dump runs inside the container through the
  Docker API) through dag.test; the set restores with standard tools, and every table's row
  count and content hash match.
- WAL archived inside the container by include/scripts/archive_wal.sh into a directory
  `postgres:0`, mode 2770 (setgid), is readable by the non-root backup worker (uid 50000, gid 0).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pyrage
import pytest
import zstandard
from pyrage import x25519

from erp_backup.services.postgres.content import TableContent, apply_session_settings, inventory
from tests.conftest import AGE_KEYS
from tests.fixtures.docker_engine import DockerEngine
from tests.integration.dagrun import run_dag, write_plan
from tests.integration.test_backup_postgres_dag import DAG_ID, PREFIX, RUN_DATE, restore_with_standard_tools

# The first test to use `docker_images` may carry a cold build of every image (about 15 min on 2 cores,
# more under load), longer than pytest.ini's 900 s per test.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(2700)]

ROOT = Path(__file__).resolve().parents[3]
SAMPLE_SQL = ROOT / "include" / "estate" / "erp_sample.sql"
NAME, NETWORK = "erp-postgres", "erp-test-seed"
WORKER_USER = "50000:0"


@dataclass(frozen=True)
class ErpPostgres:
    port: int
    password: str
    archive: Path

    def conninfo(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={dbname}"

    def conn_json(self) -> str:
        return json.dumps({"conn_type": "postgres", "host": "127.0.0.1", "port": self.port, "login": "postgres",
                           "password": self.password, "schema": "postgres"})


def run_as(engine: DockerEngine, image: str, user: str, archive: Path, *command: str) -> subprocess.CompletedProcess:
    """Run `command` in a throwaway container as `user`, with the archive mounted read-only at /wal."""
    container = engine.api.create_container(
        image, list(command), user=user,
        host_config=engine.api.create_host_config(binds={str(archive): {"bind": "/wal", "mode": "ro"}}, network_mode="none"),
    )
    try:
        engine.api.start(container)
        code = engine.api.wait(container, timeout=60)["StatusCode"]
        out = engine.api.logs(container, stdout=True, stderr=False).decode()
        err = engine.api.logs(container, stdout=False, stderr=True).decode()
        return subprocess.CompletedProcess(command, code, out, err)
    finally:
        engine.api.remove_container(container, force=True, v=True)


@pytest.fixture(scope="module")
def erp_postgres(docker_engine: DockerEngine, docker_images: dict[str, str],
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[ErpPostgres]:
    api, image = docker_engine.api, docker_images["postgres"]
    archive = tmp_path_factory.mktemp("wal-archive")
    archive.parent.chmod(0o755)
    # As the compose `erp` profile does: the archive belongs to postgres, group 0 (the worker's), setgid.
    prepare = api.create_container(image, ["sh", "-c", "chown postgres:0 /wal && chmod 2770 /wal"],
                                   host_config=api.create_host_config(binds={str(archive): {"bind": "/wal", "mode": "rw"}},
                                                                      network_mode="none"))
    api.start(prepare)
    assert api.wait(prepare, timeout=60)["StatusCode"] == 0
    api.remove_container(prepare, force=True)
    password = secrets.token_hex(16)
    api.create_network(NETWORK, driver="bridge")
    api.create_container(
        image, name=NAME, environment={"POSTGRES_PASSWORD": password}, ports=[5432],
        command=["postgres", "-c", "wal_level=replica", "-c", "archive_mode=on", "-c", "archive_timeout=60",
                 "-c", "archive_command=/bin/sh /opt/erp-scripts/archive_wal.sh %p %f /wal-archive"],
        host_config=api.create_host_config(
            network_mode=NETWORK, port_bindings={5432: ("127.0.0.1", None)},
            binds={str(ROOT / "include" / "scripts"): {"bind": "/opt/erp-scripts", "mode": "ro"},
                   str(archive): {"bind": "/wal-archive", "mode": "rw"}}),
    )
    try:
        api.start(NAME)
        server = ErpPostgres(int(api.port(NAME, 5432)[0]["HostPort"]), password, archive)
        env = {"PGPASSWORD": password}
        deadline = time.monotonic() + 60
        while subprocess.run(["pg_isready", "-q", "-d", server.conninfo()], env=env).returncode != 0:
            assert time.monotonic() < deadline, api.logs(NAME).decode()[-2000:]
            time.sleep(0.5)
        subprocess.run(["psql", "-X", "-q", "-d", server.conninfo(), "-c", "CREATE DATABASE erp"], env=env, check=True)
        subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", "app_role=erp_app", "-d", server.conninfo("erp"),
                        "-f", str(SAMPLE_SQL)], env=env, check=True, capture_output=True)
        yield server
    finally:
        api.remove_container(NAME, force=True, v=True)
        api.remove_network(NETWORK)


def test_backup_postgres_full_in_docker_exec_mode_restores_with_matching_rows_and_hashes(
        erp_postgres: ErpPostgres, docker_engine: DockerEngine, dagbag, airflow_db, s3_endpoint, s3_bucket,
        slack_receiver, scratch_pg, tmp_path, monkeypatch):
    bucket = s3_bucket("erp-container")
    options = {"exec_mode": "docker", "container": NAME, "docker_url": docker_engine.url, "databases": ["erp"]}
    plan_path = write_plan(tmp_path / "plan.yaml", bucket=bucket, prefix=PREFIX,
                           edit=lambda d: d["services"]["postgres"]["options"].update(options))
    monkeypatch.setenv("ERP_BACKUP_PLAN", str(plan_path))
    monkeypatch.setenv("ERP_BACKUP_ROOT", str(tmp_path / "backup"))
    monkeypatch.setenv("AIRFLOW_CONN_ERP_POSTGRES", erp_postgres.conn_json())
    monkeypatch.setenv("AIRFLOW_CONN_BACKUP_OFFSITE", s3_endpoint.conn_json())
    monkeypatch.setenv("AIRFLOW_CONN_SLACK_BACKUP_ALERTS", slack_receiver.conn_json())

    _, states = run_dag(dagbag, DAG_ID, RUN_DATE)
    assert states == dict.fromkeys(("backup", "checksum", "offsite_upload", "retention_prune"), "success"), states
    workdir = tmp_path / "download"
    workdir.mkdir()
    identity = tmp_path / "key.txt"  # the set is sealed (encrypt: true by default): restore needs the age identity
    identity.write_text(AGE_KEYS.identity + "\n")
    identity.chmod(0o600)
    manifest = restore_with_standard_tools(s3_endpoint.client(), bucket, workdir, scratch_pg, identity)
    assert (manifest.source["exec_mode"], manifest.source["container"]) == ("docker", NAME)
    tables = [TableContent.from_dict(t) for t in manifest.details["databases"]["erp"]["tables"]]
    expected = {t.qualified: (t.rows, t.content_hash) for t in tables}
    assert len(expected) >= 10 and sum(t.rows for t in tables if t.kind == "r") > 1000
    with psycopg.connect(scratch_pg.conninfo("erp")) as conn:
        apply_session_settings(conn)
        assert {t.qualified: (t.rows, t.content_hash) for t in inventory(conn)} == expected
    with psycopg.connect(erp_postgres.conninfo("erp"), password=erp_postgres.password) as conn:
        apply_session_settings(conn)  # and the source is what was backed up
        assert {t.qualified: (t.rows, t.content_hash) for t in inventory(conn)} == expected


def test_wal_archived_in_the_container_is_readable_by_the_non_root_worker(erp_postgres: ErpPostgres,
                                                                         docker_engine: DockerEngine,
                                                                         docker_images: dict[str, str]):
    with psycopg.connect(erp_postgres.conninfo("erp"), password=erp_postgres.password, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS wal_probe (n int)")
        conn.execute("INSERT INTO wal_probe SELECT generate_series(1, 1000)")
        segment = conn.execute("SELECT pg_walfile_name(pg_current_wal_lsn())").fetchone()[0]
        conn.execute("SELECT pg_switch_wal()")
    log = erp_postgres.archive / "archive.log"
    deadline = time.monotonic() + 60
    while not (log.exists() and f" {segment} " in log.read_text()):
        assert time.monotonic() < deadline, f"{segment} was not archived: {sorted(p.name for p in erp_postgres.archive.iterdir())}"
        time.sleep(0.5)
    recorded = next(line.split()[2] for line in log.read_text().splitlines() if line.split()[1] == segment)
    stat = (erp_postgres.archive / segment).stat()
    assert (stat.st_mode & 0o777, stat.st_gid) == (0o640, 0)
    assert erp_postgres.archive.stat().st_mode & 0o7777 == 0o2770

    base = "erp-local/base:bookworm"
    worker = run_as(docker_engine, base, WORKER_USER, erp_postgres.archive, "sha256sum", f"/wal/{segment}")
    assert worker.returncode == 0, worker.stderr
    assert worker.stdout.split()[0] == recorded
    assert run_as(docker_engine, base, WORKER_USER, erp_postgres.archive, "ls", "/wal").returncode == 0
    stranger = run_as(docker_engine, base, "50001:50001", erp_postgres.archive, "cat", f"/wal/{segment}")
    assert stranger.returncode != 0 and "Permission denied" in stranger.stderr  # the group grants it, nothing else


def test_the_container_seals_its_wal_archive_with_its_own_zstd_and_age(erp_postgres: ErpPostgres,
                                                                       docker_engine: DockerEngine):
    """archive_wal.sh with ERP_WAL_RECIPIENTS_FILE, run by the server's user inside erp-postgres (docs/pitr.md)."""
    api = docker_engine.api
    name = "0000000100000000000000F0"
    script = f"""set -e
        d=$(mktemp -d); mkdir "$d/archive"
        head -c 1048576 /dev/urandom > "$d/{name}"
        echo '{AGE_KEYS.recipient}' > "$d/recipients"
        ERP_WAL_RECIPIENTS_FILE="$d/recipients" /bin/sh /opt/erp-scripts/archive_wal.sh "$d/{name}" {name} "$d/archive"
        ls "$d/archive" >&2
        cat "$d/{name}" | sha256sum >&2
        cat "$d/archive/{name}.zst.age"
        rm -rf "$d"
    """

    def run(user: str) -> tuple[int, bytes, bytes]:
        exec_id = api.exec_create(NAME, ["sh", "-c", script], user=user)["Id"]
        out, err = api.exec_start(exec_id, demux=True)
        return api.exec_inspect(exec_id)["ExitCode"], out or b"", err or b""

    code, sealed, err = run("postgres")
    assert code == 0, err.decode()
    *listing, digest = err.decode().splitlines()
    assert listing == [f"{name}.zst.age", "archive.log"]  # nothing in clear beside the log
    assert sealed.startswith(b"age-encryption.org/v1\n")
    clear = zstandard.ZstdDecompressor().decompressobj().decompress(pyrage.decrypt(sealed, [x25519.Identity.from_str(AGE_KEYS.identity)]))
    assert len(clear) == 1 << 20 and hashlib.sha256(clear).hexdigest() == digest.split()[0]
