"""The checksum step: re-read a set's files, compare them with the manifest, write SHA256SUMS."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from erp_backup.diskio import io_context
from erp_backup.manifest import FileEntry, Manifest, sha256_file, write_atomic
from erp_backup.sets import MARKER_NAMES, SUMS_NAME, BackupSet

log = logging.getLogger(__name__)


class ChecksumMismatch(RuntimeError):
    """Files of a set do not match its manifest. The set is marked corrupt."""


@dataclass(frozen=True)
class ChecksumReport:
    files: int
    bytes: int


def entry_problem(set_dir: Path, entry: FileEntry) -> str | None:
    """How one file differs from its manifest entry (missing, size, SHA-256), or None."""
    path = set_dir / entry.path
    if not path.is_file():
        return f"{entry.path}: missing"
    with io_context(path, set_dir=set_dir, action="reading"):
        size, digest = sha256_file(path)
    if size != entry.size:
        return f"{entry.path}: size {size} != manifest {entry.size}"
    if digest != entry.sha256:
        return f"{entry.path}: sha256 {digest} != manifest {entry.sha256}"
    return None


def find_problems(set_dir: Path, manifest: Manifest) -> list[str]:
    """Every difference between the files on disk and the manifest, as readable lines."""
    problems = [problem for entry in manifest.files if (problem := entry_problem(set_dir, entry))]
    listed = {entry.path for entry in manifest.files}
    for path in sorted(p for p in set_dir.rglob("*") if p.is_file()):
        relative = path.relative_to(set_dir).as_posix()
        hidden = any(part.startswith(".") for part in path.relative_to(set_dir).parts)
        if relative not in listed and relative not in MARKER_NAMES and not hidden:
            problems.append(f"{relative}: not in the manifest")
    return problems


def sha256sums_text(manifest: Manifest) -> str:
    """`sha256sum -c` compatible lines, in manifest order."""
    return "".join(f"{entry.sha256}  {entry.path}\n" for entry in manifest.files)


def verify_and_seal(
    backup_set: BackupSet,
    deep_verify: Callable[[BackupSet, Manifest], list[str]] | None = None,
    clear_details: frozenset[str] = frozenset(),
) -> ChecksumReport:
    """Verify every file, then the service's own checks (`deep_verify`) if the bytes match.

    An encrypted set is checked through its staging identity and sealed
    (erp_backup.sealing); a sealed set's stored bytes are checked again, nothing more.
    On success write SHA256SUMS; on failure mark the set corrupt and raise.
    """
    from erp_backup import crypto, sealing

    manifest = backup_set.manifest()
    problems = find_problems(backup_set.path, manifest)
    if not problems and sealing.awaits_seal(backup_set.path):
        problems, manifest = sealing.seal_set(backup_set, manifest, clear_details, deep_verify)
    elif not problems and deep_verify is not None and not sealing.is_sealed(manifest):
        problems = list(deep_verify(backup_set, manifest))
    if problems:
        crypto.forget_staging_keys(backup_set.path)  # a corrupt set is retaken, never read again
        backup_set.mark_corrupt(problems)
        for problem in problems:
            log.error("checksum %s: %s", backup_set.key, problem)
        raise ChecksumMismatch(
            f"backup {backup_set.key} failed verification ({len(problems)} problem(s)): " + "; ".join(problems[:5])
        )
    with io_context(backup_set.path / SUMS_NAME, set_dir=backup_set.path):
        write_atomic(backup_set.path / SUMS_NAME, sha256sums_text(manifest).encode())
    log.info("checksum %s: %d files, %d bytes match the manifest", backup_set.key, len(manifest.files), manifest.total_size)
    return ChecksumReport(files=len(manifest.files), bytes=manifest.total_size)
