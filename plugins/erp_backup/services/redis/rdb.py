"""Redis backup and verify: the RDB pulled over the replication protocol, checked with redis-check-rdb."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from erp_backup.manifest import Manifest
from erp_backup.runner import CommandError, Executor, LocalExecutor
from erp_backup.services.base import BackupContext, BackupOutcome
from erp_backup.services.redis.client import RedisCli, SampleLimits, redigest, sample_keys
from erp_backup.services.redis.commands import (
    RDB_FILE,
    RedisEndpoint,
    check_rdb_command,
    cli_version_command,
    keyspace_to_json,
    parse_info,
    rdb_command,
    strip_eof_mark,
)
from erp_backup.sets import BackupSet
from erp_backup.stream import decompress_to, stream_to_file

log = logging.getLogger(__name__)


def backup(ctx: BackupContext, executor: Executor | None = None) -> BackupOutcome:
    """Stream an RDB into dump.rdb.zst and describe the keyspace it should contain."""
    conn_id = ctx.conn_id("source")
    endpoint = RedisEndpoint.from_connection(ctx.connection("source"))
    executor = executor or LocalExecutor()
    redis = RedisCli(endpoint, executor, f"connection {conn_id!r}")
    limits = SampleLimits.from_options(ctx.options)

    server = parse_info(redis.info("server"))
    before = redis.keyspace()
    sample = sample_keys(redis, before, limits)

    started = time.monotonic()
    try:
        result = stream_to_file(
            strip_eof_mark(executor.stream(rdb_command(endpoint))), ctx.set_dir, RDB_FILE,
            level=int(ctx.options.get("compress_level", 3)),
        )
    except CommandError as exc:
        redis.reraise(exc)
    transfer_seconds = time.monotonic() - started

    after = redis.keyspace()
    current = redigest(redis, sample, limits)
    stable = [key for key in sample if current.get((key.db, key.key)) == key]
    if len(stable) < len(sample):
        log.info("dropped %d sampled keys that changed during the transfer", len(sample) - len(stable))

    cli_version = executor.run(cli_version_command()).decode().strip()
    return BackupOutcome(
        files=[result.entry],
        source={"conn_id": conn_id, "host": endpoint.host, "port": endpoint.port,
                "version": server.get("redis_version", "unknown")},
        tools={"redis-cli": cli_version},
        details={
            "redis_version": server.get("redis_version", "unknown"),
            "redis_mode": server.get("redis_mode", "unknown"),
            "method": "redis-cli --rdb - (replication protocol)",
            "rdb_file": RDB_FILE,
            "rdb_bytes": result.raw_bytes,
            "transfer_seconds": round(transfer_seconds, 3),
            "keyspace": keyspace_to_json(before),
            "keyspace_after": keyspace_to_json(after),
            "dbsize": {str(db): stats["keys"] for db, stats in sorted(after.items())},
            "sample": [key.as_dict() for key in stable],
            "sample_dropped_changed": len(sample) - len(stable),
            "sample_limits": {"keys_per_db": limits.keys, "scan_limit": limits.scan_limit,
                              "digest_max_items": limits.max_items, "digest_max_bytes": limits.max_bytes},
        },
    )


def _check_rdb(path: Path, executor: Executor) -> tuple[bool, str]:
    """Run redis-check-rdb; it reports on stdout, so collect stdout even when it fails."""
    output = bytearray()
    try:
        for chunk in executor.stream(check_rdb_command(path)):
            output.extend(chunk)
    except CommandError as exc:
        return False, (output.decode(errors="replace") + exc.stderr).strip()
    return True, output.decode(errors="replace")


def _keys_read(report: str) -> int | None:
    for line in report.splitlines():
        if line.startswith("[info]") and line.endswith("keys read"):
            return int(line.split()[1])
    return None


def verify(backup_set: BackupSet, manifest: Manifest, executor: Executor | None = None) -> list[str]:
    """Decompress the RDB to a temp dir and let redis-check-rdb parse it and check its CRC."""
    executor = executor or LocalExecutor()
    source = backup_set.path / RDB_FILE
    if not source.is_file():
        return [f"{backup_set.key}: {RDB_FILE} is missing"]
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="erp-redis-verify-") as tmp:
        raw = Path(tmp) / "dump.rdb"
        try:
            written = decompress_to(source, raw)
        except Exception as exc:  # zstd raises its own error types
            return [f"{backup_set.key}: {RDB_FILE} does not decompress: {exc}"]
        expected_bytes = manifest.details.get("rdb_bytes")
        if expected_bytes is not None and written != expected_bytes:
            problems.append(f"{backup_set.key}: RDB is {written} bytes, manifest says {expected_bytes}")
        ok, report = _check_rdb(raw, executor)
    if not ok:
        tail = "\n".join(report.splitlines()[-6:])
        problems.append(f"{backup_set.key}: redis-check-rdb rejected {RDB_FILE}: {tail}")
    else:
        log.info("%s: redis-check-rdb OK, %s keys read", backup_set.key, _keys_read(report))
    return problems

