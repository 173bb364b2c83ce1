"""`list`: every backup set of a service and type, with its state, capture time and size."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from erp_backup.cli.console import Console, human_size, table, utc_text
from erp_backup.cli.source import EXIT_OK, check_service_type, open_source
from erp_backup.manifest import MANIFEST_NAME, ManifestError
from erp_backup.offsite_trust import OffsiteSetCheck, check_offsite_sets
from erp_backup.plan import known_services
from erp_backup.sets import BackupSet, SetState, list_sets

OFFSITE_STATE = "offsite"  # a set offsite with its manifest (complete)


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


def by_capture_time(infos: list[SetInfo]) -> list[SetInfo]:
    """Each service and type's sets by capture time (a backfilled set holds today's data under a past slot's id),
    then the sets without one (incomplete, corrupt, suspect) by slot."""
    def key(info: SetInfo) -> tuple:
        captured = info.captured_at
        if captured is not None and captured.tzinfo is None:
            captured = captured.replace(tzinfo=UTC)
        return info.service, info.backup_type, captured is None, captured or datetime.min.replace(tzinfo=UTC), info.backup_id

    return sorted(infos, key=key)


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    source = open_source(args)
    if args.service:
        check_service_type(args.service, args.type)
    known = known_services()
    services = [args.service] if args.service else sorted(known)
    infos: list[SetInfo] = []
    for service in services:
        types = [args.type] if args.type else sorted(known[service])
        for backup_type in types:
            if source.is_local:
                infos += [local_info(s) for s in list_sets(source.root, service, backup_type)]
            else:
                infos += [offsite_info(check, source.store.description)
                          for check in check_offsite_sets(source.store, service, backup_type, source.root)]
    infos = by_capture_time(infos)
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
