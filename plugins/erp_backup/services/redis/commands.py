"""Redis commands and pure decisions: redis-cli argv and environment, the digest script, INFO parsing, checks.

Everything here is data in, data out: the unit tests assert these tuples and results.
The password reaches redis-cli only through ``REDISCLI_AUTH``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erp_backup.runner import Command

if TYPE_CHECKING:
    from erp_backup.scratch.redis import ScratchRedis

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
