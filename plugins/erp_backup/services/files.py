"""Configuration files: directory trees such as /etc/gitlab, TLS certificates, the compose .env, nginx configs.

The plan lists absolute paths (``options.paths``); the source connection (type ``fs``)
gives the root they are read under in its extra ``path`` (``/`` on the host itself,
``/host`` in a worker container that mounts the host's config read-only). Optional
``options.exclude`` holds glob patterns matched against each entry's path.

One backup is ``files.tar.zst``: a POSIX tar, streamed through zstd and hashed as it is
written. The manifest lists every entry with its type, mode, owner and group (numeric
and by name), size, SHA-256 of the bytes archived, and a symlink's target. Sockets,
devices and FIFOs are skipped with a warning. It restores with standard tools:
``zstd -d < files.tar.zst | tar -x --numeric-owner -C TARGET``. ``restore`` extracts into
a new directory with the same modes (and owners when run as root) and compares the
tree with the manifest entry by entry.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import stat
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, cast

import zstandard

from erp_backup.manifest import Manifest
from erp_backup.services.base import (
    BackupContext,
    BackupOutcome,
    CheckContext,
    Checks,
    CliTarget,
    RestoreReport,
    ScratchSpec,
    SourceUnavailable,
    TargetUsageError,
    connection_for,
)
from erp_backup.services.base import newest_set_at as sets_at  # noqa: F401
from erp_backup.services.base import no_after_prune as after_prune  # noqa: F401
from erp_backup.services.base import no_point_in_time as plan_point_in_time  # noqa: F401
from erp_backup.services.base import no_point_in_time_range as point_in_time_range  # noqa: F401
from erp_backup.services.base import no_protected_sets as protected_sets  # noqa: F401
from erp_backup.services.base import no_records as read_records  # noqa: F401
from erp_backup.services.base import no_restore_to_time as restore_to_time  # noqa: F401
from erp_backup.sets import BackupSet
from erp_backup.stream import open_chain

if TYPE_CHECKING:
    from erp_backup.scratch.base import TargetInfo

SUPPORTED_TYPES = frozenset({"full"})
RESTORE_TYPES = frozenset({"full"})
DRILL_TYPES = frozenset({"full"})
PITR_TYPES: frozenset[str] = frozenset()
RESTORE_OPTIONS: frozenset[str] = frozenset()
DEFAULT_PORTS: Mapping[str, int] = {}
CLEAR_DETAILS: frozenset[str] = frozenset({"source_bytes"})  # read from a mounted directory, no network endpoint

ARCHIVE = "files.tar.zst"
CHUNK = 1 << 20
KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink"}


@dataclass(frozen=True)
class Entry:
    """One archived path, as the manifest records it (path relative to the root, POSIX)."""

    path: str
    kind: str  # file | dir | symlink
    mode: int
    uid: int
    gid: int
    owner: str
    group: str
    size: int = 0
    sha256: str | None = None
    target: str | None = None  # a symlink's target

    def as_dict(self) -> dict[str, Any]:
        data = {"path": self.path, "kind": self.kind, "mode": f"{self.mode:04o}", "uid": self.uid, "gid": self.gid,
                "owner": self.owner, "group": self.group, "size": self.size}
        if self.sha256 is not None:
            data["sha256"] = self.sha256
        if self.target is not None:
            data["target"] = self.target
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Entry:
        return cls(path=data["path"], kind=data["kind"], mode=int(data["mode"], 8), uid=int(data["uid"]),
                   gid=int(data["gid"]), owner=data.get("owner", ""), group=data.get("group", ""),
                   size=int(data.get("size", 0)), sha256=data.get("sha256"), target=data.get("target"))


# ───────────────────────── what to archive ─────────────────────────


def source_root(ctx: BackupContext) -> Path:
    """The root the plan's paths are read under: the fs connection's extra `path` (default /)."""
    conn = ctx.connection()
    extra = conn.extra_dejson if hasattr(conn, "extra_dejson") else {}
    return Path(extra.get("path") or "/")


def plan_paths(options: Mapping[str, Any]) -> list[PurePosixPath]:
    paths = options.get("paths")
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p.startswith("/") for p in paths):
        raise ValueError("files: the plan needs options.paths, a list of absolute paths (e.g. [/etc/gitlab])")
    return [PurePosixPath(p) for p in paths]


def _excluded(relative: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(relative, p.lstrip("/")) or fnmatch.fnmatch("/" + relative, p) for p in patterns)


def walk(root: Path, paths: list[PurePosixPath], exclude: list[str]) -> Iterator[tuple[str, Path]]:
    """(relative path, absolute path) of every entry under the plan's paths, parents first, sorted."""
    for wanted in paths:
        top = root / str(wanted).lstrip("/")
        if not top.exists() and not top.is_symlink():
            raise SourceUnavailable(f"files: {wanted} does not exist under {root} (the fs connection's extra path)")
        for parent in reversed(PurePosixPath(str(wanted).lstrip("/")).parents[:-1]):
            yield str(parent), root / str(parent)
        yield from _walk_tree(root, top, exclude)


def _walk_tree(root: Path, top: Path, exclude: list[str]) -> Iterator[tuple[str, Path]]:
    relative = top.relative_to(root).as_posix()
    if _excluded(relative, exclude):
        return
    yield relative, top
    if top.is_dir() and not top.is_symlink():
        for child in sorted(top.iterdir(), key=lambda p: p.name):
            yield from _walk_tree(root, child, exclude)


# ───────────────────────── backup ─────────────────────────


class _HashingReader:
    """Hands a file to tarfile while hashing exactly the bytes archived."""

    def __init__(self, handle: IO[bytes]):
        self.handle, self.digest = handle, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        return data


def _names(info: os.stat_result) -> tuple[str, str]:
    import grp
    import pwd

    try:
        owner = pwd.getpwuid(info.st_uid).pw_name
    except KeyError:
        owner = ""
    try:
        group = grp.getgrgid(info.st_gid).gr_name
    except KeyError:
        group = ""
    return owner, group


def _archive_one(tar: tarfile.TarFile, relative: str, path: Path) -> Entry | str:
    """Add one path; returns its Entry, or a warning for a type that is not archived."""
    info = path.lstat()
    kind = KINDS.get(stat.S_IFMT(info.st_mode))
    if kind is None:
        return f"files: skipped {relative}: not a file, directory or symlink"
    owner, group = _names(info)
    member = tar.gettarinfo(str(path), arcname=relative)
    member.uname, member.gname = owner, group
    if kind == "file":  # a hard link is archived as its own copy, so every file restores on its own
        member.type, member.linkname, member.size = tarfile.REGTYPE, "", info.st_size
    entry = Entry(path=relative, kind=kind, mode=stat.S_IMODE(info.st_mode), uid=info.st_uid, gid=info.st_gid,
                  owner=owner, group=group)
    if kind != "file":
        tar.addfile(member)
        return replace(entry, target=os.readlink(path) if kind == "symlink" else None)
    with open(path, "rb") as handle:
        reader = _HashingReader(handle)
        tar.addfile(member, cast(IO[bytes], reader))  # tarfile only calls read()
    return replace(entry, size=member.size, sha256=reader.digest.hexdigest())


def backup(ctx: BackupContext) -> BackupOutcome:
    root = source_root(ctx)
    paths = plan_paths(ctx.options)
    exclude = list(ctx.options.get("exclude") or [])
    chain = open_chain(ctx.set_dir, ARCHIVE, level=int(ctx.options.get("compress_level", 3)), label="files")
    entries: list[Entry] = []
    warnings: list[str] = []
    try:
        with tarfile.open(fileobj=chain, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            seen: set[str] = set()
            for relative, path in walk(root, paths, exclude):
                if relative in seen:
                    continue
                seen.add(relative)
                found = _archive_one(tar, relative, path)
                (warnings if isinstance(found, str) else entries).append(found)  # type: ignore[arg-type]
        result = chain.finish()
    except BaseException:
        chain.abort()
        raise
    return BackupOutcome(
        files=[result.entry],
        source={"root": str(root), "paths": [str(p) for p in paths], "exclude": exclude},
        tools={"tar": f"python tarfile (PAX), zstandard {zstandard.__version__}"},
        details={"entries": [e.as_dict() for e in entries], "source_bytes": sum(e.size for e in entries),
                 "counts": _counts(entries)},
        warnings=warnings,
    )


def _counts(entries: list[Entry]) -> dict[str, int]:
    return {kind: sum(1 for e in entries if e.kind == kind) for kind in ("file", "dir", "symlink")}


def manifest_entries(manifest: Manifest) -> list[Entry]:
    return [Entry.from_dict(item) for item in manifest.details.get("entries") or []]


# ───────────────────────── verify ─────────────────────────


def _open_archive(set_dir: Path) -> Iterator[tuple[tarfile.TarInfo, str | None]]:
    """Each member of the archive with the SHA-256 of its data (None for non-files)."""
    with open(set_dir / ARCHIVE, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as plain, \
            tarfile.open(fileobj=plain, mode="r|") as tar:
        for member in tar:
            digest = None
            if member.isfile():
                handle = tar.extractfile(member)
                assert handle is not None
                digest = _stream_sha256(handle)
            yield member, digest


def verify(backup_set: BackupSet, manifest: Manifest) -> list[str]:
    """Read the whole archive: every manifest entry is there, with its type and content hash."""
    expected = {e.path: e for e in manifest_entries(manifest)}
    problems: list[str] = []
    seen: set[str] = set()
    try:
        for member, digest in _open_archive(backup_set.path):
            entry = expected.get(member.name)
            seen.add(member.name)
            if entry is None:
                problems.append(f"{member.name}: in the archive, not in the manifest")
            elif entry.kind == "file" and digest != entry.sha256:
                problems.append(f"{member.name}: SHA-256 in the archive differs from the manifest")
    except (tarfile.TarError, zstandard.ZstdError, OSError) as exc:
        return [*problems, f"{ARCHIVE} cannot be read: {exc}"]
    problems += [f"{path}: in the manifest, not in the archive" for path in sorted(set(expected) - seen)]
    return problems


# ───────────────────────── restore ─────────────────────────


def compare_tree(target: Path, entries: list[Entry]) -> Checks:
    """The restored tree against the manifest: type, mode, content, link target, and owners when root."""
    problems: list[str] = []
    as_root = os.geteuid() == 0
    for entry in entries:
        problems += _entry_problems(target / entry.path, entry, as_root)
    counts = _counts(entries)
    owners = "and owners " if as_root else ""
    checks = [] if problems else [
        f"{counts['file']} files, {counts['dir']} directories, {counts['symlink']} symlinks: "
        f"types, modes {owners}and SHA-256s match the manifest"]
    return Checks(checks=checks, problems=problems)


def _entry_problems(path: Path, entry: Entry, as_root: bool) -> list[str]:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return [f"{entry.path}: missing after restore"]
    kind = KINDS.get(stat.S_IFMT(info.st_mode))
    if kind != entry.kind:
        return [f"{entry.path}: is a {kind or 'special file'} after restore, the backup has a {entry.kind}"]
    problems = []
    if kind != "symlink" and stat.S_IMODE(info.st_mode) != entry.mode:
        problems.append(f"{entry.path}: mode {stat.S_IMODE(info.st_mode):04o}, the backup has {entry.mode:04o}")
    if as_root and (info.st_uid, info.st_gid) != (entry.uid, entry.gid):
        problems.append(f"{entry.path}: owner {info.st_uid}:{info.st_gid}, the backup has {entry.uid}:{entry.gid}")
    if kind == "symlink" and os.readlink(path) != entry.target:
        problems.append(f"{entry.path}: links to {os.readlink(path)}, the backup links to {entry.target}")
    if kind == "file" and _sha256(path) != entry.sha256:
        problems.append(f"{entry.path}: content differs from the backup (SHA-256)")
    return problems


def _stream_sha256(handle: IO[bytes]) -> str:
    hasher = hashlib.sha256()
    while block := handle.read(CHUNK):
        hasher.update(block)
    return hasher.hexdigest()


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return _stream_sha256(handle)


def _check_target(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise TargetUsageError(f"restore target {target} must be a new or empty directory: nothing is overwritten")


def restore(set_dir: Path, manifest: Manifest, target: Any, *, dry_run: bool = False,
            options: Mapping[str, Any] | None = None) -> RestoreReport:
    """Extract the tree into a new directory `target`, then compare it with the manifest."""
    target = Path(target)
    _check_target(target)
    entries = manifest_entries(manifest)
    counts = _counts(entries)
    size = sum(e.size for e in entries)
    plan = f"extract {counts['file']} files ({size} bytes), {counts['dir']} directories and " \
           f"{counts['symlink']} symlinks from {ARCHIVE} into {target}"
    if dry_run:
        return RestoreReport(actions=[plan], dry_run=True, details={"counts": counts})
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(set_dir / ARCHIVE, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as plain, \
            tarfile.open(fileobj=plain, mode="r|") as tar:
        tar.extractall(target, numeric_owner=True, filter="tar")
    for entry in sorted(entries, key=lambda e: e.path.count("/"), reverse=True):
        if entry.kind != "symlink":  # the tar filter clears setuid/setgid/sticky and group/other write: put them back
            os.chmod(target / entry.path, entry.mode)
    found = compare_tree(target, entries)
    return RestoreReport(restored_bytes=size, checks=found.checks, problems=found.problems, actions=[plan],
                         details={"counts": counts, "target": str(target)})


def check_restored(target: Any, set_dir: Path, manifest: Manifest, report: RestoreReport, ctx: CheckContext) -> Checks:
    return compare_tree(Path(target), manifest_entries(manifest))


# ───────────────────────── targets, versions, sizes ─────────────────────────


def target_from_cli(backup_type: str, target: str | None, target_conn: str | None,
                    get_connection: Callable[[str], Any]) -> CliTarget:
    if target_conn:
        root = connection_for(target_conn, get_connection).extra_dejson.get("path")
        if not root:
            raise TargetUsageError(f"connection {target_conn!r} has no extra 'path' (the directory to restore into)")
        target = root
    if not target:
        raise TargetUsageError("files restores need --target: a new or empty directory to extract the tree into")
    path = Path(target).absolute()
    _check_target(path)
    return CliTarget(target=path, description=f"directory {path}")


def scratch_spec(backup_type: str, versions: Mapping[str, Any], *, pitr: bool = False) -> ScratchSpec:
    return ScratchSpec("directory")


def scratch_target(info: TargetInfo) -> Path:
    return Path(info.uri or "")


def versions(manifest: Manifest) -> dict[str, Any]:
    return {}


def source_size(manifest: Manifest) -> int | None:
    value = manifest.details.get("source_bytes")
    return value if isinstance(value, int) and value > 0 else None
