"""Where sets come from (local staging or offsite), how a set is found, checked and fetched, and the CLI's errors."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erp_backup.checksum import find_problems
from erp_backup.cli.console import Console, human_size
from erp_backup.manifest import MANIFEST_NAME, Manifest, ManifestError
from erp_backup.plan import Plan, PlanError, known_services, load_plan
from erp_backup.sets import FAILED_NAME, BackupSet, SetState, is_backup_id, list_sets

if TYPE_CHECKING:
    from erp_backup.offsite import Offsite

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
NOT_LISTED = ": not in the manifest"
IDS_SHOWN = 20
PROGRESS_EVERY_S = 0.5


class UsageError(Exception):
    """Bad input: exit code 2."""


class Failure(Exception):
    """A verification, fetch or restore failed: exit code 1."""


@dataclass
class Source:
    """Local staging (root) or the offsite store; `where` names it in messages."""

    kind: str
    root: Path
    plan: Plan
    identity: Path | None = None
    _store: Offsite | None = None

    @property
    def is_local(self) -> bool:
        return self.kind == "local"

    @property
    def store(self) -> Offsite:
        if self._store is None:
            from erp_backup.offsite import offsite_from_plan
            from erp_backup.sealing import UnsealingOffsite

            self._store = UnsealingOffsite(offsite_from_plan(self.plan), self.identities)
        return self._store

    def identities(self) -> list[Any]:
        """The age identities for sealed sets: --identity FILE, else the plan's identity connection, else none."""
        from erp_backup import crypto
        from erp_backup.services.base import ConnectionMissing, airflow_connection

        if self.identity is not None:
            return crypto.identities_from_file(self.identity)
        try:
            return crypto.identities_from_connection(self.plan.encryption.identity_conn_id, airflow_connection)
        except ConnectionMissing:
            return []

    @property
    def where(self) -> str:
        return str(self.root) if self.is_local else f"offsite {self.store.description}"


def open_source(args: argparse.Namespace) -> Source:
    try:
        plan = load_plan(args.plan)
    except PlanError as exc:
        raise UsageError(str(exc)) from exc
    root = Path(args.root) if args.root else plan.backup_root
    source = Source(kind=args.source, root=root, plan=plan, identity=getattr(args, "identity", None))
    if source.is_local and not root.is_dir():
        raise UsageError(
            f"backup root {root} is not a directory: pass --root, set ERP_BACKUP_ROOT, or use --from offsite"
        )
    return source


def offsite_hint(plan: Plan) -> str:
    """How to define the offsite connection, when it is the likely cause of an offsite error."""
    if plan.offsite.kind != "s3":
        return ""
    variable = f"AIRFLOW_CONN_{plan.offsite.conn_id.upper()}"
    if variable in os.environ:
        return ""
    return f" (no {variable} in the environment: set it to the offsite connection as a URI or JSON)"


def check_service_type(service: str, backup_type: str | None) -> None:
    known = known_services()
    if service not in known:
        raise UsageError(f"unknown service {service!r} (known: {', '.join(sorted(known))})")
    if backup_type is not None and backup_type not in known[service]:
        raise UsageError(
            f"unknown backup type {backup_type!r} for {service} (known: {', '.join(sorted(known[service]))})"
        )



def backup_ids(source: Source, service: str, backup_type: str) -> list[tuple[str, str | None]]:
    """(backup id, local state or None offsite) of every set there, oldest first."""
    if source.is_local:
        return [(s.backup_id, s.state.value) for s in list_sets(source.root, service, backup_type)]
    return [(backup_id, None) for backup_id in source.store.list_backup_ids(service, backup_type)]


def require_backup(source: Source, service: str, backup_type: str, backup_id: str) -> None:
    """Exit 2 (UsageError) naming the valid ids unless `backup_id` exists at the source."""
    check_service_type(service, backup_type)
    known = backup_ids(source, service, backup_type)
    if is_backup_id(backup_id) and backup_id in {i for i, _ in known}:
        return
    what = f"{service}/{backup_type}"
    problem = (f"no backup {backup_id!r} of {what} in {source.where}" if is_backup_id(backup_id)
               else f"{backup_id!r} is not a backup id (format YYYYMMDDTHHMMSSZ, UTC)")
    if not known:
        raise UsageError(f"{problem}; there are no backups of {what} there")
    shown = [f"{i} ({state})" if state else i for i, state in reversed(known)][:IDS_SHOWN]
    more = f" and {len(known) - IDS_SHOWN} older" if len(known) > IDS_SHOWN else ""
    raise UsageError(f"{problem}. Valid backup ids, newest first: {', '.join(shown)}{more}")


def local_problems(set_dir: Path, manifest: Manifest, console: Console, label: str = "verifying") -> list[str]:
    """`checksum.find_problems`, one manifest file at a time so a progress line can follow it."""
    problems: list[str] = []
    total = len(manifest.files)
    for index, entry in enumerate(manifest.files, 1):
        console.progress(f"{label} [{index}/{total}] {entry.path} ({human_size(entry.size)})")
        one_file = dataclasses.replace(manifest, files=[entry])
        problems.extend(p for p in find_problems(set_dir, one_file) if not p.endswith(NOT_LISTED))
    listed = {entry.path for entry in manifest.files}
    unlisted = find_problems(set_dir, dataclasses.replace(manifest, files=[]))
    problems.extend(p for p in unlisted if p[: -len(NOT_LISTED)] not in listed)
    console.clear()
    return problems


class FetchProgress:
    """Redraws "[i/n] file bytes/total" while `fetch_set` downloads into `dest` (TTY only).

    It watches the files appear; a file being received is `.<name>.tmp` beside its final name.
    """

    def __init__(self, console: Console, dest: Path, manifest: Manifest, label: str):
        self.console, self.dest, self.manifest, self.label = console, dest, manifest, label
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fetch-progress", daemon=True)

    def line(self) -> str:
        total = self.manifest.total_size
        done, current, count = 0, "", len(self.manifest.files)
        for index, entry in enumerate(self.manifest.files, 1):
            path = self.dest / entry.path
            partial = path.with_name(f".{path.name}.tmp")
            if path.is_file():
                done += entry.size
            elif partial.is_file():
                done += partial.stat().st_size
                current = f"[{index}/{count}] {entry.path}"
        percent = 100 * done // total if total else 100
        return " ".join(filter(None, ("fetching", self.label, current, f"{human_size(done)}/{human_size(total)}",
                                      f"({percent}%)")))

    def _run(self) -> None:
        while not self._stop.wait(PROGRESS_EVERY_S):
            try:
                self.console.progress(self.line())
            except OSError:
                pass

    def __enter__(self) -> FetchProgress:
        if self.console.tty:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.console.clear()


def fetch(source: Source, manifest: Manifest, work_root: Path, console: Console) -> Path:
    """Download an offsite set into `work_root/<service>/<type>/<id>`, each file's SHA-256 checked."""
    from erp_backup.offsite import OFFSITE_FAILURES

    key = f"{manifest.service}/{manifest.backup_type}/{manifest.backup_id}"
    dest = work_root / manifest.service / manifest.backup_type / manifest.backup_id
    free = shutil.disk_usage(work_root).free
    if free < manifest.total_size:
        raise Failure(
            f"cannot fetch {key}: it needs {human_size(manifest.total_size)} and {work_root} has "
            f"{human_size(free)} free (use --work-dir on a larger disk)"
        )
    console.note(f"fetching {key} ({len(manifest.files)} files, {human_size(manifest.total_size)}) "
                 f"from {source.store.description} into {dest}")
    from erp_backup.crypto import EncryptionError

    try:
        with FetchProgress(console, dest, manifest, key):
            source.store.fetch_set(manifest.service, manifest.backup_type, manifest.backup_id, dest)
    except EncryptionError as exc:
        raise Failure(str(exc)) from exc
    except OFFSITE_FAILURES as exc:
        raise Failure(f"fetching {key} from {source.store.description} failed: {exc}") from exc
    return dest


def read_local_manifest(backup_set: BackupSet, action: str) -> Manifest:
    """The manifest of a usable local set; Failure for an incomplete, corrupt or mislabelled one."""
    state = backup_set.state
    if state is SetState.INCOMPLETE:
        raise Failure(
            f"backup {backup_set.key} in {backup_set.root} is incomplete: it has no {MANIFEST_NAME} "
            f"(an interrupted or failed backup run) and cannot be {action}; choose another backup id "
            f"(`list {backup_set.service} {backup_set.backup_type}` shows them)"
        )
    try:
        manifest = backup_set.manifest()
    except ManifestError as exc:
        raise Failure(f"backup {backup_set.key}: {exc}") from exc
    if (manifest.service, manifest.backup_type, manifest.backup_id) != (
        backup_set.service, backup_set.backup_type, backup_set.backup_id
    ):
        raise Failure(
            f"backup {backup_set.key}: its manifest describes "
            f"{manifest.service}/{manifest.backup_type}/{manifest.backup_id}; the set was moved or renamed"
        )
    return manifest


def read_offsite_manifest(source: Source, service: str, backup_type: str, backup_id: str, action: str) -> Manifest:
    key = f"{service}/{backup_type}/{backup_id}"
    try:
        manifest = source.store.read_manifest(service, backup_type, backup_id)
    except ManifestError as exc:
        raise Failure(f"backup {key} at {source.store.description}: {exc}") from exc
    if manifest is None:
        raise Failure(
            f"backup {key} at {source.store.description} is incomplete: it has no {MANIFEST_NAME} offsite "
            f"(an interrupted upload or a partly deleted set) and cannot be {action}; choose another backup id "
            f"(`list {service} {backup_type} --from offsite` shows them)"
        )
    return manifest



def unsealed_local(source: Source, backup_set: BackupSet, manifest: Manifest, work: Path) -> tuple[Path, Manifest]:
    """A local set as clear files: itself, or (sealed) decrypted into `work`."""
    from erp_backup.crypto import EncryptionError
    from erp_backup.sealing import unsealed_copy

    try:
        return unsealed_copy(backup_set.path, manifest, work / backup_set.key, source.identities)
    except EncryptionError as exc:
        raise Failure(str(exc)) from exc


@contextmanager
def staged_set(args: argparse.Namespace, source: Source, console: Console) -> Iterator[tuple[Path, Manifest]]:
    """A verified set directory to restore from: the local set re-hashed, or an offsite set fetched."""
    if source.is_local:
        backup_set = BackupSet(source.root, args.service, args.type, args.backup_id)
        manifest = read_local_manifest(backup_set, "restored")
        if backup_set.state is SetState.CORRUPT:
            failed = (backup_set.path / FAILED_NAME).read_text(errors="replace").strip().splitlines()
            raise Failure(f"backup {backup_set.key} was marked corrupt by its checksum task "
                          f"({'; '.join(failed[:3])}); choose another backup id")
        problems = local_problems(backup_set.path, manifest, console)
        if problems:
            raise Failure(f"backup {backup_set.key} in {source.root} does not match its manifest, nothing was "
                          f"restored: " + "; ".join(problems))
        console.note(f"verified {backup_set.key}: {len(manifest.files)} files, {human_size(manifest.total_size)}")
        with tempfile.TemporaryDirectory(prefix="erp-restore-", dir=args.work_dir) as work:
            yield unsealed_local(source, backup_set, manifest, Path(work))
        return
    manifest = read_offsite_manifest(source, args.service, args.type, args.backup_id, "restored")
    with tempfile.TemporaryDirectory(prefix="erp-restore-", dir=args.work_dir) as work:
        set_dir = fetch(source, manifest, Path(work), console)
        console.note(f"fetched and verified {len(manifest.files)} files ({human_size(manifest.total_size)})")
        yield set_dir, Manifest.read(set_dir / MANIFEST_NAME)  # a sealed set's whole manifest, once decrypted
