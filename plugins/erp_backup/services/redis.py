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
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erp_backup.manifest import Manifest
from erp_backup.runner import Command, CommandError, Executor, LocalExecutor
from erp_backup.scratch.redis import DEFAULT_START_TIMEOUT_S, ScratchRedis
from erp_backup.services.base import BackupContext, BackupOutcome, SourceUnavailable
from erp_backup.sets import BackupSet
from erp_backup.stream import decompress_to, stream_to_file

log = logging.getLogger(__name__)

SUPPORTED_TYPES = frozenset({"rdb"})
RDB_FILE = "dump.rdb.zst"
RDB_MAGIC = b"REDIS"
# redis-cli 7.0 writes the 40-char hex EOF mark of a diskless transfer to stdout too.
EOF_MARK_SIZE = 40
_HEX = frozenset(b"0123456789abcdef")

DEFAULT_SAMPLE_KEYS = 50
DEFAULT_SCAN_LIMIT = 10_000
DEFAULT_DIGEST_MAX_ITEMS = 10_000
DEFAULT_DIGEST_MAX_BYTES = 16 << 20
DEFAULT_PORT = 6379

_UNREACHABLE_HINTS = ("Could not connect", "Connection refused", "Name or service not known", "timed out",
                      "No route to host", "Connection reset")
_AUTH_HINTS = ("WRONGPASS", "NOAUTH", "AUTH failed", "invalid password")

# Per key: type, PTTL, size, digest ('' when the value exceeds the limits or the type has no digest).
# Sets and hashes are digested order-independently (XOR of per-member SHA-1s), so a reload that
# re-orders a hash table still matches.
DIGEST_SCRIPT = """
local max_items = tonumber(ARGV[1])
local max_bytes = tonumber(ARGV[2])
local function framed(parts)
  local out = {}
  for i = 1, #parts do
    local part = tostring(parts[i])
    out[i] = #part .. ':' .. part
  end
  return table.concat(out)
end
local function ordered(parts)
  return redis.sha1hex(framed(parts))
end
local function unordered(parts, width)
  local acc = {0, 0, 0, 0, 0}
  for i = 1, #parts, width do
    local hex = redis.sha1hex(framed({unpack(parts, i, i + width - 1)}))
    for k = 1, 5 do
      acc[k] = bit.bxor(acc[k], tonumber(string.sub(hex, k * 8 - 7, k * 8), 16))
    end
  end
  for k = 1, 5 do acc[k] = bit.tohex(acc[k], 8) end
  return table.concat(acc)
end
local out = {}
for _, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key)['ok']
  local size, digest = 0, ''
  if kind == 'string' then
    size = redis.call('STRLEN', key)
    if size <= max_bytes then digest = redis.sha1hex(redis.call('GET', key)) end
  elseif kind == 'list' then
    size = redis.call('LLEN', key)
    if size <= max_items then digest = ordered(redis.call('LRANGE', key, 0, -1)) end
  elseif kind == 'set' then
    size = redis.call('SCARD', key)
    if size <= max_items then digest = unordered(redis.call('SMEMBERS', key), 1) end
  elseif kind == 'hash' then
    size = redis.call('HLEN', key)
    if size <= max_items then digest = unordered(redis.call('HGETALL', key), 2) end
  elseif kind == 'zset' then
    size = redis.call('ZCARD', key)
    if size <= max_items then digest = ordered(redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')) end
  elseif kind == 'stream' then
    size = redis.call('XLEN', key)
    if size <= max_items then
      local parts = {}
      for _, entry in ipairs(redis.call('XRANGE', key, '-', '+')) do
        parts[#parts + 1] = entry[1]
        parts[#parts + 1] = #entry[2]
        for _, value in ipairs(entry[2]) do parts[#parts + 1] = value end
      end
      digest = ordered(parts)
    end
  end
  out[#out + 1] = kind
  out[#out + 1] = tostring(redis.call('PTTL', key))
  out[#out + 1] = tostring(size)
  out[#out + 1] = digest
end
return out
"""
DIGEST_SCRIPT_SHA1 = hashlib.sha1(DIGEST_SCRIPT.encode()).hexdigest()


class RdbStreamError(RuntimeError):
    """redis-cli --rdb produced something that is not an RDB file."""


class RestoreCheckFailed(RuntimeError):
    """The restored data does not match the manifest. `report` holds every check."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class RedisEndpoint:
    host: str
    port: int
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    cacert: str | None = None

    @classmethod
    def from_connection(cls, conn: Any) -> RedisEndpoint:
        extra = getattr(conn, "extra_dejson", None) or {}
        return cls(
            host=conn.host or "127.0.0.1",
            port=int(conn.port or DEFAULT_PORT),
            user=conn.login or None,
            password=conn.password or None,
            tls=bool(extra.get("tls") or extra.get("ssl")),
            cacert=extra.get("cacert") or extra.get("ssl_ca_certs"),
        )

    @classmethod
    def from_scratch(cls, server: ScratchRedis) -> RedisEndpoint:
        assert server.port is not None, "scratch server has no port: start it first"
        return cls(host=server.host, port=server.port, password=server.password)


@dataclass(frozen=True)
class SampledKey:
    db: int
    key: str
    type: str
    persistent: bool
    size: int
    digest: str

    def as_dict(self) -> dict[str, Any]:
        return {"db": self.db, "key": self.key, "type": self.type, "persistent": self.persistent,
                "size": self.size, "digest": self.digest}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SampledKey:
        return cls(db=int(data["db"]), key=data["key"], type=data["type"], persistent=bool(data["persistent"]),
                   size=int(data["size"]), digest=data["digest"])


# -- commands (pure) ----------------------------------------------------------------------------------


def cli_command(endpoint: RedisEndpoint, *args: str, db: int | None = None, fail_on_error: bool = True) -> Command:
    """redis-cli against `endpoint`; the password travels in REDISCLI_AUTH only."""
    argv: list[str] = ["redis-cli", "-h", endpoint.host, "-p", str(endpoint.port)]
    if endpoint.user:
        argv += ["--user", endpoint.user]
    if endpoint.tls:
        argv.append("--tls")
        if endpoint.cacert:
            argv += ["--cacert", endpoint.cacert]
    if db is not None:
        argv += ["-n", str(db)]
    if fail_on_error:
        argv.append("-e")
    argv += args
    env = {"REDISCLI_AUTH": endpoint.password} if endpoint.password else {}
    return Command(tuple(argv), env)


def rdb_command(endpoint: RedisEndpoint) -> Command:
    """Pull an RDB over the replication protocol, to stdout."""
    return cli_command(endpoint, "--rdb", "-", fail_on_error=False)


def info_command(endpoint: RedisEndpoint, section: str) -> Command:
    return cli_command(endpoint, "INFO", section)


def scan_command(endpoint: RedisEndpoint, db: int) -> Command:
    return cli_command(endpoint, "--scan", db=db, fail_on_error=False)


def digest_command(
    endpoint: RedisEndpoint, db: int, keys: Iterable[str], max_items: int = DEFAULT_DIGEST_MAX_ITEMS,
    max_bytes: int = DEFAULT_DIGEST_MAX_BYTES,
) -> Command:
    """Run the (cached) digest script over `keys` of one db."""
    keys = tuple(keys)
    return cli_command(
        endpoint, "--raw", "EVALSHA", DIGEST_SCRIPT_SHA1, str(len(keys)), *keys, str(max_items), str(max_bytes),
        db=db,
    )


def load_script_command(endpoint: RedisEndpoint) -> Command:
    """Put the digest script in the server's script cache (once; later calls use EVALSHA)."""
    return cli_command(endpoint, "SCRIPT", "LOAD", DIGEST_SCRIPT)


def cli_version_command() -> Command:
    return Command(("redis-cli", "--version"))


def check_rdb_command(path: Path) -> Command:
    return Command(("redis-check-rdb", str(path)))


# -- pure helpers ------------------------------------------------------------------------------------


def strip_eof_mark(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Pass RDB bytes through, dropping the trailing EOF mark redis-cli 7.0 leaves on stdout.

    A real RDB ends with the 0xFF opcode and an 8-byte checksum, so its last 40 bytes are never
    all lowercase hex; a diskless transfer's EOF mark always is. Raises RdbStreamError if the
    stream does not start like an RDB.
    """
    tail = b""
    checked = False
    for chunk in chunks:
        if not chunk:
            continue
        tail += chunk
        if not checked and len(tail) >= len(RDB_MAGIC):
            if not tail.startswith(RDB_MAGIC):
                raise RdbStreamError(f"not an RDB stream (starts with {tail[:16]!r})")
            checked = True
        if len(tail) > EOF_MARK_SIZE:
            yield tail[:-EOF_MARK_SIZE]
            tail = tail[-EOF_MARK_SIZE:]
    if not checked:
        raise RdbStreamError(f"redis-cli --rdb produced {len(tail)} bytes, not an RDB")
    if not (len(tail) == EOF_MARK_SIZE and set(tail) <= _HEX):
        yield tail


def parse_info(text: str) -> dict[str, str]:
    """INFO output as a flat field → value mapping."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and ":" in line:
            name, _, value = line.partition(":")
            fields[name] = value
    return fields


def parse_keyspace(text: str) -> dict[int, dict[str, int]]:
    """INFO keyspace → {db: {"keys": n, "expires": n}}."""
    keyspace: dict[int, dict[str, int]] = {}
    for name, value in parse_info(text).items():
        if name.startswith("db") and name[2:].isdigit():
            stats = dict(item.split("=", 1) for item in value.split(",") if "=" in item)
            keyspace[int(name[2:])] = {"keys": int(stats.get("keys", 0)), "expires": int(stats.get("expires", 0))}
    return keyspace


def keyspace_to_json(keyspace: Mapping[int, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    return {str(db): dict(stats) for db, stats in sorted(keyspace.items())}


def keyspace_from_json(data: Mapping[str, Mapping[str, int]]) -> dict[int, dict[str, int]]:
    return {int(db): dict(stats) for db, stats in data.items()}


def expected_key_counts(
    before: Mapping[int, Mapping[str, int]], after: Mapping[int, Mapping[str, int]]
) -> dict[int, tuple[int, int]]:
    """Per db, the (min, max) key count a restore of the RDB may show.

    The RDB was cut between the two INFO readings, and keys with a TTL may expire before
    the restore loads them, so the lower bound drops every volatile key.
    """
    empty = {"keys": 0, "expires": 0}
    ranges: dict[int, tuple[int, int]] = {}
    for db in sorted(set(before) | set(after)):
        b, a = before.get(db, empty), after.get(db, empty)
        low = max(0, min(b["keys"], a["keys"]) - max(b["expires"], a["expires"]))
        ranges[db] = (low, max(b["keys"], a["keys"]))
    return ranges


def choose_sample(keys: Iterable[str], size: int) -> list[str]:
    """The first `size` keys in sorted order: deterministic for a given keyspace."""
    return sorted(set(keys))[:size]


def parse_digests(db: int, keys: list[str], output: bytes) -> list[SampledKey]:
    lines = output.decode("utf-8", errors="replace").split("\n")
    if len(lines) < 4 * len(keys):
        raise ValueError(f"digest script returned {len(lines)} lines for {len(keys)} keys")
    sampled = []
    for index, key in enumerate(keys):
        kind, pttl, size, digest = (line.strip() for line in lines[4 * index: 4 * index + 4])
        sampled.append(SampledKey(db=db, key=key, type=kind, persistent=pttl == "-1", size=int(size or 0),
                                  digest=digest))
    return sampled


def compare_sample(expected: Iterable[SampledKey], restored: Mapping[tuple[int, str], SampledKey]) -> dict[str, Any]:
    """Check restored keys against the manifest's sample. Vanished keys with a TTL count as expired."""
    matched, expired, problems = 0, 0, []
    for want in expected:
        got = restored.get((want.db, want.key))
        if got is None or got.type == "none":
            if want.persistent:
                problems.append(f"db{want.db} key {want.key!r}: missing after restore")
            else:
                expired += 1
            continue
        if (got.type, got.size, got.digest) != (want.type, want.size, want.digest):
            problems.append(
                f"db{want.db} key {want.key!r}: restored {got.type}/{got.size} items/{got.digest[:12] or '-'}, "
                f"backup had {want.type}/{want.size} items/{want.digest[:12] or '-'}"
            )
            continue
        matched += 1
    return {"matched": matched, "expired": expired, "problems": problems}


def check_key_counts(
    ranges: Mapping[int, tuple[int, int]], restored: Mapping[int, Mapping[str, int]]
) -> tuple[dict[str, dict[str, int]], list[str]]:
    checks: dict[str, dict[str, int]] = {}
    problems: list[str] = []
    for db in sorted(set(ranges) | set(restored)):
        low, high = ranges.get(db, (0, 0))
        keys = restored.get(db, {}).get("keys", 0)
        checks[str(db)] = {"restored": keys, "expected_min": low, "expected_max": high}
        if not low <= keys <= high:
            expected = str(low) if low == high else f"{low}..{high}"
            problems.append(f"db{db}: {keys} keys restored, backup had {expected}")
    return checks, problems


def _stdout_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    pending = b""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from lines
    if pending:
        yield pending


# -- talking to Redis --------------------------------------------------------------------------------


class _Redis:
    """redis-cli calls against one endpoint, with errors that name the connection."""

    def __init__(self, endpoint: RedisEndpoint, executor: Executor, label: str):
        self.endpoint, self.executor, self.label = endpoint, executor, label

    def _unavailable(self, exc: CommandError) -> Exception:
        lines = [line.strip() for line in exc.stderr.splitlines() if line.strip()]
        detail = lines[-1] if lines else str(exc)
        where = f"{self.label}: Redis at {self.endpoint.host}:{self.endpoint.port}"
        auth_lines = [line for line in lines if any(hint in line for hint in _AUTH_HINTS)]
        if auth_lines:
            return SourceUnavailable(f"{where} rejected the credentials ({auth_lines[0]}); "
                                     "fix the login/password there")
        if exc.returncode is None or any(hint in exc.stderr for hint in _UNREACHABLE_HINTS):
            return SourceUnavailable(f"{where} is unreachable: {detail}")
        if "NOPERM" in exc.stderr:
            return PermissionError(
                f"{where}: the Redis user lacks a permission ({detail}); grant it in the Redis ACL "
                "(a backup needs INFO, SCAN, EVAL, TYPE and SYNC) or set options.sample_keys: 0 to skip sampling"
            )
        return exc

    def run(self, command: Command) -> bytes:
        try:
            return self.executor.run(command)
        except CommandError as exc:
            mapped = self._unavailable(exc)
            if mapped is exc:
                raise
            raise mapped from exc

    def info(self, section: str) -> str:
        return self.run(info_command(self.endpoint, section)).decode(errors="replace")

    def keyspace(self) -> dict[int, dict[str, int]]:
        return parse_keyspace(self.info("keyspace"))

    def scan(self, db: int, limit: int) -> list[str]:
        keys: list[str] = []
        stream = self.executor.stream(scan_command(self.endpoint, db))
        try:
            for raw in _stdout_lines(stream):
                try:
                    keys.append(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    continue  # not representable in the manifest; never sampled
                if len(keys) >= limit:
                    break
        except CommandError as exc:
            mapped = self._unavailable(exc)
            if mapped is exc:
                raise
            raise mapped from exc
        finally:
            close = getattr(stream, "close", None)
            if close:
                close()
        return keys

    def digests(self, db: int, keys: list[str], max_items: int, max_bytes: int) -> list[SampledKey]:
        if not keys:
            return []
        command = digest_command(self.endpoint, db, keys, max_items, max_bytes)
        try:
            output = self.run(command)
        except CommandError as exc:
            if "NOSCRIPT" not in exc.stderr:
                raise
            self.run(load_script_command(self.endpoint))
            output = self.run(command)
        return parse_digests(db, keys, output)


@dataclass(frozen=True)
class SampleLimits:
    keys: int = DEFAULT_SAMPLE_KEYS
    scan_limit: int = DEFAULT_SCAN_LIMIT
    max_items: int = DEFAULT_DIGEST_MAX_ITEMS
    max_bytes: int = DEFAULT_DIGEST_MAX_BYTES

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> SampleLimits:
        return cls(
            keys=int(options.get("sample_keys", DEFAULT_SAMPLE_KEYS)),
            scan_limit=int(options.get("scan_limit", DEFAULT_SCAN_LIMIT)),
            max_items=int(options.get("digest_max_items", DEFAULT_DIGEST_MAX_ITEMS)),
            max_bytes=int(options.get("digest_max_bytes", DEFAULT_DIGEST_MAX_BYTES)),
        )


def _sample(redis: _Redis, dbs: Iterable[int], limits: SampleLimits) -> list[SampledKey]:
    sampled: list[SampledKey] = []
    if limits.keys <= 0:
        return sampled
    for db in sorted(dbs):
        keys = choose_sample(redis.scan(db, limits.scan_limit), limits.keys)
        sampled += [key for key in redis.digests(db, keys, limits.max_items, limits.max_bytes) if key.type != "none"]
    return sampled


def _redigest(redis: _Redis, sample: list[SampledKey], limits: SampleLimits) -> dict[tuple[int, str], SampledKey]:
    by_db: dict[int, list[str]] = {}
    for key in sample:
        by_db.setdefault(key.db, []).append(key.key)
    current: dict[tuple[int, str], SampledKey] = {}
    for db, keys in by_db.items():
        for key in redis.digests(db, keys, limits.max_items, limits.max_bytes):
            current[(db, key.key)] = key
    return current


# -- the service verbs -------------------------------------------------------------------------------


def backup(ctx: BackupContext, executor: Executor | None = None) -> BackupOutcome:
    """Stream an RDB into dump.rdb.zst and describe the keyspace it should contain."""
    conn_id = ctx.conn_id("source")
    endpoint = RedisEndpoint.from_connection(ctx.connection("source"))
    executor = executor or LocalExecutor()
    redis = _Redis(endpoint, executor, f"connection {conn_id!r}")
    limits = SampleLimits.from_options(ctx.options)

    server = parse_info(redis.info("server"))
    before = redis.keyspace()
    sample = _sample(redis, before, limits)

    started = time.monotonic()
    try:
        result = stream_to_file(
            strip_eof_mark(executor.stream(rdb_command(endpoint))), ctx.set_dir, RDB_FILE,
            level=int(ctx.options.get("compress_level", 3)),
        )
    except CommandError as exc:
        mapped = redis._unavailable(exc)
        if mapped is exc:
            raise
        raise mapped from exc
    transfer_seconds = time.monotonic() - started

    after = redis.keyspace()
    current = _redigest(redis, sample, limits)
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


def _scratch_target(target: Any, options: Mapping[str, Any]) -> tuple[ScratchRedis, bool, Path | None]:
    """(server, owned by us, temp dir to remove) for a ScratchRedis or a dict description."""
    if isinstance(target, ScratchRedis):
        return target, False, None
    spec = dict(target or {})
    unknown = set(spec) - {"dir", "port", "password", "dbfilename", "server_binary"}
    if unknown:
        raise ValueError(f"redis restore target: unknown keys {sorted(unknown)} "
                         "(allowed: dir, port, password, dbfilename, server_binary)")
    temp_dir = None
    if "dir" not in spec:
        temp_dir = Path(tempfile.mkdtemp(prefix="erp-redis-restore-", dir=options.get("temp_dir")))
        spec["dir"] = temp_dir
    return ScratchRedis(**spec), True, temp_dir


def restore(set_dir: Path, manifest: Manifest, target: Any = None, **options: Any) -> dict[str, Any]:
    """Load the RDB into a scratch redis-server and compare key counts and sampled keys with the manifest.

    `target` is a ScratchRedis (not running; the caller stops it) or a dict (`dir`, `port`, `password`,
    `dbfilename`) for a server this call starts and stops unless `keep_running=True`.
    Options: `dry_run`, `keep_running`, `overwrite` (an existing RDB in the target dir),
    `start_timeout` (s), `strict` (raise RestoreCheckFailed on any mismatch, default True).
    """
    set_dir = Path(set_dir)
    source = set_dir / RDB_FILE
    server, owned, temp_dir = _scratch_target(target, options)
    keep_running = bool(options.get("keep_running", False)) or not owned
    report: dict[str, Any] = {"backup_id": manifest.backup_id, "rdb_file": str(source),
                              "target_dir": str(server.dir), "dry_run": bool(options.get("dry_run"))}
    if report["dry_run"]:
        log.info("dry run: would decompress %s to %s and start a scratch redis-server there",
                 source, server.data_file)
        report["would"] = [f"decompress {source} to {server.data_file}",
                           "start scratch redis-server (AOF off, no save points) on a free 127.0.0.1 port",
                           "compare key counts per db and sampled keys with the manifest"]
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
        return report
    if server.is_running():
        raise ValueError(f"scratch redis in {server.dir} is already running; restore needs a stopped server")
    if server.data_file.exists() and not options.get("overwrite"):
        raise FileExistsError(f"{server.data_file} exists; pass overwrite=True to replace it")

    started = time.monotonic()
    server.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    report["rdb_bytes"] = decompress_to(source, server.data_file)
    report["decompress_seconds"] = round(time.monotonic() - started, 3)

    try:
        loading = time.monotonic()
        server.start(timeout=float(options.get("start_timeout", DEFAULT_START_TIMEOUT_S)))
        report["load_seconds"] = round(time.monotonic() - loading, 3)
        report["target"] = {"host": server.host, "port": server.port, "pid": server.pid}
        checking = time.monotonic()
        scratch = _Redis(RedisEndpoint.from_scratch(server), LocalExecutor(), f"scratch redis in {server.dir}")
        restored = scratch.keyspace()
        ranges = expected_key_counts(
            keyspace_from_json(manifest.details.get("keyspace", {})),
            keyspace_from_json(manifest.details.get("keyspace_after", {})),
        )
        counts, problems = check_key_counts(ranges, restored)
        sample = [SampledKey.from_dict(item) for item in manifest.details.get("sample", [])]
        recorded = manifest.details.get("sample_limits", {})
        limits = SampleLimits(
            max_items=int(recorded.get("digest_max_items", DEFAULT_DIGEST_MAX_ITEMS)),
            max_bytes=int(recorded.get("digest_max_bytes", DEFAULT_DIGEST_MAX_BYTES)),
        )
        sample_check = compare_sample(sample, _redigest(scratch, sample, limits))
        problems += sample_check["problems"]
        report.update(
            keys_restored=sum(stats["keys"] for stats in restored.values()),
            key_counts=counts,
            sampled_keys=len(sample),
            sampled_keys_matched=sample_check["matched"],
            sampled_keys_expired=sample_check["expired"],
            check_seconds=round(time.monotonic() - checking, 3),
            total_seconds=round(time.monotonic() - started, 3),
            problems=problems,
            ok=not problems,
            kept_running=keep_running,
        )
    finally:
        if not keep_running:
            server.stop()
            if temp_dir:
                shutil.rmtree(temp_dir, ignore_errors=True)
    log.info("redis restore of %s: %d keys, %d/%d sampled keys matched, %d problems",
             manifest.backup_id, report["keys_restored"], report["sampled_keys_matched"], len(sample),
             len(problems))
    if problems and options.get("strict", True):
        raise RestoreCheckFailed(
            f"redis restore of backup {manifest.backup_id} does not match its manifest: " + "; ".join(problems[:5]),
            report,
        )
    return report
