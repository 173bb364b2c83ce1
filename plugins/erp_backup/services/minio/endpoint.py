"""The S3 endpoints of MinIO backups and restores: clients, error translation, a bounded thread pool.

Clients are `erp_backup.s3` hooks on an `aws` connection (bounded timeouts, `config_kwargs`
from the extra), one shared thread-safe client per endpoint with a connection pool per worker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from erp_backup.manifest import HASH_CHUNK
from erp_backup.s3 import s3_hook
from erp_backup.services.base import SourceUnavailable
from erp_backup.services.minio.layout import BucketMissing, MinioError

CONNECTIVITY_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"})
MISSING_BUCKET_CODES = frozenset({"NoSuchBucket", "404", "NotFound"})
MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


def s3_client(connection: Any, max_workers: int) -> Any:
    """The boto3 client of an S3Hook on `connection`: bounded timeouts and retries, a pool per worker.

    `config_kwargs` in the connection extra override the defaults key by key (e.g.
    request_checksum_calculation=when_required for older MinIO).
    """
    return s3_hook(connection, max_pool_connections=max_workers + 4).get_conn()


def endpoint_host(connection: Any) -> str:
    """host:port of the connection's endpoint (never credentials)."""
    extra = getattr(connection, "extra_dejson", None) or {}
    url = extra.get("endpoint_url") or (extra.get("service_config") or {}).get("s3", {}).get("endpoint_url")
    if not url:
        return "the default AWS endpoint (no endpoint_url in the connection extra)"
    parsed = urlparse(url)
    return str(parsed.netloc.rsplit("@", 1)[-1] or url)


@contextmanager
def s3_errors(conn_id: str, host: str, action: str) -> Iterator[None]:
    """Unreachable or refused → SourceUnavailable; a missing bucket or other error → MinioError."""
    from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError

    try:
        yield
    except (ConnectionError, HTTPClientError) as exc:
        raise SourceUnavailable(
            f"MinIO connection {conn_id!r}: cannot reach endpoint {host} while {action}: {exc}"
        ) from exc
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in CONNECTIVITY_CODES:
            raise SourceUnavailable(
                f"MinIO connection {conn_id!r} (endpoint {host}) refused {action} ({code}): check the "
                "connection's login/password (access key/secret key) and the user's policy"
            ) from exc
        raise MinioError(f"MinIO connection {conn_id!r} (endpoint {host}): {action} failed: {exc}") from exc
    except BotoCoreError as exc:
        raise MinioError(f"MinIO connection {conn_id!r} (endpoint {host}): {action} failed: {exc}") from exc


def error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


@dataclass
class Endpoint:
    """One S3 endpoint: the connection id and host:port for messages, and its boto3 client."""

    conn_id: str
    host: str
    client: Any

    def errors(self, action: str) -> AbstractContextManager[None]:
        return s3_errors(self.conn_id, self.host, action)

    def check_bucket(self, bucket: str) -> None:
        from botocore.exceptions import ClientError

        with self.errors(f"checking bucket {bucket}"):
            try:
                self.client.head_bucket(Bucket=bucket)
            except ClientError as exc:
                if error_code(exc) in MISSING_BUCKET_CODES:
                    raise BucketMissing(
                        f"bucket {bucket!r} does not exist at {self.host} (connection {self.conn_id!r}); "
                        "fix services.minio.options.buckets in the plan or the restore target"
                    ) from exc
                raise


def run_pool(work: Callable[[Any], Any], items: list[Any], max_workers: int, on_done: Callable[[Any], None]) -> list[Any]:
    """Run `work` on every item with at most `max_workers` threads; the first error cancels the rest."""
    results: list[Any] = [None] * len(items)
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="minio") as pool:
        futures: list[Future[Any]] = [pool.submit(work, item) for item in items]
        try:
            for index, future in enumerate(futures):
                results[index] = future.result()
                on_done(results[index])
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return results


def file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            yield chunk
