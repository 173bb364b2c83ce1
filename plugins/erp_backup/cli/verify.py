"""`verify`: a set's files against its manifest, locally or offsite, optionally with the service's own checks."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from erp_backup.checksum import ChecksumMismatch, verify_and_seal
from erp_backup.cli.console import Console, human_size
from erp_backup.cli.source import (
    EXIT_FAILED,
    EXIT_OK,
    Source,
    UsageError,
    fetch,
    local_problems,
    open_source,
    read_local_manifest,
    read_offsite_manifest,
    require_backup,
    unsealed_local,
)
from erp_backup.manifest import MANIFEST_NAME, Manifest, ManifestError
from erp_backup.sets import FAILED_NAME, BackupSet


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
            service = get_service(args.service)
            verify_and_seal(backup_set, deep_verify=service.verify, clear_details=service.CLEAR_DETAILS)
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
        with tempfile.TemporaryDirectory(prefix="erp-verify-", dir=args.work_dir) as work:
            clear_dir, clear_manifest = unsealed_local(source, backup_set, manifest, Path(work))
            problems = _service_checks(args.service, clear_dir, clear_manifest)
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
        fetched = Manifest.read(set_dir / MANIFEST_NAME)  # a sealed set's whole manifest, once decrypted
        problems = local_problems(set_dir, fetched, console, "re-hashing")
        if not problems:
            problems = _service_checks(args.service, set_dir, fetched)
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

