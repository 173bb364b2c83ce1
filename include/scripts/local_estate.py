#!/usr/bin/env python3
"""The local estate `make run` protects: real services on loopback, started and stopped together.

    python include/scripts/local_estate.py start|stop|status

- PostgreSQL: a cluster made with initdb in .estate/pg (port 15432), sample multi-tenant
  ERP data, WAL archiving on.
- An S3 stand-in for MinIO (moto server, port 19000) with sample documents, and a NAS-style
  offsite directory, .estate/offsite-nas.
- milvus-lite: .estate/milvus.db with two sample collections (one with partitions and a dynamic field).
- etcd (port 12379), Redis (port 16379) with sample keys; RabbitMQ is the machine's own broker.
- The ERP document flow across the three (include/estate/documents.py): a `documents` table
  in each tenant schema, the objects in `erp-documents`, the chunk vectors in `erp_doc_chunks`.
- A Slack sink on port 18090 that appends every alert to .estate/slack.jsonl.
- Sample configuration trees for the `files` service under .estate/host (the plan's paths:
  etc/gitlab, etc/ssl/erp, opt/erp/.env, etc/nginx), read through the `erp_files` connection.

GitLab cannot run here, so `make run` disables its DAG (ERP_BACKUP_DISABLE=gitlab).

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
sys.path.insert(0, str(ROOT / "include" / "estate"))

from erp_backup.scratch.postgres import ScratchPostgres, chown_to_cluster_user  # noqa: E402

ESTATE = Path(os.environ.get("ERP_ESTATE_DIR", ROOT / ".estate"))
PG_PORT = 15432
MINIO_PORT = 19000
SLACK_PORT = 18090
ETCD_PORT = 12379
REDIS_PORT = 16379
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
            "archive_command": f"'{wal_sealing()}{script} %p %f {archive}'",
            "archive_timeout": "60",
            "max_wal_senders": "4",
        })
        cluster.start()
        seed_postgres(cluster)
    elif not cluster.is_running():
        cluster.start()
    log(f"PostgreSQL on 127.0.0.1:{PG_PORT} (data {cluster.data_dir})")


def wal_sealing() -> str:
    """archive_command's prefix that seals the WAL archive for the plan's recipients (docs/pitr.md), when known.

    The recipients are public keys; the server's OS user reads them from a 0644 file.
    """
    conn = json.loads(os.environ.get("AIRFLOW_CONN_BACKUP_AGE_RECIPIENTS") or "{}")
    recipients = (conn.get("extra") or {}).get("recipients") or []
    if not recipients:
        log("no age recipients in AIRFLOW_CONN_BACKUP_AGE_RECIPIENTS: the WAL archive stays in clear")
        return ""
    path = ESTATE / "wal-recipients"
    path.write_text("".join(f"{key}\n" for key in recipients), encoding="ascii")
    path.chmod(0o644)
    log(f"WAL archive sealed with age for {len(recipients)} recipient(s) ({path})")
    return f"ERP_WAL_RECIPIENTS_FILE={path} "


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
    wait_http(f"http://127.0.0.1:{MINIO_PORT}/")
    import boto3

    docs = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{MINIO_PORT}", aws_access_key_id="dev-access-key",
                        aws_secret_access_key="dev-secret-key", region_name="us-east-1")
    docs.create_bucket(Bucket="erp-documents")
    for index in range(50):
        docs.put_object(Bucket="erp-documents", Key=f"tenant_acme/manuals/doc-{index:03d}.md",
                        Body=f"# Manual {index}\n\nSample RAG document.\n".encode(), ContentType="text/markdown",
                        Metadata={"tenant": "acme"})
    (ESTATE / "offsite-nas").mkdir(mode=0o700, exist_ok=True)
    log(f"MinIO stand-in on 127.0.0.1:{MINIO_PORT} (erp-documents); offsite NAS {ESTATE / 'offsite-nas'}")


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


def start_etcd() -> None:
    data = ESTATE / "etcd"
    spawn("etcd", [
        "etcd", "--name", "estate", "--data-dir", str(data),
        "--listen-client-urls", f"http://127.0.0.1:{ETCD_PORT}", "--advertise-client-urls", f"http://127.0.0.1:{ETCD_PORT}",
        "--listen-peer-urls", f"http://127.0.0.1:{ETCD_PORT + 1}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{ETCD_PORT + 1}",
        "--initial-cluster", f"estate=http://127.0.0.1:{ETCD_PORT + 1}",
    ])
    wait_http(f"http://127.0.0.1:{ETCD_PORT}/health")
    env = {**os.environ, "ETCDCTL_API": "3"}
    subprocess.run(["etcdctl", f"--endpoints=127.0.0.1:{ETCD_PORT}", "put", "/milvus/meta/estate", "sample"],
                   check=True, env=env, capture_output=True)
    log(f"etcd on 127.0.0.1:{ETCD_PORT}")


def start_redis() -> None:
    (ESTATE / "redis").mkdir(exist_ok=True)
    spawn("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(REDIS_PORT), "--save", "",
                    "--appendonly", "no", "--dir", str(ESTATE / "redis")])
    for _ in range(50):
        if subprocess.run(["redis-cli", "-p", str(REDIS_PORT), "ping"], capture_output=True).returncode == 0:
            break
        time.sleep(0.2)
    commands = "".join(f"SET session:{i} tenant-{i % 3}\n" for i in range(200)) + "HSET cache:rates krw 1 usd 1390\n"
    subprocess.run(["redis-cli", "-p", str(REDIS_PORT)], input=commands.encode(), check=True, capture_output=True)
    log(f"Redis on 127.0.0.1:{REDIS_PORT} (sample keys)")


def seed_milvus() -> None:
    path = ESTATE / "milvus.db"
    if path.exists():
        return
    import random

    from pymilvus import DataType, MilvusClient

    client = MilvusClient(uri=str(path))
    schema = client.create_schema(auto_id=False, enable_dynamic_field=True)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=32)
    index = client.prepare_index_params()
    index.add_index(field_name="embedding", index_type="AUTOINDEX", metric_type="COSINE")
    rng = random.Random(7)
    for name, partitions in (("rag_chunks", ["tenant_acme", "tenant_globex"]), ("product_vectors", [])):
        client.create_collection(name, schema=schema, index_params=index)
        for partition in partitions:
            client.create_partition(name, partition)
        for offset, target in enumerate(partitions or ["_default"]):
            rows = [{"id": offset * 10_000 + i, "embedding": [rng.random() for _ in range(32)],
                     "tenant": target} for i in range(500)]
            client.insert(name, rows, partition_name=target)
    client.close()
    log(f"milvus-lite sample collections in {path}")


SAMPLE_DOCUMENTS = 60


def seed_documents() -> None:
    """The document flow: rows, objects and vectors that agree. moto forgets its objects on stop: put them back."""
    import boto3
    import documents

    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{MINIO_PORT}", aws_access_key_id="dev-access-key",
                      aws_secret_access_key="dev-secret-key", region_name="us-east-1")
    stores = documents.DocumentStores(f"host=127.0.0.1 port={PG_PORT} user=postgres dbname=erp", s3, str(ESTATE / "milvus.db"))
    try:
        existing = documents.ensure_stores(stores)
        put_back = documents.restore_objects(stores)
        total = documents.seed_documents(stores, SAMPLE_DOCUMENTS) if existing == 0 else existing
    finally:
        stores.close()
    log(f"{total} ERP documents (rows, objects, vectors; {put_back} objects put back into the S3 stand-in)")


SAMPLE_CONFIG = {
    "etc/gitlab/gitlab.rb": ("external_url 'https://git.erp.local'\n", 0o600),
    "etc/gitlab/gitlab-secrets.json": ('{"gitlab_rails": {"db_key_base": "dev-only-sample"}}\n', 0o600),
    "etc/ssl/erp/erp.crt": ("-----BEGIN CERTIFICATE-----\n(dev sample)\n-----END CERTIFICATE-----\n", 0o644),
    "etc/ssl/erp/erp.key": ("(dev sample key)\n", 0o600),
    "opt/erp/.env": ("ERP_DB_HOST=127.0.0.1\nERP_DB_PASSWORD=dev-only\n", 0o640),
    "etc/nginx/sites-available/erp": ("server { listen 443 ssl; server_name erp.local; }\n", 0o644),
}


def seed_config() -> None:
    host = ESTATE / "host"
    for relative, (text, mode) in SAMPLE_CONFIG.items():
        path = host / relative
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            path.chmod(mode)
    link = host / "etc/nginx/sites-enabled/erp"
    if not link.is_symlink():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("../sites-available/erp")
    log(f"sample configuration trees in {host}")


def start() -> None:
    ESTATE.mkdir(parents=True, exist_ok=True)
    seed_config()
    start_postgres()
    start_s3()
    start_etcd()
    start_redis()
    seed_milvus()
    seed_documents()
    start_slack()


def stop() -> None:
    for name in ("slack", "minio", "etcd", "redis"):
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
    print(json.dumps({name: running(name) for name in ("minio", "slack", "etcd", "redis")}
                     | {"postgres": postgres().is_running()}, indent=2))


if __name__ == "__main__":
    {"start": start, "stop": stop, "status": status}[sys.argv[1] if len(sys.argv) > 1 else "status"]()
