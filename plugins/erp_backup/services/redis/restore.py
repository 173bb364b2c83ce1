"""Redis restore: the RDB loaded into a scratch redis-server, then compared with the manifest; the drill's checks.

A restore never raises for a mismatch: key counts outside the manifest's range and
sampled keys whose digest differs are the report's ``problems``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from erp_backup.manifest import Manifest
from erp_backup.runner import LocalExecutor
from erp_backup.scratch.redis import DEFAULT_START_TIMEOUT_S, ScratchRedis, ScratchRedisError
from erp_backup.services.base import CheckContext, Checks, RestoreReport
from erp_backup.services.redis.client import RedisCli, SampleLimits, redigest
from erp_backup.services.redis.commands import (
    DEFAULT_DIGEST_MAX_BYTES,
    DEFAULT_DIGEST_MAX_ITEMS,
    RDB_FILE,
    RedisEndpoint,
    SampledKey,
    check_key_counts,
    compare_sample,
    expected_key_counts,
    keyspace_from_json,
)
from erp_backup.stream import decompress_to

log = logging.getLogger(__name__)

RESTORE_OPTIONS = frozenset({"keep_running", "overwrite", "start_timeout", "temp_dir"})
TARGET_KEYS = ("dir", "port", "password", "dbfilename", "server_binary")


def restore_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The restore's options, refusing names it does not take (a misspelt option must not pass silently)."""
    given = dict(options or {})
    unknown = sorted(set(given) - RESTORE_OPTIONS)
    if unknown:
        raise ValueError(f"redis restore: unknown option(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(RESTORE_OPTIONS))})")
    return given


def _scratch_server(target: Any, options: Mapping[str, Any]) -> tuple[ScratchRedis, bool, Path | None]:
    """(server, owned by us, temp dir to remove) for a ScratchRedis or a dict description."""
    if isinstance(target, ScratchRedis):
        return target, False, None
    spec = dict(target or {})
    unknown = set(spec) - set(TARGET_KEYS)
    if unknown:
        raise ValueError(f"redis restore target: unknown keys {sorted(unknown)} (allowed: {', '.join(TARGET_KEYS)})")
    temp_dir = None
    if "dir" not in spec:
        temp_dir = Path(tempfile.mkdtemp(prefix="erp-redis-restore-", dir=options.get("temp_dir")))
        spec["dir"] = temp_dir
    return ScratchRedis(**spec), True, temp_dir


def key_ranges(manifest: Manifest) -> dict[int, tuple[int, int]]:
    """Per db, the key counts a restore of this set may show (see expected_key_counts)."""
    return expected_key_counts(
        keyspace_from_json(manifest.details.get("keyspace", {})),
        keyspace_from_json(manifest.details.get("keyspace_after", {})),
    )


def _recorded_limits(manifest: Manifest) -> SampleLimits:
    recorded = manifest.details.get("sample_limits", {})
    return SampleLimits(
        max_items=int(recorded.get("digest_max_items", DEFAULT_DIGEST_MAX_ITEMS)),
        max_bytes=int(recorded.get("digest_max_bytes", DEFAULT_DIGEST_MAX_BYTES)),
    )


def compare_with_manifest(scratch: RedisCli, manifest: Manifest, report: RestoreReport) -> None:
    """Key counts per db and the sampled keys' digests against the manifest, into `report`."""
    restored = scratch.keyspace()
    counts, problems = check_key_counts(key_ranges(manifest), restored)
    sample = [SampledKey.from_dict(item) for item in manifest.details.get("sample", [])]
    sample_check = compare_sample(sample, redigest(scratch, sample, _recorded_limits(manifest)))
    report.problems += problems + sample_check["problems"]
    report.checks += [f"db{db}: {c['restored']} keys (backup: {c['expected_min']}..{c['expected_max']})"
                      for db, c in counts.items() if c["expected_min"] <= c["restored"] <= c["expected_max"]]
    report.checks.append(f"{sample_check['matched']}/{len(sample)} sampled keys match their digests "
                         f"({sample_check['expired']} expired)")
    report.details.update(
        keys_restored=sum(stats["keys"] for stats in restored.values()),
        key_counts=counts,
        sampled_keys=len(sample),
        sampled_keys_matched=sample_check["matched"],
        sampled_keys_expired=sample_check["expired"],
    )


def _load_and_check(server: ScratchRedis, manifest: Manifest, report: RestoreReport, timeout: float) -> None:
    loading = time.monotonic()
    server.start(timeout=timeout)
    report.details["load_seconds"] = round(time.monotonic() - loading, 3)
    report.details["target"] = {"host": server.host, "port": server.port, "pid": server.pid}
    report.actions.append(f"started a scratch redis-server on {server.host}:{server.port} (AOF off, no save points)")
    checking = time.monotonic()
    scratch = RedisCli(RedisEndpoint.from_scratch(server), LocalExecutor(), f"scratch redis in {server.dir}")
    compare_with_manifest(scratch, manifest, report)
    report.details["check_seconds"] = round(time.monotonic() - checking, 3)


def _dry_run(source: Path, server: ScratchRedis, report: RestoreReport) -> RestoreReport:
    log.info("dry run: would decompress %s to %s and start a scratch redis-server there", source, server.data_file)
    report.actions = [f"decompress {source} to {server.data_file}",
                      "start scratch redis-server (AOF off, no save points) on a free 127.0.0.1 port",
                      "compare key counts per db and sampled keys with the manifest"]
    return report


def restore(set_dir: Path, manifest: Manifest, target: Any = None, *, dry_run: bool = False,
            options: Mapping[str, Any] | None = None) -> RestoreReport:
    """Load the RDB into a scratch redis-server and compare key counts and sampled keys with the manifest.

    `target` is a ScratchRedis (not running; the caller stops it) or a dict (`dir`, `port`, `password`,
    `dbfilename`) for a server this call starts and stops unless `keep_running`. Options:
    `keep_running`, `overwrite` (an existing RDB in the target dir), `start_timeout` (s), `temp_dir`.
    """
    settings = restore_options(options)
    source = Path(set_dir) / RDB_FILE
    server, owned, temp_dir = _scratch_server(target, settings)
    report = RestoreReport(dry_run=dry_run, details={"backup_id": manifest.backup_id, "rdb_file": str(source),
                                                     "target_dir": str(server.dir)})
    if dry_run:
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
        return _dry_run(source, server, report)
    if server.is_running():
        raise ValueError(f"scratch redis in {server.dir} is already running; restore needs a stopped server")
    if server.data_file.exists() and not settings.get("overwrite"):
        raise FileExistsError(f"{server.data_file} exists; pass overwrite=True to replace it")

    keep_running = bool(settings.get("keep_running", False)) or not owned
    started = time.monotonic()
    server.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    report.restored_bytes = decompress_to(source, server.data_file)
    report.actions.append(f"decompressed {source} to {server.data_file} ({report.restored_bytes} bytes)")
    report.details.update(rdb_bytes=report.restored_bytes, decompress_seconds=round(time.monotonic() - started, 3))
    try:
        _load_and_check(server, manifest, report, float(settings.get("start_timeout", DEFAULT_START_TIMEOUT_S)))
    finally:
        if not keep_running:
            server.stop()
            if temp_dir:
                shutil.rmtree(temp_dir, ignore_errors=True)
    report.details.update(total_seconds=round(time.monotonic() - started, 3), kept_running=keep_running)
    log.info("redis restore of %s: %d keys, %d/%d sampled keys matched, %d problems", manifest.backup_id,
             report.details["keys_restored"], report.details["sampled_keys_matched"], report.details["sampled_keys"],
             len(report.problems))
    return report


def check_restored(target: Any, set_dir: Path, manifest: Manifest, report: RestoreReport,
                   ctx: CheckContext) -> Checks:
    """The drill's check of the server the restore left running: key counts per db against the manifest."""
    directory = target.dir if isinstance(target, ScratchRedis) else Path(target["dir"])
    try:
        server = ScratchRedis.attach(directory, password=getattr(target, "password", None))
    except ScratchRedisError as exc:
        return Checks([], [f"scratch redis-server in {directory} is not running ({exc})"])
    if not server.is_running() or server.port is None:
        return Checks([], [f"scratch redis-server in {directory} is not running"])
    ctx.guard(server.host, server.port)
    scratch = RedisCli(RedisEndpoint.from_scratch(server), LocalExecutor(), f"scratch redis in {directory}")
    counts, problems = check_key_counts(key_ranges(manifest), scratch.keyspace())
    checks = [f"db{db}: {c['restored']} keys (backup: {c['expected_min']}..{c['expected_max']})"
              for db, c in counts.items()]
    details = report.details
    if details.get("sampled_keys") is not None:
        checks.append(f"{details.get('sampled_keys_matched')}/{details['sampled_keys']} sampled keys match their "
                      f"digests ({details.get('sampled_keys_expired', 0)} expired)")
    return Checks(checks, problems)
