"""Milvus: a logical export of every collection (`full`, weekly) and an etcd snapshot (`etcd`, daily).

Owns how Milvus is backed up, verified and restored. Connections: `erp_milvus`
(role `source`: host is a URI such as http://milvus:19530, or extra
``{"uri": "/path/to/milvus-lite.db"}``; token from the password, or
``login:password`` when a login is set; database from the schema field) and
`milvus_etcd` (role `etcd`: host and port of ONE etcd endpoint; login/password
for etcd auth, passed as ETCDCTL_USER in the environment, never in argv; extra
``cacert``/``cert``/``key`` paths for TLS).

Modules: `endpoints` (connections, clients), `schema` (definitions, rows ⇄ arrow), `export`
(backup and verify of `full`), `restore` (restore and drill check of `full`), `etcd`
(everything `etcd`). This module holds the service verbs and dispatches on the backup type.

Why an etcd snapshot and a MinIO copy can disagree
--------------------------------------------------
A Milvus cluster's state is etcd metadata (collections, segments, the paths of
binlog and index files) plus the object data in MinIO. The two are written
independently, and the data coordinator's garbage collection deletes files
that compaction or dropping made obsolete. An etcd snapshot from 02:30 and a
bucket mirror from 03:00 are therefore two different moments: segments flushed
or compacted in between are missing from one side, and GC may already have
deleted files the older snapshot still references (milvus#30620). Restoring
that pair gives collections that fail to load. The daily etcd snapshot alone
is for metadata forensics and for restoring together with a bucket copy taken
in the same cold window; the weekly collection export is the portable backup
that does not depend on either.

Supported procedure for a consistent physical copy (cold):
1. Stop Milvus (every component), or at least pause GC and stop writes:
   ``GET http://<milvus>:9091/management/datacoord/garbage_collection/pause?pause_seconds=<N>``
   (what milvus-backup does; newer versions return a ticket for ``.../resume``),
   or ``dataCoord.enableGarbageCollection: false`` plus a restart.
2. Snapshot etcd (backup_milvus_etcd, or ``etcdctl snapshot save``).
3. Mirror the Milvus bucket (backup_minio_full of that bucket).
4. Restart Milvus, or resume GC.
Restore the pair together: etcd from that snapshot into a new data dir, the
bucket from that mirror, then start Milvus on both.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erp_backup.manifest import Manifest
from erp_backup.services.base import (
    BackupContext,
    BackupOutcome,
    CheckContext,
    Checks,
    CliTarget,
    ContainerSpec,
    RestoreReport,
    ScratchSpec,
    TargetUsageError,
    connection_for,
)
from erp_backup.services.base import newest_set_of_each_type_at as sets_at
from erp_backup.services.base import no_after_prune as after_prune
from erp_backup.services.base import no_point_in_time as plan_point_in_time
from erp_backup.services.base import no_point_in_time_range as point_in_time_range
from erp_backup.services.base import no_protected_sets as protected_sets
from erp_backup.services.base import no_restore_to_time as restore_to_time
from erp_backup.services.milvus.endpoints import (
    DEFAULT_ETCD_PORT,
    DEFAULT_MILVUS_PORT,
    ETCD_ROLE,
    SOURCE_ROLE,
    EtcdTarget,
    MilvusTarget,
    RestoreConflict,
    connect,
    etcd_target,
    milvus_target,
    redact_uri,
)
from erp_backup.services.milvus.etcd import (
    DEFAULT_ETCD_COMMAND_TIMEOUT_S,
    DEFAULT_ETCD_MEMBER,
    DEFAULT_ETCD_PEER_URL,
    SNAPSHOT_FILE,
    backup_etcd,
    check_etcd,
    etcd_range,
    etcdctl_env,
    etcdctl_version_command,
    parse_etcdctl_version,
    parse_snapshot_status,
    restore_etcd,
    snapshot_restore_command,
    snapshot_save_command,
    snapshot_status_command,
    verify_etcd,
)
from erp_backup.services.milvus.etcd import RESTORE_OPTIONS as ETCD_RESTORE_OPTIONS
from erp_backup.services.milvus.export import (
    COLLECTIONS_DIR,
    DEFAULT_BATCH_SIZE,
    DEFAULT_PARQUET_LEVEL,
    DEFAULT_SEARCH_SAMPLES,
    DEFAULT_SEARCH_TOP_K,
    EXPORT_FORMAT,
    MAX_BATCH_SIZE,
    ChainFile,
    ExportSettings,
    PartitionFiles,
    QuerySampler,
    backup_full,
    export_collection,
    path_component,
    verify_full,
)
from erp_backup.services.milvus.records import read_records
from erp_backup.services.milvus.restore import ALLOW_INSERT_AUTO_ID, RestoreSettings, check_full, restore_full
from erp_backup.services.milvus.schema import (
    MAX_REQUEST_BYTES,
    META_COLUMN,
    REQUEST_HEADROOM,
    RUNTIME_INDEX_KEYS,
    Column,
    Layout,
    UnsupportedCollection,
    arrow_layout,
    batch_to_rows,
    clean_index,
    collection_definition,
    index_params_from_definition,
    primary_field,
    rows_per_request,
    rows_to_batch,
    schema_from_definition,
)
from erp_backup.sets import BackupSet

if TYPE_CHECKING:
    from erp_backup.scratch.base import TargetInfo

__all__ = [
    "ALLOW_INSERT_AUTO_ID",
    "COLLECTIONS_DIR",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_ETCD_COMMAND_TIMEOUT_S",
    "DEFAULT_ETCD_MEMBER",
    "DEFAULT_ETCD_PEER_URL",
    "DEFAULT_ETCD_PORT",
    "DEFAULT_MILVUS_PORT",
    "DEFAULT_PARQUET_LEVEL",
    "DEFAULT_SEARCH_SAMPLES",
    "DEFAULT_SEARCH_TOP_K",
    "DRILL_TYPES",
    "ETCD_ROLE",
    "EXPORT_FORMAT",
    "MAX_BATCH_SIZE",
    "MAX_REQUEST_BYTES",
    "META_COLUMN",
    "PITR_TYPES",
    "REQUEST_HEADROOM",
    "RESTORE_OPTIONS",
    "RESTORE_TYPES",
    "RUNTIME_INDEX_KEYS",
    "SCRATCH_MILVUS_VERSION",
    "SNAPSHOT_FILE",
    "SOURCE_ROLE",
    "SUPPORTED_TYPES",
    "ChainFile",
    "Column",
    "EtcdTarget",
    "ExportSettings",
    "Layout",
    "MilvusTarget",
    "PartitionFiles",
    "QuerySampler",
    "RestoreConflict",
    "RestoreSettings",
    "UnsupportedCollection",
    "after_prune",
    "arrow_layout",
    "backup",
    "backup_etcd",
    "backup_full",
    "batch_to_rows",
    "check_etcd",
    "check_full",
    "check_restored",
    "clean_index",
    "collection_definition",
    "connect",
    "etcd_range",
    "etcd_target",
    "etcdctl_env",
    "etcdctl_version_command",
    "export_collection",
    "index_params_from_definition",
    "milvus_target",
    "parse_etcdctl_version",
    "parse_snapshot_status",
    "path_component",
    "plan_point_in_time", "point_in_time_range",
    "primary_field",
    "protected_sets",
    "read_records",
    "redact_uri",
    "restore",
    "restore_etcd",
    "restore_full",
    "restore_to_time",
    "rows_per_request",
    "rows_to_batch",
    "schema_from_definition",
    "scratch_spec",
    "scratch_target",
    "sets_at",
    "snapshot_restore_command",
    "snapshot_save_command",
    "snapshot_status_command",
    "source_size",
    "target_from_cli",
    "verify",
    "verify_etcd",
    "verify_full",
    "versions",
]

SUPPORTED_TYPES = frozenset({"full", "etcd"})
RESTORE_TYPES = SUPPORTED_TYPES
DRILL_TYPES = SUPPORTED_TYPES
PITR_TYPES: frozenset[str] = frozenset()
# The options restore_full and restore_etcd take (each refuses the other's).
RESTORE_OPTIONS = frozenset(RestoreSettings.__dataclass_fields__) | ETCD_RESTORE_OPTIONS
DEFAULT_PORTS = {SOURCE_ROLE: DEFAULT_MILVUS_PORT, ETCD_ROLE: DEFAULT_ETCD_PORT}
CLEAR_DETAILS = frozenset({"server_version"})
SCRATCH_MILVUS_VERSION = "2.5.4"  # the scratch image when the manifest records no server version
SCRATCH_MILVUS_ENV = {"ETCD_USE_EMBED": "true", "ETCD_DATA_DIR": "/var/lib/milvus/etcd", "COMMON_STORAGETYPE": "local"}
SIZE_KEYS = ("source_bytes", "raw_bytes")  # details keys a manifest may record its source size under
TOKEN_ENV = "MILVUS_TOKEN"


def _check_type(backup_type: str) -> None:
    if backup_type not in SUPPORTED_TYPES:
        raise ValueError(f"milvus has no backup type {backup_type!r} (supported: {', '.join(sorted(SUPPORTED_TYPES))})")


def backup(ctx: BackupContext) -> BackupOutcome:
    _check_type(ctx.job.backup_type)
    return backup_full(ctx) if ctx.job.backup_type == "full" else backup_etcd(ctx)


def verify(backup_set: BackupSet, manifest: Manifest) -> list[str]:
    _check_type(manifest.backup_type)
    return verify_full(backup_set, manifest) if manifest.backup_type == "full" else verify_etcd(backup_set, manifest)


def restore(set_dir: Path, manifest: Manifest, target: Any, *, dry_run: bool = False,
            options: Mapping[str, Any] | None = None) -> RestoreReport:
    """`full`: collections into a Milvus URI, milvus-lite path or MilvusTarget; `etcd`: into a new data dir."""
    _check_type(manifest.backup_type)
    if manifest.backup_type == "full":
        return restore_full(Path(set_dir), manifest, target, dry_run=dry_run, options=options)
    return restore_etcd(Path(set_dir), manifest, target, dry_run=dry_run, options=options)


def check_restored(target: Any, set_dir: Path, manifest: Manifest, report: RestoreReport, ctx: CheckContext) -> Checks:
    """`full`: rows per collection and the sample searches; `etcd`: a scratch etcd's revision and key count."""
    _check_type(manifest.backup_type)
    if manifest.backup_type == "full":
        return check_full(target, manifest, report, ctx)
    return check_etcd(target, manifest, report, ctx)


# ───────────────────────── command line and drill ─────────────────────────


def _new_directory(target: str | None, what: str) -> Path:
    if not target:
        raise TargetUsageError(f"this restore needs --target: {what}")
    path = Path(target).absolute()
    if path.exists():
        raise TargetUsageError(f"--target {path} already exists: {what} must be a new directory")
    return path


def _milvus_from_connection(target_conn: str, get_connection: Callable[[str], Any]) -> MilvusTarget:
    try:
        return milvus_target(connection_for(target_conn, get_connection), target_conn)
    except ValueError as exc:
        raise TargetUsageError(str(exc)) from exc


def target_from_cli(backup_type: str, target: str | None, target_conn: str | None,
                    get_connection: Callable[[str], Any]) -> CliTarget:
    """`etcd`: --target, a new data directory. `full`: --target, a Milvus URI or milvus-lite .db path
    (token from $MILVUS_TOKEN), or --target-conn, a Milvus connection."""
    if backup_type not in SUPPORTED_TYPES:
        raise TargetUsageError(f"milvus has no backup type {backup_type!r} "
                               f"(supported: {', '.join(sorted(SUPPORTED_TYPES))})")
    if backup_type == "etcd":
        if target_conn:
            raise TargetUsageError("etcd restores take --target <new data directory>, not --target-conn")
        path = _new_directory(target, "the new etcd data directory")
        return CliTarget(path, f"new etcd data dir {path}")
    if target_conn and not target:
        resolved = _milvus_from_connection(target_conn, get_connection)
        return CliTarget(resolved, f"Milvus {resolved.display} (connection {target_conn})")
    if not target:
        raise TargetUsageError("milvus restores need --target: a Milvus URI (http://host:19530) or a milvus-lite "
                               f".db path (token in ${TOKEN_ENV}), or --target-conn <connection id>")
    token = os.environ.get(TOKEN_ENV, "")
    resolved = MilvusTarget(uri=target, token=token)
    return CliTarget(resolved, f"Milvus {resolved.display}" + (f" (token from ${TOKEN_ENV})" if token else ""))


def _release(version: Any) -> str | None:
    """'v2.5.4-gpu' → '2.5.4'; None when no version number is recorded."""
    match = re.search(r"\d+(?:\.\d+){0,2}", str(version or ""))
    return match.group(0) if match else None


def scratch_spec(backup_type: str, versions: Mapping[str, Any], *, pitr: bool = False) -> ScratchSpec:
    """`full`: milvus-lite locally, Milvus standalone of the recorded version in Docker; `etcd`: a local etcd."""
    _check_type(backup_type)
    if backup_type == "etcd":
        return ScratchSpec("etcd", None)
    version = _release(versions.get("milvus")) or SCRATCH_MILVUS_VERSION
    return ScratchSpec("milvus_lite", ContainerSpec(f"milvusdb/milvus:v{version}", DEFAULT_MILVUS_PORT,
                                                    dict(SCRATCH_MILVUS_ENV), ("milvus", "run", "standalone"),
                                                    uri_scheme="http"))


def scratch_target(info: TargetInfo) -> str:
    """The URI (milvus-lite path or Milvus URI) or the new etcd data dir of the started scratch target."""
    if info.kind not in ("milvus_lite", "etcd") or not info.uri:
        raise ValueError(f"milvus cannot restore into a scratch target of kind {info.kind!r} without a uri")
    return str(info.uri)


def versions(manifest: Manifest) -> dict[str, Any]:
    """The Milvus server version (`full`) and the etcdctl version (`etcd`) recorded in a manifest."""
    recorded = {
        "milvus": manifest.details.get("server_version") or manifest.tools.get("milvus"),
        "etcd": manifest.tools.get("etcdctl"),
    }
    return {name: value for name, value in recorded.items() if value and value != "unknown"}


def source_size(manifest: Manifest) -> int | None:
    """The uncompressed snapshot size (`etcd`); a collection export records none."""
    for key in SIZE_KEYS:
        value = manifest.details.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
