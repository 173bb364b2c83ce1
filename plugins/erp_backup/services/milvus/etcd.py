"""Milvus's etcd: snapshots (`etcd`, daily), their verification, restore into a new data dir, and the drill's check.

``ETCDCTL_API=3 etcdctl --endpoints=<one> snapshot save`` writes a file, not stdout: it is
saved to a hidden temp file in the set directory, checked with ``snapshot status -w json``
(hash, revision, keys: recorded in the details), streamed through zstd into
``etcd/snapshot.db.zst`` and removed. We compress because a bbolt file is mostly free pages
and compresses well; the price is one decompression before ``snapshot restore`` or
``status``. Restore goes into a new data dir (``etcdctl snapshot restore --data-dir <new>``,
a new cluster id); `check_etcd` starts a scratch etcd on it (`erp_backup.scratch.etcd`) and
compares revision and key count with the snapshot. Credentials travel only in ETCDCTL_USER.

Plan options: etcdctl, etcd_command_timeout_s (600), compress_level (3).
Restore options: name (member name, "default"), peer_url, etcdctl.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from erp_backup.manifest import Manifest
from erp_backup.runner import Command, CommandError, LocalExecutor
from erp_backup.services.base import (
    BackupContext,
    BackupOutcome,
    CheckContext,
    Checks,
    RestoreReport,
    SourceUnavailable,
)
from erp_backup.services.milvus.endpoints import ETCD_ROLE, EtcdTarget, RestoreConflict, etcd_target
from erp_backup.sets import BackupSet
from erp_backup.stream import decompress_to, stream_to_file

log = logging.getLogger(__name__)

SNAPSHOT_FILE = "etcd/snapshot.db.zst"
SNAPSHOT_TEMP = ".etcd-snapshot.db"
DEFAULT_ETCD_COMMAND_TIMEOUT_S = 600  # etcdctl's default of 5 s would cut a large snapshot short
DEFAULT_ETCD_MEMBER = "default"
DEFAULT_ETCD_PEER_URL = "http://localhost:2380"
READ_CHUNK = 1 << 20
RESTORE_OPTIONS = frozenset({"name", "peer_url", "etcdctl"})
_UNREACHABLE_HINTS = ("context deadline exceeded", "connection refused", "no such host", "unavailable")


# ───────────────────────── commands ─────────────────────────


def etcdctl_env(target: EtcdTarget | None = None) -> dict[str, str]:
    env = {"ETCDCTL_API": "3"}
    if target is not None and target.user:
        env["ETCDCTL_USER"] = target.user
    return env


def snapshot_save_command(
    target: EtcdTarget, path: Path, etcdctl: str = "etcdctl", command_timeout_s: int = DEFAULT_ETCD_COMMAND_TIMEOUT_S
) -> Command:
    return Command(
        (
            etcdctl,
            f"--endpoints={target.endpoint}",
            *target.tls_args,
            "--dial-timeout=10s",
            f"--command-timeout={command_timeout_s}s",
            "snapshot", "save", str(path),
        ),
        env=etcdctl_env(target),
    )


def snapshot_status_command(path: Path, etcdctl: str = "etcdctl") -> Command:
    return Command((etcdctl, "snapshot", "status", str(path), "--write-out=json"), env=etcdctl_env())


def snapshot_restore_command(
    path: Path,
    data_dir: Path,
    etcdctl: str = "etcdctl",
    name: str = DEFAULT_ETCD_MEMBER,
    peer_url: str = DEFAULT_ETCD_PEER_URL,
) -> Command:
    return Command(
        (
            etcdctl, "snapshot", "restore", str(path),
            "--data-dir", str(data_dir),
            "--name", name,
            "--initial-cluster", f"{name}={peer_url}",
            "--initial-advertise-peer-urls", peer_url,
        ),
        env=etcdctl_env(),
    )


def etcdctl_version_command(etcdctl: str = "etcdctl") -> Command:
    return Command((etcdctl, "version"), env=etcdctl_env())


def parse_snapshot_status(output: bytes) -> dict[str, int]:
    """`snapshot status -w json` → {"hash", "revision", "total_keys", "total_size"}."""
    data = json.loads(output)
    return {
        "hash": int(data["hash"]),
        "revision": int(data["revision"]),
        "total_keys": int(data["totalKey"]),
        "total_size": int(data["totalSize"]),
    }


def parse_etcdctl_version(output: bytes) -> str:
    for line in output.decode(errors="replace").splitlines():
        if line.startswith("etcdctl version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


# ───────────────────────── backup and verify ─────────────────────────


def _ensure_reachable(target: EtcdTarget, conn_id: str, timeout_s: float = 5.0) -> None:
    host, port = target.host_port
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise SourceUnavailable(f"etcd connection {conn_id!r} ({target.endpoint}) is unreachable: {exc}") from exc


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            yield chunk


def backup_etcd(ctx: BackupContext) -> BackupOutcome:
    conn_id = ctx.conn_id(ETCD_ROLE)
    target = etcd_target(ctx.connection(ETCD_ROLE), conn_id)
    etcdctl = ctx.options.get("etcdctl", "etcdctl")
    command_timeout = int(ctx.options.get("etcd_command_timeout_s", DEFAULT_ETCD_COMMAND_TIMEOUT_S))
    level = int(ctx.options.get("compress_level", 3))
    executor = LocalExecutor()
    _ensure_reachable(target, conn_id)
    temp = ctx.set_dir / SNAPSHOT_TEMP
    try:
        started = time.monotonic()
        try:
            executor.run(snapshot_save_command(target, temp, etcdctl, command_timeout), timeout=command_timeout + 60)
        except CommandError as exc:
            if any(hint in exc.stderr.lower() for hint in _UNREACHABLE_HINTS):
                raise SourceUnavailable(
                    f"etcd connection {conn_id!r} ({target.endpoint}) did not serve a snapshot: {exc}"
                ) from exc
            raise
        save_seconds = time.monotonic() - started
        status = parse_snapshot_status(executor.run(snapshot_status_command(temp, etcdctl)))
        result = stream_to_file(_file_chunks(temp), ctx.set_dir, SNAPSHOT_FILE, compress=True, level=level)
        version = parse_etcdctl_version(executor.run(etcdctl_version_command(etcdctl)))
    finally:
        temp.unlink(missing_ok=True)
        temp.with_name(temp.name + ".part").unlink(missing_ok=True)
    log.info(
        "etcd snapshot of %s: revision %d, %d keys, %d bytes → %d compressed",
        target.endpoint, status["revision"], status["total_keys"], result.raw_bytes, result.entry.size,
    )
    return BackupOutcome(
        files=[result.entry],
        source={"conn_id": conn_id, "endpoint": target.endpoint},
        tools={"etcdctl": version},
        details={
            "kind": "etcd_snapshot",
            "file": SNAPSHOT_FILE,
            "compression": "zstd",
            "snapshot": status,
            "raw_bytes": result.raw_bytes,
            "save_seconds": round(save_seconds, 3),
            "compress_seconds": round(result.seconds, 3),
        },
    )


def _snapshot_status_of(compressed: Path, workdir: Path, etcdctl: str) -> tuple[Path, dict[str, int]]:
    raw = workdir / "snapshot.db"
    decompress_to(compressed, raw)
    return raw, parse_snapshot_status(LocalExecutor().run(snapshot_status_command(raw, etcdctl)))


def _status_mismatches(key: str, recorded: dict[str, Any], actual: dict[str, int]) -> list[str]:
    return [
        f"backup {key}: snapshot {name} is {actual[name]}, the manifest says {recorded.get(name)}"
        for name in ("hash", "revision", "total_keys")
        if actual[name] != recorded.get(name)
    ]


def verify_etcd(backup_set: BackupSet, manifest: Manifest, etcdctl: str = "etcdctl") -> list[str]:
    """The decompressed snapshot's `etcdctl snapshot status` matches the recorded hash, revision and keys."""
    recorded = manifest.details.get("snapshot") or {}
    relative = manifest.details.get("file", SNAPSHOT_FILE)
    with tempfile.TemporaryDirectory(prefix=f".{backup_set.backup_id}-verify-", dir=backup_set.path.parent) as work:
        try:
            _, status = _snapshot_status_of(backup_set.path / relative, Path(work), etcdctl)
        except Exception as exc:
            return [f"backup {backup_set.key}: {relative} is not a readable etcd snapshot: {exc}"]
    return _status_mismatches(backup_set.key, recorded, status)


# ───────────────────────── restore ─────────────────────────


def _restore_action(manifest: Manifest, data_dir: Path, name: str, peer_url: str) -> str:
    recorded = manifest.details.get("snapshot") or {}
    return (f"decompress {manifest.details.get('file', SNAPSHOT_FILE)} of backup {manifest.backup_id} "
            f"(revision {recorded.get('revision')}, {recorded.get('total_keys')} keys, "
            f"{recorded.get('total_size')} bytes) and `etcdctl snapshot restore` it into the new data dir "
            f"{data_dir} (member {name}, peer URL {peer_url})")


def restore_etcd(set_dir: Path, manifest: Manifest, target: str | Path, *, dry_run: bool = False,
                 options: Mapping[str, Any] | None = None) -> RestoreReport:
    """`etcdctl snapshot restore` into a NEW data dir `target`; `check_etcd` starts etcd on it.

    A snapshot whose status differs from the manifest is not restored: the differences are the
    report's problems. An existing `target` raises RestoreConflict.
    """
    values = dict(options or {})
    unknown = sorted(set(values) - RESTORE_OPTIONS)
    if unknown:
        raise TypeError(f"unknown etcd restore option(s) {unknown} (known: {', '.join(sorted(RESTORE_OPTIONS))})")
    data_dir = Path(target)
    name, peer_url = values.get("name", DEFAULT_ETCD_MEMBER), values.get("peer_url", DEFAULT_ETCD_PEER_URL)
    etcdctl = values.get("etcdctl", "etcdctl")
    if data_dir.exists():
        raise RestoreConflict(f"etcd data dir {data_dir} already exists: restore into a new, non-existing directory")
    report = RestoreReport(dry_run=dry_run, actions=[_restore_action(manifest, data_dir, name, peer_url)], details={
        "data_dir": str(data_dir), "member_name": name, "peer_url": peer_url, "restored": False,
        "snapshot": manifest.details.get("snapshot") or {},
    })
    if dry_run:
        log.info("dry run: would %s", report.actions[0])
        return report
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".etcd-restore-", dir=data_dir.parent) as work:
        raw, status = _snapshot_status_of(set_dir / manifest.details.get("file", SNAPSHOT_FILE), Path(work), etcdctl)
        report.details["snapshot"] = status
        report.problems = _status_mismatches(manifest.backup_id, manifest.details.get("snapshot") or {}, status)
        if report.problems:
            log.warning("etcd snapshot %s not restored: %s", manifest.backup_id, "; ".join(report.problems))
            return report
        decompressed = time.monotonic()
        LocalExecutor().run(snapshot_restore_command(raw, data_dir, etcdctl, name=name, peer_url=peer_url))
    finished = time.monotonic()
    log.info("etcd snapshot %s restored into %s (member %s)", manifest.backup_id, data_dir, name)
    report.restored_bytes = int(status["total_size"])
    report.checks.append(f"snapshot status matches the manifest (hash {status['hash']}, revision {status['revision']}, "
                         f"{status['total_keys']} keys)")
    report.details.update(restored=True, decompress_seconds=round(decompressed - started, 3),
                          restore_seconds=round(finished - decompressed, 3), seconds=round(finished - started, 3))
    return report


# ───────────────────────── the drill's check ─────────────────────────


def etcd_range(endpoint: str) -> dict[str, Any]:
    """The v3 gateway's answer to a count-only range over every key (header revision, count)."""
    body = json.dumps({"key": base64.b64encode(b"\0").decode(), "range_end": base64.b64encode(b"\0").decode(),
                       "count_only": True}).encode()
    request = urllib.request.Request(f"{endpoint}/v3/kv/range", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def _compare(recorded: Mapping[str, Any], revision: int, count: int) -> Checks:
    found = Checks()
    if revision != recorded.get("revision"):
        found.problems.append(f"etcd revision {revision} after restore, the snapshot has {recorded.get('revision')}")
    else:
        found.checks.append(f"revision {revision} matches the snapshot")
    if count > int(recorded.get("total_keys", count)) or (recorded.get("total_keys") and count == 0):
        found.problems.append(f"{count} keys after restore, the snapshot holds {recorded.get('total_keys')} key revisions")
    else:
        found.checks.append(f"{count} live keys (snapshot: {recorded.get('total_keys')} key revisions)")
    return found


def check_etcd(target: str | Path, manifest: Manifest, report: RestoreReport, ctx: CheckContext) -> Checks:
    """Start a scratch etcd on the restored data dir; its revision and key count must match the snapshot."""
    from erp_backup.scratch.etcd import start_scratch_etcd

    data_dir = Path(target)
    if not data_dir.is_dir():
        return Checks(problems=[f"etcd data dir {data_dir} does not exist: the snapshot was not restored"])
    etcd = start_scratch_etcd(data_dir, name=report.details.get("member_name") or DEFAULT_ETCD_MEMBER)
    try:
        client = urlsplit(etcd.client_url)
        ctx.guard(client.hostname or "", client.port or 0)
        answer = etcd_range(etcd.endpoint)
    finally:
        if not ctx.keep_scratch:
            etcd.stop()
    return _compare(manifest.details.get("snapshot") or {}, int(answer["header"]["revision"]), int(answer.get("count", 0)))
