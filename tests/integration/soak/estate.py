"""The rest of the soak's estate: one real, throwaway source for every other service of the plan.

Redis and etcd are scratch servers, MinIO is a bucket on the S3 stand-in, GitLab is the
Omnibus stand-in (tests/fixtures/gitlab_standin) in local mode, Milvus a milvus-lite file,
RabbitMQ the machine's broker (its definitions are only read). Each source gives its
connections and plan options, and changes a little every simulated hour (`work`).
"""

from __future__ import annotations

import json
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

from airflow.sdk import Connection

from erp_backup.scratch.etcd import start_scratch_etcd
from erp_backup.scratch.redis import ScratchRedis
from tests.fixtures.milvus import etcd_put, etcd_put_many, release_lite
from tests.fixtures.s3 import ACCESS_KEY, REGION, SECRET_KEY, S3Endpoint
from tests.integration.soak.sources import Source


class RedisSource(Source):
    service = "redis"

    def __init__(self, tmp: Path) -> None:
        self.server = ScratchRedis(dir=tmp / "redis-source").start()
        self._command("CONFIG", "SET", "repl-diskless-sync-delay", "0")  # serve `redis-cli --rdb` without the 5 s wait
        for i in range(200):
            self._command("SET", f"erp:session:{i:04d}", json.dumps({"user": i, "tenant": i % 3}))

    def _command(self, *args: str) -> None:
        parts = [arg.encode() for arg in args]
        command = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        with socket.create_connection((self.server.host, self.server.port), timeout=10) as conn:
            conn.sendall(command)
            assert conn.recv(64).startswith(b"+OK"), f"redis {args[0]} failed"

    def connections(self) -> dict[str, Connection]:
        return {"erp_redis": Connection(conn_id="erp_redis", conn_type="redis", host=self.server.host,
                                        port=self.server.port)}

    def work(self, moment: datetime) -> None:
        self._command("SET", "erp:last_tick", moment.isoformat())

    def close(self) -> None:
        self.server.stop()


class RabbitSource(Source):
    service = "rabbitmq"

    def connections(self) -> dict[str, Connection]:
        return {"erp_rabbitmq": Connection(conn_id="erp_rabbitmq", conn_type="amqp", host="127.0.0.1", port=5672,
                                           login="guest", password="guest")}


class GitlabSource(Source):
    service = "gitlab"

    def __init__(self, tmp: Path) -> None:
        from tests.integration.test_gitlab_local import StandinHost

        self.host = StandinHost(tmp)

    def options(self) -> dict[str, Any]:
        return self.host.options()


class MinioSource(Source):
    service = "minio"

    def __init__(self, s3: S3Endpoint, bucket: str) -> None:
        self.s3, self.bucket = s3, bucket
        client = s3.client()
        for i in range(30):
            client.put_object(Bucket=bucket, Key=f"invoices/2026/{i:04d}.pdf", Body=b"%PDF-" + bytes([i]) * (200 + i))

    def connections(self) -> dict[str, Connection]:
        return {"erp_minio": Connection(conn_id="erp_minio", conn_type="aws", login=ACCESS_KEY, password=SECRET_KEY,
                                        extra=json.dumps({"endpoint_url": self.s3.url, "region_name": REGION}))}

    def options(self) -> dict[str, Any]:
        return {"buckets": [self.bucket]}

    def work(self, moment: datetime) -> None:
        if moment.hour == 0:  # a day's new document
            self.s3.client().put_object(Bucket=self.bucket, Key=f"daily/{moment:%Y-%m-%d}.txt", Body=moment.isoformat())


class MilvusSource(Source):
    service = "milvus"

    def __init__(self, tmp: Path) -> None:
        from tests.integration.test_drill_services import build_milvus

        self.db = tmp / "milvus-source" / "erp.db"
        self.db.parent.mkdir()
        self.rows = build_milvus(self.db)
        release_lite(self.db)
        self.etcd = start_scratch_etcd(tmp / "etcd-source")
        etcd_put_many(self.etcd.endpoint, {f"by-dev/meta/segment/{i:03d}": json.dumps({"rows": i}) for i in range(50)})

    def connections(self) -> dict[str, Connection]:
        host, port = self.etcd.endpoint.split("//")[1].split(":")
        return {
            "erp_milvus": Connection(conn_id="erp_milvus", conn_type="generic", extra=json.dumps({"uri": str(self.db)})),
            "milvus_etcd": Connection(conn_id="milvus_etcd", conn_type="generic", host=host, port=int(port)),
        }

    def work(self, moment: datetime) -> None:
        etcd_put(self.etcd.endpoint, "by-dev/meta/soak/last_tick", moment.isoformat())

    def after_backup(self, backup_type: str) -> None:
        if backup_type == "full":
            release_lite(self.db)  # milvus-lite: one process, one open database

    def close(self) -> None:
        self.etcd.stop()
        release_lite(self.db)
