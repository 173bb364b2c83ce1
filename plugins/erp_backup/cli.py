"""The restore CLI: list, verify and restore backup sets and read the DR drill ledger, with Airflow down.

    PYTHONPATH=plugins python -m erp_backup list|verify|restore|drill-report ...
    include/scripts/erp-restore ...            # the same, with the project's venv

Sets are read from local staging (``--from local``, the default: ``--root``, else
$ERP_BACKUP_ROOT, else the plan's ``backup_root``) or from the offsite store
(``--from offsite``, the plan's ``offsite`` block). Nothing here needs the Airflow
metadata DB, scheduler or API server: connections (the offsite store, a MinIO restore
target) come from ``AIRFLOW_CONN_<ID>`` environment variables (URI or JSON), which
Airflow's hooks resolve in a plain process without any DB. Local operations do not
import Airflow at all.

Exit codes: 0 ok; 1 a verification, fetch or restore failed (the message says what);
2 usage error or bad input (unknown service, type or backup id, bad target).

Each subcommand is a plain function ``cmd_*(args, console) -> int``; ``main()`` parses
the arguments and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from erp_backup.checksum import ChecksumMismatch, find_problems, verify_and_seal
from erp_backup.manifest import MANIFEST_NAME, Manifest, ManifestError
from erp_backup.offsite_trust import OffsiteSetCheck, check_offsite_sets
from erp_backup.plan import KNOWN_SERVICES, Plan, PlanError, load_plan
from erp_backup.sets import FAILED_NAME, BackupSet, SetState, is_backup_id, list_sets

if TYPE_CHECKING:
    from erp_backup.offsite import Offsite

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
LEDGER_KEY = "drills/ledger.jsonl"  # relative to the backup root and to the offsite root
OFFSITE_STATE = "offsite"  # a set offsite with its manifest (complete)
NOT_LISTED = ": not in the manifest"
IDS_SHOWN = 20
# Services whose restore() takes dry_run; for the others a dry run stops after fetch + verify.
DRY_RUN_SERVICES = frozenset({"postgres", "redis", "rabbitmq"})
PROGRESS_EVERY_S = 0.5
AIRFLOW_LOG_LEVEL_ENV = "AIRFLOW__LOGGING__LOGGING_LEVEL"


class UsageError(Exception):
    """Bad input: exit code 2."""


class Failure(Exception):
    """A verification, fetch or restore failed: exit code 1."""


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


class Console:
    """Results go to `out`; messages, warnings and the progress line to `err`.

    The progress line is drawn only when `err` is a TTY (one line, redrawn in place).
    """

    def __init__(self, out: TextIO, err: TextIO, tty: bool | None = None):
        self.out, self.err = out, err
        self.tty = _isatty(err) if tty is None else tty
        self._lock = threading.Lock()
        self._drawn = False

    def say(self, text: str = "") -> None:
        self.clear()
        print(text, file=self.out, flush=True)

    def note(self, text: str) -> None:
        self.clear()
        print(text, file=self.err, flush=True)

    def progress(self, text: str) -> None:
        if not self.tty:
            return
        with self._lock:
            self.err.write("\r" + text[:200] + "\x1b[K")
            self.err.flush()
            self._drawn = True

    def clear(self) -> None:
        with self._lock:
            if self._drawn:
                self.err.write("\r\x1b[K")
                self.err.flush()
                self._drawn = False


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def utc_text(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = [headers, *rows]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def redact_target(target: str) -> str:
    """A restore target as it may be shown: no password in a URI or a libpq conninfo."""
    if "://" in target:
        parts = urlsplit(target)
        if parts.password is None:
            return target
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        return urlunsplit((parts.scheme, f"{user}@{netloc}" if user else netloc, parts.path, parts.query, parts.fragment))
    if "=" in target:
        try:
            from psycopg.conninfo import conninfo_to_dict, make_conninfo

            params = conninfo_to_dict(target)
        except Exception:
            return "(unparsable connection string)"
        params.pop("password", None)
        return make_conninfo("", **params)
    return target


# ---------------------------------------------------------------------------
# Where sets come from
# ---------------------------------------------------------------------------


@dataclass
class Source:
    """Local staging (root) or the offsite store; `where` names it in messages."""

    kind: str
    root: Path
    plan: Plan
    _store: Offsite | None = None

    @property
    def is_local(self) -> bool:
        return self.kind == "local"

    @property
    def store(self) -> Offsite:
        if self._store is None:
            from erp_backup.offsite import offsite_from_plan

            self._store = offsite_from_plan(self.plan)
        return self._store

    @property
    def where(self) -> str:
        return str(self.root) if self.is_local else f"offsite {self.store.description}"


def open_source(args: argparse.Namespace) -> Source:
    try:
        plan = load_plan(args.plan)
    except PlanError as exc:
        raise UsageError(str(exc)) from exc
    root = Path(args.root) if args.root else plan.backup_root
    source = Source(kind=args.source, root=root, plan=plan)
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
    if service not in KNOWN_SERVICES:
        raise UsageError(f"unknown service {service!r} (known: {', '.join(sorted(KNOWN_SERVICES))})")
    if backup_type is not None and backup_type not in KNOWN_SERVICES[service]:
        raise UsageError(
            f"unknown backup type {backup_type!r} for {service} (known: {', '.join(sorted(KNOWN_SERVICES[service]))})"
        )


@dataclass(frozen=True)
class SetInfo:
    service: str
    backup_type: str
    backup_id: str
    state: str
    captured_at: datetime | None
    size: int | None
    files: int | None
    location: str
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["captured_at"] = self.captured_at.isoformat() if self.captured_at else None
        return data


def _disk_usage(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def local_info(backup_set: BackupSet) -> SetInfo:
    common = {"service": backup_set.service, "backup_type": backup_set.backup_type,
              "backup_id": backup_set.backup_id, "location": str(backup_set.path)}
    state = backup_set.state
    if state is SetState.INCOMPLETE:
        size, count = _disk_usage(backup_set.path)
        return SetInfo(state=state.value, captured_at=None, size=size, files=count,
                       note=f"no {MANIFEST_NAME}: cannot be used", **common)
    try:
        manifest = backup_set.manifest()
    except ManifestError as exc:
        return SetInfo(state=SetState.CORRUPT.value, captured_at=None, size=None, files=None, note=str(exc), **common)
    return SetInfo(state=state.value, captured_at=manifest.captured_finished_at, size=manifest.total_size,
                   files=len(manifest.files), **common)


def offsite_info(check: OffsiteSetCheck, description: str) -> SetInfo:
    """A row for one offsite set, checked against its upload record (erp_backup.offsite_trust)."""
    common = {"service": check.service, "backup_type": check.backup_type, "backup_id": check.backup_id,
              "location": f"{description}/{check.key}"}
    manifest = check.manifest
    if check.state is SetState.INCOMPLETE:
        return SetInfo(state=check.state.value, captured_at=None, size=None, files=None,
                       note=f"no {MANIFEST_NAME} offsite: cannot be used", **common)
    if manifest is None:
        return SetInfo(state=check.state.value, captured_at=None, size=None, files=None, note=check.why, **common)
    state = OFFSITE_STATE if check.state is SetState.OFFSITE else check.state.value
    return SetInfo(state=state, captured_at=manifest.captured_finished_at, size=manifest.total_size,
                   files=len(manifest.files), note=check.why, **common)


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


# ---------------------------------------------------------------------------
# Checking files
# ---------------------------------------------------------------------------


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
    from erp_backup.offsite import OffsiteError

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
    try:
        with FetchProgress(console, dest, manifest, key):
            source.store.fetch_set(manifest.service, manifest.backup_type, manifest.backup_id, dest)
    except OffsiteError as exc:
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


# ---------------------------------------------------------------------------
# list
# ---------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    source = open_source(args)
    if args.service:
        check_service_type(args.service, args.type)
    services = [args.service] if args.service else sorted(KNOWN_SERVICES)
    infos: list[SetInfo] = []
    for service in services:
        types = [args.type] if args.type else sorted(KNOWN_SERVICES[service])
        for backup_type in types:
            if source.is_local:
                infos += [local_info(s) for s in list_sets(source.root, service, backup_type)]
            else:
                infos += [offsite_info(check, source.store.description)
                          for check in check_offsite_sets(source.store, service, backup_type, source.root)]
    if args.json:
        console.say(json.dumps([info.as_dict() for info in infos], indent=2))
        return EXIT_OK
    if not infos:
        scope = "/".join(filter(None, (args.service, args.type))) or "any service"
        console.say(f"no backup sets of {scope} in {source.where}")
        return EXIT_OK
    rows = [
        (i.service, i.backup_type, i.backup_id, i.state, utc_text(i.captured_at), human_size(i.size),
         "-" if i.files is None else str(i.files))
        for i in infos
    ]
    console.say(table(("SERVICE", "TYPE", "BACKUP_ID", "STATE", "CAPTURED (UTC)", "SIZE", "FILES"), rows))
    for info in infos:
        if info.state == SetState.SUSPECT.value:
            console.note(f"{info.service}/{info.backup_type}/{info.backup_id} is suspect, never pruned or drilled: {info.note}")
    console.note(f"{len(infos)} set(s) in {source.where}")
    return EXIT_OK


# ---------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------


def _service_checks(service: str, set_dir: Path, manifest: Manifest) -> list[str]:
    from erp_backup.services import get_service

    backup_set = BackupSet(set_dir.parents[2], manifest.service, manifest.backup_type, manifest.backup_id)
    try:
        return list(get_service(service).verify(backup_set, manifest))
    except Exception as exc:  # a check that cannot run is a failed check, with its reason
        return [f"{service} checks could not run: {type(exc).__name__}: {exc}"]


def _verify_local(args: argparse.Namespace, source: Source, console: Console) -> tuple[list[str], Manifest, str]:
    backup_set = BackupSet(source.root, args.service, args.type, args.backup_id)
    manifest = read_local_manifest(backup_set, "verified")
    if args.seal:
        from erp_backup.services import get_service

        console.progress(f"verifying and sealing {backup_set.key} (files and {args.service} checks)")
        try:
            verify_and_seal(backup_set, deep_verify=get_service(args.service).verify)
        except ChecksumMismatch:
            failed = backup_set.path / FAILED_NAME
            return [line for line in failed.read_text().splitlines() if line], manifest, "sealed: marked corrupt"
        finally:
            console.clear()
        return [], manifest, f"sealed: state {backup_set.state.value}"
    problems = local_problems(backup_set.path, manifest, console)
    checked = "sha256 of every file"
    if not problems and args.deep:
        console.progress(f"running the {args.service} checks on {backup_set.key}")
        problems = _service_checks(args.service, backup_set.path, manifest)
        console.clear()
        checked += f" and the {args.service} checks"
    return problems, manifest, checked


def _verify_offsite(args: argparse.Namespace, source: Source, console: Console) -> tuple[list[str], Manifest, str]:
    store = source.store
    manifest = read_offsite_manifest(source, args.service, args.type, args.backup_id, "verified")
    reference, against = manifest, "the offsite manifest"
    local_set = BackupSet(source.root, args.service, args.type, args.backup_id)
    if local_set.manifest_path.is_file():
        try:
            reference, against = local_set.manifest(), f"the local manifest in {local_set.path}"
        except ManifestError:
            pass
    console.progress(f"checking {len(reference.files)} objects at {store.description}")
    problems = store.verify_set(args.service, args.type, args.backup_id, reference)
    console.clear()
    checked = f"size and SHA-256 of every object against {against}"
    if problems or not args.deep:
        return problems, reference, checked
    with tempfile.TemporaryDirectory(prefix="erp-verify-", dir=args.work_dir) as work:
        set_dir = fetch(source, manifest, Path(work), console)
        problems = local_problems(set_dir, manifest, console, "re-hashing")
        if not problems:
            problems = _service_checks(args.service, set_dir, manifest)
    return problems, reference, checked + f"; fetched, re-hashed and the {args.service} checks"


def cmd_verify(args: argparse.Namespace, console: Console) -> int:
    source = open_source(args)
    if args.seal and not source.is_local:
        raise UsageError("--seal marks a local set; it cannot be used with --from offsite")
    require_backup(source, args.service, args.type, args.backup_id)
    verify = _verify_local if source.is_local else _verify_offsite
    problems, manifest, checked = verify(args, source, console)
    key = f"{args.service}/{args.type}/{args.backup_id}"
    if args.json:
        console.say(json.dumps({"backup": key, "source": source.where, "ok": not problems, "checked": checked,
                                "files": len(manifest.files), "bytes": manifest.total_size,
                                "problems": problems}, indent=2))
    if problems:
        console.note(f"FAILED: backup {key} in {source.where} does not verify ({len(problems)} problem(s)):")
        for problem in problems:
            console.note(f"  {problem}")
        return EXIT_FAILED
    if not args.json:
        console.say(f"OK: backup {key} in {source.where}: {len(manifest.files)} files, "
                    f"{human_size(manifest.total_size)} verified ({checked})")
    return EXIT_OK


# ---------------------------------------------------------------------------
# restore
# ---------------------------------------------------------------------------


def _parse_option(text: str) -> tuple[str, Any]:
    """`key=value`; the value is JSON when it parses (true, 3, ["a"]), else the plain string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _connection(conn_id: str) -> Any:
    from erp_backup.services.base import airflow_connection

    try:
        return airflow_connection(conn_id)
    except Exception as exc:
        raise UsageError(
            f"connection {conn_id!r} is not defined: set AIRFLOW_CONN_{conn_id.upper()} (URI or JSON) ({exc})"
        ) from exc


def _postgres_dsn(target: str | None, target_conn: str | None) -> str:
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    if target is None and target_conn:
        conn = _connection(target_conn)
        params = {"host": conn.host, "port": conn.port, "user": conn.login, "dbname": conn.schema or "postgres",
                  "password": conn.password}
        return make_conninfo("", **{k: str(v) for k, v in params.items() if v})
    if not target:
        raise UsageError("postgres restores need --target: a libpq conninfo ('host=... port=... user=...') or a "
                         "postgresql:// URL (password via PGPASSWORD or ~/.pgpass), or --target-conn")
    try:
        params = conninfo_to_dict(target)
    except ProgrammingError as exc:
        raise UsageError(f"--target is not a PostgreSQL connection string or URL: {exc}") from exc
    if "password" in params:
        log.warning("--target contains a password, which other users can see in the process list: "
                    "use PGPASSWORD or ~/.pgpass instead")
    return target


def _s3_target(target: str | None, target_conn: str | None) -> dict[str, Any]:
    parts = urlsplit(target or "")
    if parts.scheme != "s3" or not parts.netloc:
        raise UsageError(f"minio restores need --target s3://bucket[/prefix], got {target!r}")
    if not target_conn:
        raise UsageError("minio restores need --target-conn: the aws connection id of the target "
                         "(AIRFLOW_CONN_<ID> with endpoint_url in its extra)")
    return {"bucket": parts.netloc, "prefix": parts.path.strip("/"), "conn_id": target_conn}


def _directory(target: str | None, what: str, must_not_exist: bool = False) -> Path:
    if not target:
        raise UsageError(f"this restore needs --target: {what}")
    path = Path(target).absolute()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--target {path} exists and is not a directory ({what})")
    if must_not_exist and path.exists():
        raise UsageError(f"--target {path} already exists: {what} must be a new directory")
    return path


def restore_target(service: str, backup_type: str, target: str | None, target_conn: str | None) -> tuple[Any, dict[str, Any]]:
    """What a service's restore() takes as `target` (and options) from --target / --target-conn."""
    if service == "postgres":
        if backup_type == "full":
            return _postgres_dsn(target, target_conn), {}
        return _directory(target, "a directory for the scratch cluster"), {}
    if service == "minio":
        return _s3_target(target, target_conn), {}
    if service == "redis":
        return {"dir": _directory(target, "the scratch redis-server directory")}, {}
    if service == "gitlab":
        return _directory(target, "where to place the GitLab backup tar and config files"), {}
    if service == "milvus":
        if backup_type == "etcd":
            return _directory(target, "the new etcd data directory", must_not_exist=True), {}
        if not target:
            raise UsageError("milvus restores need --target: a Milvus URI (http://host:19530) or a milvus-lite .db path")
        token = os.environ.get("MILVUS_TOKEN")
        return target, ({"token": token} if token else {})
    if service == "rabbitmq":
        if target_conn:
            return _connection(target_conn), {}
        if target in (None, "local"):
            return {}, {}
        if "://" in target or "@" not in target:
            raise UsageError("rabbitmq restores take --target local, --target <node name> (rabbit@host), or "
                             "--target-conn <connection id> (its extra mode=http for the management API)")
        return {"node": target}, {}
    raise UsageError(f"unknown service {service!r}")


def restore_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.service != "postgres" and (args.schema or args.database):
        raise UsageError("--schema and --database apply to postgres full restores only")
    if args.service == "postgres" and args.type != "full" and (args.schema or args.database):
        raise UsageError("--schema and --database apply to postgres full backups (logical dumps) only")
    options: dict[str, Any] = {}
    if args.service == "postgres" and args.type == "full":
        options["jobs"] = args.jobs
        if args.schema:
            options["schema"] = args.schema
        if args.database:
            options["databases"] = list(args.database)
    if args.dry_run and args.service in DRY_RUN_SERVICES:
        options["dry_run"] = True
    options.update(dict(args.option or ()))
    return options


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
        yield backup_set.path, manifest
        return
    manifest = read_offsite_manifest(source, args.service, args.type, args.backup_id, "restored")
    with tempfile.TemporaryDirectory(prefix="erp-restore-", dir=args.work_dir) as work:
        set_dir = fetch(source, manifest, Path(work), console)
        console.note(f"fetched and verified {len(manifest.files)} files ({human_size(manifest.total_size)})")
        yield set_dir, manifest


def _describe_target(target: Any) -> str:
    if isinstance(target, str):
        return redact_target(target)
    if isinstance(target, Path):
        return str(target)
    if isinstance(target, dict):
        if "bucket" in target:
            return f"s3://{target['bucket']}/{target.get('prefix', '')} (connection {target.get('conn_id')})"
        if "dir" in target:
            return f"scratch redis-server in {target['dir']}"
        return f"node {target.get('node') or 'local (rabbitmqctl)'}"
    return f"connection host {getattr(target, 'host', '?')}"


SUMMARY_KEYS = ("status", "tables_checked", "rows_checked", "keys_restored", "sampled_keys_matched", "imported",
                "rows", "objects", "verified", "data_dir", "prepared_dir", "runbook_command_text", "durations")


def _print_report(console: Console, report: dict[str, Any]) -> None:
    for action in report.get("actions") or report.get("would") or ():
        console.say(f"  - {action}")
    for key in SUMMARY_KEYS:
        if report.get(key) not in (None, "", {}, []):
            value = report[key]
            console.say(f"  {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")


# PostgreSQL WAL and base backups restore as a chain to a point in time (postgres_pitr), not one set alone.
CLI_RESTORE_TYPES = {"postgres": frozenset({"full"})}


def cmd_restore(args: argparse.Namespace, console: Console) -> int:
    from erp_backup.services import get_service

    source = open_source(args)
    check_service_type(args.service, args.type)
    module = get_service(args.service)
    restorable = CLI_RESTORE_TYPES.get(args.service, module.SUPPORTED_TYPES)
    if args.type not in restorable:
        hint = (" For a point-in-time restore from base backups and WAL, use "
                "`include/scripts/pitr_restore.sh --target-time ...`."
                if args.service == "postgres" else "")
        raise UsageError(f"the {args.service} module cannot restore {args.type!r} backups here "
                         f"(supported: {', '.join(sorted(restorable))}).{hint}")
    target, target_options = restore_target(args.service, args.type, args.target, args.target_conn)
    options = {**target_options, **restore_options(args)}
    require_backup(source, args.service, args.type, args.backup_id)
    key = f"{args.service}/{args.type}/{args.backup_id}"
    shown_target = _describe_target(target)

    with staged_set(args, source, console) as (set_dir, manifest):
        if args.dry_run and args.service not in DRY_RUN_SERVICES:
            report: dict[str, Any] = {
                "backup": key, "dry_run": True, "target": shown_target, "files": len(manifest.files),
                "bytes": manifest.total_size,
                "would": [f"restore {key} into {shown_target} with {args.service}.restore(options={options})"],
            }
        else:
            console.note(f"restoring {key} into {shown_target}{' (dry run)' if args.dry_run else ''}")
            console.progress(f"restoring {key} (-v shows each step)")
            try:
                report = module.restore(set_dir, manifest, target, **options)
            except Exception as exc:
                console.clear()
                raise Failure(f"restore of {key} into {shown_target} failed: {type(exc).__name__}: {exc}") from exc
            console.clear()
    if args.json:
        console.say(json.dumps(report, indent=2, default=str))
    elif args.dry_run:
        console.say(f"DRY RUN: nothing was changed. Restoring {key} into {shown_target} would:")
        _print_report(console, report)
    else:
        console.say(f"OK: restored {key} into {shown_target}")
        _print_report(console, report)
    return EXIT_OK


# ---------------------------------------------------------------------------
# drill-report
# ---------------------------------------------------------------------------

_WHEN_KEYS = ("finished_at", "timestamp", "recorded_at", "ended_at", "started_at", "at", "time")
_STATUS_KEYS = ("status", "result", "outcome")
_MEASURED_KEYS = ("rto_measured_seconds", "measured_rto_seconds", "rto_seconds", "restore_seconds",
                  "duration_seconds", "seconds", "rto_measured")
_TARGET_KEYS = ("rto_target_seconds", "target_rto_seconds", "rto_target", "target_rto")


def _first(entry: dict[str, Any], keys: Sequence[str]) -> Any:
    for key in keys:
        if entry.get(key) not in (None, ""):
            return entry[key]
    return None


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
        try:
            if text and text[-1] in units:
                return float(text[:-1]) * units[text[-1]]
            return float(text)
        except ValueError:
            return None
    return None


def ledger_row(entry: dict[str, Any]) -> dict[str, Any]:
    """The report's view of one ledger entry, whatever keys the drill wrote (missing ones are None)."""
    rto = entry.get("rto") if isinstance(entry.get("rto"), dict) else {}
    measured = _seconds(_first(entry, _MEASURED_KEYS) or _first(rto, ("measured_seconds", "measured", "seconds")))
    target = _seconds(_first(entry, _TARGET_KEYS) or _first(rto, ("target_seconds", "target")))
    status = _first(entry, _STATUS_KEYS)
    if status is None and isinstance(entry.get("ok"), bool):
        status = "ok" if entry["ok"] else "failed"
    met = entry.get("rto_met", rto.get("met"))
    if not isinstance(met, bool):
        met = None if measured is None or target is None else measured <= target
    return {
        "when": _first(entry, _WHEN_KEYS),
        "service": entry.get("service"),
        "backup_type": entry.get("backup_type") or entry.get("type"),
        "backup_id": entry.get("backup_id"),
        "status": status,
        "rto_measured_seconds": measured,
        "rto_target_seconds": target,
        "rto_met": met,
    }


def parse_ledger(text: str, origin: str, console: Console) -> list[dict[str, Any]]:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            console.note(f"warning: {origin} line {number} is not JSON, skipped ({exc.msg})")
            continue
        if not isinstance(entry, dict):
            console.note(f"warning: {origin} line {number} is not a JSON object, skipped")
            continue
        entries.append(entry)
    return entries


def read_ledger(source: Source, work_dir: str | None) -> tuple[str, str]:
    """(text, origin) of the drill ledger at the source."""
    if source.is_local:
        path = source.root / LEDGER_KEY
        if not path.is_file():
            raise Failure(f"no DR drill ledger at {path}: no drill has been recorded there (or --root is wrong)")
        return path.read_text(encoding="utf-8", errors="replace"), str(path)
    from erp_backup.offsite import OffsiteError

    origin = f"{source.store.description}/{LEDGER_KEY}"
    with tempfile.TemporaryDirectory(prefix="erp-ledger-", dir=work_dir) as work:
        local = Path(work) / "ledger.jsonl"
        try:
            found = source.store.get_file(LEDGER_KEY, local)
        except OffsiteError as exc:
            raise Failure(f"reading the drill ledger {origin} failed: {exc}") from exc
        if not found:
            raise Failure(f"no DR drill ledger at {origin}: no drill has been recorded offsite")
        return local.read_text(encoding="utf-8", errors="replace"), origin


def cmd_drill_report(args: argparse.Namespace, console: Console) -> int:
    source = open_source(args)
    text, origin = read_ledger(source, args.work_dir)
    entries = parse_ledger(text, origin, console)
    if args.last:
        entries = entries[-args.last:]
    if args.json:
        console.say(json.dumps(entries, indent=2))
        return EXIT_OK
    if not entries:
        console.say(f"the drill ledger {origin} has no entries")
        return EXIT_OK
    rows = []
    for entry in entries:
        row = ledger_row(entry)
        met = {True: "yes", False: "NO", None: "-"}[row["rto_met"]]
        rows.append((
            str(row["when"] or "-"), str(row["service"] or "-"), str(row["backup_type"] or "-"),
            str(row["backup_id"] or "-"), str(row["status"] or "-"),
            f"{human_seconds(row['rto_measured_seconds'])} / {human_seconds(row['rto_target_seconds'])}", met,
        ))
    console.say(table(("WHEN", "SERVICE", "TYPE", "BACKUP_ID", "STATUS", "RTO MEASURED / TARGET", "RTO MET"), rows))
    console.note(f"{len(entries)} drill(s) from {origin}")
    return EXIT_OK


# ---------------------------------------------------------------------------
# Arguments and main
# ---------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--from", dest="source", choices=("local", "offsite"), default="local",
                        help="read sets from local staging (default) or the offsite store")
    common.add_argument("--root", help="local staging root (default: $ERP_BACKUP_ROOT, else the plan's backup_root)")
    common.add_argument("--plan", help="backup plan file (default: $ERP_BACKUP_PLAN, else include/backup_plan.yaml)")
    common.add_argument("--work-dir", help="where offsite sets are fetched to (default: the system temp dir)")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    common.add_argument("-v", "--verbose", action="store_true", help="log each step")

    parser = argparse.ArgumentParser(
        prog="erp-restore",
        description="List, verify and restore ALL-ERP backup sets, and read the DR drill ledger. "
                    "Needs no running Airflow: connections come from AIRFLOW_CONN_<ID> variables.",
        epilog="exit codes: 0 ok, 1 verification/restore failure, 2 usage error or bad input",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    listing = commands.add_parser("list", parents=[common], help="table of backup sets with their state")
    listing.add_argument("service", nargs="?", help=f"one of {', '.join(sorted(KNOWN_SERVICES))}")
    listing.add_argument("type", nargs="?", help="backup type, e.g. full")
    listing.set_defaults(handler=cmd_list)

    verify = commands.add_parser("verify", parents=[common], help="check a set's files against its manifest")
    verify.add_argument("service")
    verify.add_argument("type")
    verify.add_argument("backup_id")
    verify.add_argument("--deep", action="store_true",
                        help="also run the service's own checks (offsite: fetch into a temp dir and re-hash first)")
    verify.add_argument("--seal", action="store_true",
                        help="local only: record the result like the checksum task (SHA256SUMS or CHECKSUM_FAILED)")
    verify.set_defaults(handler=cmd_verify)

    restore = commands.add_parser("restore", parents=[common], help="restore a set into a target")
    restore.add_argument("service")
    restore.add_argument("type")
    restore.add_argument("backup_id")
    restore.add_argument("--target", help="postgres: conninfo or postgresql:// URL; minio: s3://bucket/prefix; "
                                          "milvus: URI or milvus-lite path; gitlab, redis, milvus etcd: a directory; "
                                          "rabbitmq: local or a node name")
    restore.add_argument("--target-conn", help="connection id (AIRFLOW_CONN_<ID>) of the target: required for minio, "
                                               "optional for postgres and rabbitmq")
    restore.add_argument("--schema", help="postgres full: restore only this schema (one tenant)")
    restore.add_argument("--database", action="append", help="postgres full: restore only this database (repeatable)")
    restore.add_argument("--jobs", type=_positive_int, default=2, help="postgres: pg_restore --jobs (default 2)")
    restore.add_argument("--dry-run", action="store_true", help="print what would be done; change nothing")
    restore.add_argument("-o", "--option", action="append", type=_parse_option, metavar="KEY=VALUE",
                         help="extra option for the service's restore (JSON values), e.g. -o keep_running=true")
    restore.set_defaults(handler=cmd_restore)

    drills = commands.add_parser("drill-report", parents=[common], help="print the DR drill ledger")
    drills.add_argument("--last", type=_positive_int, help="only the last N drills")
    drills.set_defaults(handler=cmd_drill_report)
    return parser


@contextmanager
def _env_default(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the duration of a command unless the user set it."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    out, err = stdout or sys.stdout, stderr or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=err,
                        format="%(levelname)s %(name)s: %(message)s")
    # Airflow (imported only for offsite and connections) logs through structlog to stdout:
    # quiet it unless -v, and send anything printed by libraries to stderr, so stdout stays ours (--json).
    console = Console(out, err)
    try:
        with redirect_stdout(err), _env_default(AIRFLOW_LOG_LEVEL_ENV, "INFO" if args.verbose else "WARNING"):
            return args.handler(args, console)
    except UsageError as exc:
        console.note(f"error: {exc}")
        return EXIT_USAGE
    except Failure as exc:
        console.note(f"error: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        console.note("interrupted")
        return 130
    except Exception as exc:
        from erp_backup.offsite import OffsiteError

        if isinstance(exc, OffsiteError):
            console.note(f"error: {exc}{offsite_hint(load_plan(args.plan))}")
            return EXIT_FAILED
        if args.verbose:
            log.exception("unexpected error")
        console.note(f"error: {type(exc).__name__}: {exc}")
        return EXIT_FAILED
