"""Talking to a Redis server through redis-cli: INFO, SCAN and the digest script, with errors that name the connection."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from erp_backup.runner import Command, CommandError, Executor
from erp_backup.services.base import SourceUnavailable
from erp_backup.services.redis.commands import (
    DEFAULT_DIGEST_MAX_BYTES,
    DEFAULT_DIGEST_MAX_ITEMS,
    DEFAULT_SAMPLE_KEYS,
    DEFAULT_SCAN_LIMIT,
    RedisEndpoint,
    SampledKey,
    choose_sample,
    digest_command,
    info_command,
    load_script_command,
    parse_digests,
    parse_keyspace,
    scan_command,
)

_UNREACHABLE_HINTS = ("Could not connect", "Connection refused", "Name or service not known", "timed out",
                      "No route to host", "Connection reset")
_AUTH_HINTS = ("WRONGPASS", "NOAUTH", "AUTH failed", "invalid password")


def _stdout_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    pending = b""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from lines
    if pending:
        yield pending


class RedisCli:
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

    def reraise(self, exc: CommandError) -> NoReturn:
        """Raise `exc` as SourceUnavailable or PermissionError when it says so, else as it is."""
        mapped = self._unavailable(exc)
        if mapped is exc:
            raise exc
        raise mapped from exc

    def run(self, command: Command) -> bytes:
        try:
            return self.executor.run(command)
        except CommandError as exc:
            self.reraise(exc)

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
            self.reraise(exc)
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


def sample_keys(redis: RedisCli, dbs: Iterable[int], limits: SampleLimits) -> list[SampledKey]:
    sampled: list[SampledKey] = []
    if limits.keys <= 0:
        return sampled
    for db in sorted(dbs):
        keys = choose_sample(redis.scan(db, limits.scan_limit), limits.keys)
        sampled += [key for key in redis.digests(db, keys, limits.max_items, limits.max_bytes) if key.type != "none"]
    return sampled


def redigest(redis: RedisCli, sample: list[SampledKey], limits: SampleLimits) -> dict[tuple[int, str], SampledKey]:
    by_db: dict[int, list[str]] = {}
    for key in sample:
        by_db.setdefault(key.db, []).append(key.key)
    current: dict[tuple[int, str], SampledKey] = {}
    for db, keys in by_db.items():
        for key in redis.digests(db, keys, limits.max_items, limits.max_bytes):
            current[(db, key.key)] = key
    return current

