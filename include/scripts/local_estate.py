#!/usr/bin/env python3
"""The local estate `make run` protects: real services on loopback, started and stopped together.

    python include/scripts/local_estate.py start|stop|status

- PostgreSQL: a cluster made with initdb in .estate/pg (port 15432), sample multi-tenant
  ERP data, WAL archiving on.
- S3 stand-ins (moto server): one for MinIO with sample documents (port 19000), one as the
  offsite store (port 19100).
- A Slack sink on port 18090 that appends every alert to .estate/slack.jsonl.

Connections for these come from include/estate/dev.env (dummy secrets).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "plugins"))

from erp_backup.scratch_pg import ScratchPostgres, chown_to_cluster_user  # noqa: E402

ESTATE = Path(os.environ.get("ERP_ESTATE_DIR", ROOT / ".estate"))
PG_PORT = 15432
MINIO_PORT = 19000
OFFSITE_PORT = 19100
SLACK_PORT = 18090
PY = sys.executable


def log(message: str) -> None:
    print(f"estate: {message}", flush=True)


def pidfile(name: str) -> Path:
    return ESTATE / f"{name}.pid"


def running(name: str) -> bool:
    path = pidfile(name)
    if not path.exists():
        return False
    try:
        os.kill(int(path.read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


def spawn(name: str, argv: list[str]) -> None:
    if running(name):
        log(f"{name} already running")
        return
    out = open(ESTATE / f"{name}.log", "ab")
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    pidfile(name).write_text(str(proc.pid))
    log(f"started {name} (pid {proc.pid})")


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            time.sleep(0.5)
    raise SystemExit(f"estate: {url} did not come up in {timeout:.0f}s")


def postgres() -> ScratchPostgres:
    return ScratchPostgres(ESTATE / "pg", port=PG_PORT)


def start_postgres() -> None:
    cluster = postgres()
    archive = ESTATE / "wal_archive"
    if not cluster.data_dir.exists():
        (ESTATE / "pg").mkdir(parents=True, exist_ok=True)
        os.chmod(ESTATE / "pg", 0o755)
        archive.mkdir(parents=True, exist_ok=True)
        chown_to_cluster_user(archive)
        script = ROOT / "include" / "scripts" / "archive_wal.sh"
        cluster.create({
            "wal_level": "replica",
            "archive_mode": "on",
            "archive_command": f"'{script} %p %f {archive}'",
            "archive_timeout": "60",
            "max_wal_senders": "4",
        })
        cluster.start()
        seed_postgres(cluster)
    elif not cluster.is_running():
        cluster.start()
    log(f"PostgreSQL on 127.0.0.1:{PG_PORT} (data {cluster.data_dir})")


def seed_postgres(cluster: ScratchPostgres) -> None:
    psql = str(cluster.bindir / "psql")
    base = ["-h", "127.0.0.1", "-p", str(PG_PORT), "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-q"]
    subprocess.run([psql, *base, "-d", "postgres", "-c", "CREATE DATABASE erp"], check=True)
    subprocess.run(
        [psql, *base, "-d", "erp", "-v", "app_role=erp_app", "-f", str(ROOT / "include" / "estate" / "erp_sample.sql")],
        check=True,
    )
    log("seeded database erp with the sample tenants")


def start_s3() -> None:
    moto = str(Path(PY).parent / "moto_server")
    spawn("minio", [moto, "-H", "127.0.0.1", "-p", str(MINIO_PORT)])
    spawn("offsite", [moto, "-H", "127.0.0.1", "-p", str(OFFSITE_PORT)])
    for port in (MINIO_PORT, OFFSITE_PORT):
        wait_http(f"http://127.0.0.1:{port}/")
    import boto3

    def client(port: int):
        return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="dev-access-key",
                            aws_secret_access_key="dev-secret-key", region_name="us-east-1")

    client(OFFSITE_PORT).create_bucket(Bucket="all-erp-backups")
    docs = client(MINIO_PORT)
    docs.create_bucket(Bucket="erp-documents")
    for index in range(50):
        docs.put_object(Bucket="erp-documents", Key=f"tenant_acme/manuals/doc-{index:03d}.md",
                        Body=f"# Manual {index}\n\nSample RAG document.\n".encode(), ContentType="text/markdown",
                        Metadata={"tenant": "acme"})
    log(f"S3 stand-ins: MinIO 127.0.0.1:{MINIO_PORT} (erp-documents), offsite 127.0.0.1:{OFFSITE_PORT} (all-erp-backups)")


SLACK_SINK = """
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
out = sys.argv[2]
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get('Content-Length', 0)))
        with open(out, 'ab') as f:
            f.write(body.replace(b'\\n', b' ') + b'\\n')
        self.send_response(200); self.end_headers(); self.wfile.write(b'ok')
    def log_message(self, *a):
        pass
HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()
"""


def start_slack() -> None:
    spawn("slack", [PY, "-c", SLACK_SINK, str(SLACK_PORT), str(ESTATE / "slack.jsonl")])
    log(f"Slack sink on 127.0.0.1:{SLACK_PORT}: alerts land in {ESTATE / 'slack.jsonl'}")


def start() -> None:
    ESTATE.mkdir(parents=True, exist_ok=True)
    start_postgres()
    start_s3()
    start_slack()


def stop() -> None:
    for name in ("slack", "offsite", "minio"):
        path = pidfile(name)
        if running(name):
            os.killpg(int(path.read_text()), signal.SIGTERM)
            log(f"stopped {name}")
        path.unlink(missing_ok=True)
    cluster = postgres()
    if cluster.data_dir.exists() and cluster.is_running():
        cluster.stop()
        log("stopped PostgreSQL")


def status() -> None:
    print(json.dumps({name: running(name) for name in ("minio", "offsite", "slack")}
                     | {"postgres": postgres().is_running()}, indent=2))


if __name__ == "__main__":
    {"start": start, "stop": stop, "status": status}[sys.argv[1] if len(sys.argv) > 1 else "status"]()
