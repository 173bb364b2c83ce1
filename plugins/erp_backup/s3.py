"""S3 plumbing shared by the offsite store and the MinIO service: client settings, SHA-256 checksums, multipart.

Client. Every client is a boto3 client of an Amazon-provider `S3Hook` on an Airflow
`aws` connection (`endpoint_url` in its extra for MinIO or another S3-compatible
store). It starts from bounded timeouts and retries (`BOUNDED_CLIENT_CONFIG`: 10 s
connect, 60 s read, 3 attempts), so an unreachable endpoint fails in seconds. Any
`config_kwargs` in the connection extra override those defaults key by key; older
MinIO rejects boto3's default CRC checksums and needs
``"config_kwargs": {"request_checksum_calculation": "when_required",
"response_checksum_validation": "when_required"}``. Uploads carry
`ChecksumAlgorithm=SHA256` (`SHA256_UPLOAD_ARGS`), so S3 checks every request body.

Checksums. A single-part object's `ChecksumSHA256` is the base64 of its whole
SHA-256. A multipart object's (ETag or checksum ending in `-N`, or ChecksumType
COMPOSITE) is a composite: the SHA-256 of its parts' SHA-256s, never the SHA-256
of the object. `file_composite_sha256` computes it for a local file and a part
size; `upload_verified_multipart` computes it while sending, and commits the
upload only when the whole object's SHA-256 is the expected one.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from erp_backup.manifest import HASH_CHUNK

if TYPE_CHECKING:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook
    from botocore.config import Config

log = logging.getLogger(__name__)

MIB = 1024 * 1024
BOUNDED_CLIENT_CONFIG: dict[str, Any] = {
    "connect_timeout": 10,
    "read_timeout": 60,
    "retries": {"max_attempts": 3, "mode": "standard"},
    "tcp_keepalive": True,
}
SHA256_UPLOAD_ARGS: dict[str, str] = {"ChecksumAlgorithm": "SHA256"}
MULTIPART_SUFFIX = re.compile(r"-(\d+)$")


# ───────────────────────── client ─────────────────────────


@dataclass(frozen=True)
class TransferSettings:
    """s3transfer settings for `upload_file`: when to go multipart, part size, parallel parts."""

    multipart_threshold: int = 64 * MIB
    chunksize: int = 64 * MIB
    max_concurrency: int = 4

    def as_args(self) -> dict[str, int]:
        """The S3Hook's `transfer_config_args`."""
        return {"multipart_threshold": self.multipart_threshold, "multipart_chunksize": self.chunksize,
                "max_concurrency": self.max_concurrency}

    def part_size(self, size: int) -> int | None:
        """The part size s3transfer uses for a file of `size` bytes; None if it goes in one request."""
        from s3transfer.utils import ChunksizeAdjuster

        if size < self.multipart_threshold:
            return None
        return int(ChunksizeAdjuster().adjust_chunksize(self.chunksize, size))


def client_config(connection: Any, max_pool_connections: int) -> Config:
    """Bounded timeouts and retries, overridden key by key by the connection's `config_kwargs`."""
    from airflow.providers.amazon.aws.utils.connection_wrapper import AwsConnectionWrapper
    from botocore.config import Config

    config = Config(**BOUNDED_CLIENT_CONFIG, max_pool_connections=max_pool_connections)
    from_connection = AwsConnectionWrapper(conn=connection).botocore_config
    return config.merge(from_connection) if from_connection else config


@cache
def _hook_class() -> type[S3Hook]:
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    class ResolvedS3Hook(S3Hook):
        """An S3Hook on a connection the caller already resolved (so tests and tasks share one lookup)."""

        def __init__(self, connection: Any, **kwargs: Any) -> None:
            self._resolved_connection = connection
            super().__init__(aws_conn_id=connection.conn_id, **kwargs)

        def get_connection(self, conn_id: str) -> Any:  # type: ignore[override]
            return self._resolved_connection

    return ResolvedS3Hook


def s3_hook(connection: Any, *, max_pool_connections: int, transfer: TransferSettings | None = None) -> S3Hook:
    """An S3Hook on a resolved `aws` connection: bounded client config, SHA-256 on uploads, transfer settings."""
    kwargs: dict[str, Any] = {"transfer_config_args": transfer.as_args()} if transfer else {}
    return _hook_class()(connection, config=client_config(connection, max_pool_connections),
                         extra_args=dict(SHA256_UPLOAD_ARGS), **kwargs)


# ───────────────────────── checksums ─────────────────────────


def b64_sha256(hex_digest: str) -> str:
    """A hex SHA-256 as S3 shows it in ChecksumSHA256 (base64)."""
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def composite_sha256(part_digests: Iterable[bytes]) -> str:
    """The S3 composite checksum of a multipart object: SHA-256 of its parts' SHA-256s (base64)."""
    return base64.b64encode(hashlib.sha256(b"".join(part_digests)).digest()).decode()


def file_composite_sha256(path: Path, part_size: int) -> tuple[str, str]:
    """(whole-file hex SHA-256, base64 composite SHA-256 of `part_size` parts) of a local file."""
    whole = hashlib.sha256()
    part_digests = []
    with open(path, "rb", buffering=0) as handle:
        while True:
            part = hashlib.sha256()
            remaining = part_size
            while remaining and (chunk := handle.read(min(HASH_CHUNK, remaining))):
                part.update(chunk)
                whole.update(chunk)
                remaining -= len(chunk)
            if remaining == part_size:
                break
            part_digests.append(part.digest())
    return whole.hexdigest(), composite_sha256(part_digests)


def without_parts_suffix(checksum: str) -> str:
    """A checksum or ETag without its multipart `-N` suffix."""
    return MULTIPART_SUFFIX.sub("", checksum)


def is_multipart_etag(etag: str | None) -> bool:
    return bool(etag) and bool(MULTIPART_SUFFIX.search((etag or "").strip('"')))


def parts_count(head: Mapping[str, Any]) -> int | None:
    """The part count of a multipart object (from its checksum or ETag `-N` suffix); None if single-part."""
    for value in (head.get("ChecksumSHA256") or "", (head.get("ETag") or "").strip('"')):
        match = MULTIPART_SUFFIX.search(value)
        if match:
            return int(match.group(1))
    if head.get("ChecksumType") == "COMPOSITE":
        return int(head.get("PartsCount") or 0)
    return None


def whole_object_sha256(response: Mapping[str, Any]) -> str | None:
    """The hex SHA-256 of the whole object from a HEAD/GET response, if it carries one.

    None for multipart objects: their ChecksumSHA256 is a composite of the parts' checksums.
    """
    checksum = response.get("ChecksumSHA256")
    if not checksum or MULTIPART_SUFFIX.search(checksum) or is_multipart_etag(response.get("ETag")):
        return None
    if response.get("ChecksumType") == "COMPOSITE":
        return None
    try:
        return base64.b64decode(checksum, validate=True).hex()
    except ValueError:
        return None


# ───────────────────────── multipart upload ─────────────────────────


def read_exactly(stream: IO[bytes], size: int) -> bytes:
    """Up to `size` bytes; fewer only at the end of the stream."""
    buffer = bytearray()
    while len(buffer) < size and (chunk := stream.read(min(HASH_CHUNK, size - len(buffer)))):
        buffer += chunk
    return bytes(buffer)


@dataclass(frozen=True)
class MultipartResult:
    """What a verified multipart upload sent: the whole object's size and SHA-256, and whether it was committed."""

    size: int
    sha256: str
    checksum: str  # the composite ChecksumSHA256 S3 should report: "<base64>-<parts>"
    committed: bool


def _send_parts(client: Any, bucket: str, key: str, upload_id: str, stream: IO[bytes],
                part_size: int) -> tuple[list[dict[str, Any]], list[bytes], int, str]:
    """Upload `stream` in parts with their SHA-256s; (parts, part digests, size, whole hex SHA-256)."""
    whole, size = hashlib.sha256(), 0
    parts: list[dict[str, Any]] = []
    digests: list[bytes] = []
    while part := read_exactly(stream, part_size):
        whole.update(part)
        size += len(part)
        digest = hashlib.sha256(part).digest()
        digests.append(digest)
        checksum = base64.b64encode(digest).decode()
        number = len(parts) + 1
        response = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                      Body=part, ChecksumSHA256=checksum)
        parts.append({"ETag": response["ETag"], "PartNumber": number, "ChecksumSHA256": checksum})
    return parts, digests, size, whole.hexdigest()


def upload_verified_multipart(client: Any, bucket: str, key: str, stream: IO[bytes], *, part_size: int,
                              expected_size: int, expected_sha256: str, extra: Mapping[str, Any]) -> MultipartResult:
    """Send `stream` in parts, hashing them; complete the upload only if the whole object is the expected one.

    A mismatch aborts the upload (nothing is committed, nothing at `key` is replaced) and
    returns `committed=False`; any error aborts it too and is raised. Memory: one part.
    """
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, **SHA256_UPLOAD_ARGS, **extra)["UploadId"]
    try:
        parts, digests, size, sha256 = _send_parts(client, bucket, key, upload_id, stream, part_size)
        checksum = f"{composite_sha256(digests)}-{len(parts)}"
        if (size, sha256) != (expected_size, expected_sha256):
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            return MultipartResult(size, sha256, checksum, committed=False)
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
    except BaseException:
        try:
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception as exc:  # the original error matters more
            log.warning("could not abort the multipart upload of s3://%s/%s: %s", bucket, key, exc)
        raise
    return MultipartResult(size, sha256, checksum, committed=True)
