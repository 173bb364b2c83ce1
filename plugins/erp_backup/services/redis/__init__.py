"""Redis: RDB snapshots pulled with `redis-cli --rdb -`, checked with redis-check-rdb, restored into a scratch server.

Backup streams the RDB over the replication protocol straight from redis-cli's
stdout through zstd and SHA-256 into ``dump.rdb.zst`` (nothing raw touches the
disk). The manifest records, per db, the key counts from INFO keyspace before
and after the transfer, and a deterministic sample of keys (the first N of a
sorted SCAN per db) with type, size and a content digest computed server-side
by a read-only Lua script. Sampled keys that changed during the transfer are
dropped from the sample, so a live, busy Redis still yields an honest sample.

Restore decompresses the RDB into a scratch redis-server (AOF off, no save
points), then checks each db's key count against the manifest's range and the
sampled keys' digests. Keys with a TTL may legitimately have expired by then.

The password reaches redis-cli only through ``REDISCLI_AUTH``.

Modules: ``commands`` (argv, the digest script, parsing: pure), ``client`` (redis-cli
calls), ``rdb`` (backup, verify), ``restore`` (restore and the drill's checks). This
module holds the contract's remaining verbs (see ``erp_backup.services.base``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erp_backup.manifest import Manifest
from erp_backup.scratch.redis import ScratchRedis
from erp_backup.services.base import CliTarget, ScratchSpec, TargetUsageError
from erp_backup.services.base import newest_set_at as sets_at
from erp_backup.services.base import no_after_prune as after_prune
from erp_backup.services.base import no_point_in_time as plan_point_in_time
from erp_backup.services.base import no_point_in_time_range as point_in_time_range
from erp_backup.services.base import no_protected_sets as protected_sets
from erp_backup.services.base import no_records as read_records
from erp_backup.services.base import no_restore_to_time as restore_to_time
from erp_backup.services.redis.commands import RDB_FILE
from erp_backup.services.redis.rdb import backup, verify
from erp_backup.services.redis.restore import RESTORE_OPTIONS, check_restored, restore

if TYPE_CHECKING:
    from erp_backup.scratch.base import TargetInfo

__all__ = [
    "CLEAR_DETAILS",
    "DEFAULT_PORTS",
    "DRILL_TYPES",
    "PITR_TYPES",
    "RDB_FILE",
    "RESTORE_OPTIONS",
    "RESTORE_TYPES",
    "SUPPORTED_TYPES",
    "after_prune",
    "backup",
    "check_restored",
    "plan_point_in_time", "point_in_time_range",
    "protected_sets",
    "read_records",
    "restore",
    "restore_to_time",
    "scratch_spec",
    "scratch_target",
    "sets_at",
    "source_size",
    "target_from_cli",
    "verify",
    "versions",
]

SUPPORTED_TYPES = frozenset({"rdb"})
RESTORE_TYPES = frozenset({"rdb"})
DRILL_TYPES = frozenset({"rdb"})
PITR_TYPES: frozenset[str] = frozenset()
DEFAULT_PORTS = {"source": 6379}
CLEAR_DETAILS = frozenset({"redis_version", "rdb_bytes"})

TARGET_HELP = "a directory for a scratch redis-server that loads the RDB (new, or without a dump.rdb)"


def target_from_cli(backup_type: str, target: str | None, target_conn: str | None,
                    get_connection: Callable[[str], Any]) -> CliTarget:
    """A directory for the scratch redis-server the restore starts; never a running Redis."""
    if target_conn:
        raise TargetUsageError(f"redis restores load the RDB into a scratch redis-server, not into a connection: "
                               f"give --target: {TARGET_HELP}")
    if not target:
        raise TargetUsageError(f"redis restores need --target: {TARGET_HELP}")
    path = Path(target).absolute()
    if path.exists() and not path.is_dir():
        raise TargetUsageError(f"--target {path} exists and is not a directory ({TARGET_HELP})")
    return CliTarget(target={"dir": path}, description=f"scratch redis-server in {path}")


def scratch_spec(backup_type: str, versions: Mapping[str, Any], *, pitr: bool = False) -> ScratchSpec:
    """A local scratch redis-server (the restore starts it in the target's directory)."""
    return ScratchSpec("redis", None)


def scratch_target(info: TargetInfo) -> ScratchRedis:
    """The scratch server the drill prepared: not running yet; restore starts it on the chosen port."""
    if not info.base_dir:
        raise ValueError(f"redis scratch target has no base_dir: {info.describe()}")
    return ScratchRedis(dir=Path(info.base_dir) / "data", host=info.host or "127.0.0.1", port=info.port)


def versions(manifest: Manifest) -> dict[str, Any]:
    """The Redis version the set was taken from (the server's, else redis-cli's)."""
    version = manifest.details.get("redis_version")
    if not version or version == "unknown":
        version = manifest.tools.get("redis-cli")
    return {"redis": version} if version else {}


def source_size(manifest: Manifest) -> int | None:
    """The RDB's size before compression."""
    value = manifest.details.get("rdb_bytes")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
