"""What a drill run records on disk: the per-step records of each service, the work dirs, and the ledger.

Steps of one service run in different processes, so each writes its record (status,
timing, what it did, the error) to `$BACKUP_ROOT/drills/runs/<run>/<service>/<step>.json`
and reads what earlier steps wrote there. Fetched files go to
`$BACKUP_ROOT/drills/work/<run>/<service>/` and are always removed by teardown.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from erp_backup.drill import ledger
from erp_backup.drill import pick as picking
from erp_backup.drill.ledger import LEDGER_KEY, PASSED
from erp_backup.drill.targets import TargetInfo, slug
from erp_backup.manifest import write_atomic
from erp_backup.notify import one_line
from erp_backup.plan import Plan
from erp_backup.runs import utcnow

log = logging.getLogger(__name__)



def drills_root(plan: Plan) -> Path:
    return Path(plan.backup_root) / "drills"


def ledger_path(plan: Plan) -> Path:
    return drills_root(plan) / "ledger.jsonl"


def run_dir(plan: Plan, run_id: str) -> Path:
    return drills_root(plan) / "runs" / slug(run_id, 64)


def work_dir(plan: Plan, run_id: str, service: str | None = None) -> Path:
    base = drills_root(plan) / "work" / slug(run_id, 64)
    return base / service if service else base


def mkdirs(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def write_json(path: Path, data: Any) -> None:
    mkdirs(path.parent)
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class ServiceState:
    """The records of one service's drill steps in one run."""

    def __init__(self, plan: Plan, run_id: str, service: str):
        self.plan, self.run_id, self.service = plan, run_id, service
        self.dir = run_dir(plan, run_id) / service

    def read(self, step: str) -> dict[str, Any] | None:
        return read_json(self.dir / f"{step}.json")

    def write(self, step: str, record: Mapping[str, Any]) -> None:
        write_json(self.dir / f"{step}.json", dict(record))

    def target(self) -> TargetInfo | None:
        data = read_json(self.dir / "target.json")
        return TargetInfo.from_dict(data) if data else None

    def save_target(self, info: TargetInfo) -> None:
        write_json(self.dir / "target.json", info.as_dict())  # 0600: may hold a scratch password

    @contextmanager
    def step(self, name: str) -> Iterator[dict[str, Any]]:
        """Record a step: running, then ok (or the status the body sets) or failed with the error."""
        attempts = (self.read(name) or {}).get("attempts", 0) + 1
        record: dict[str, Any] = {"status": "running", "started_at": utcnow().isoformat(), "attempts": attempts}
        self.write(name, record)
        started = time.monotonic()
        try:
            yield record
        except BaseException as exc:
            record.update(status="failed", error=one_line(exc), error_type=type(exc).__name__,
                          seconds=round(time.monotonic() - started, 3), finished_at=utcnow().isoformat())
            self.write(name, record)
            raise
        record["status"] = record.get("status") if record.get("status") not in (None, "running") else "ok"
        record.update(seconds=round(time.monotonic() - started, 3), finished_at=utcnow().isoformat())
        self.write(name, record)


def service_state(plan: Plan, pick: Mapping[str, Any]) -> ServiceState:
    return ServiceState(plan, pick["run_id"], str(pick.get("slot") or pick["service"]))  # a PITR pick has its own slot


def read_ledger(plan: Plan, offsite: Any = None) -> list[ledger.DrillLedgerEntry]:
    """The local ledger, merged with the offsite one when a store is given (deduplicated by run and set)."""
    entries = ledger.parse(ledger_path(plan).read_text()) if ledger_path(plan).is_file() else []
    if offsite is not None:
        try:  # a private directory: the Backups page may read while a drill does
            with tempfile.TemporaryDirectory(prefix="ledger-read-", dir=mkdirs(drills_root(plan) / "work")) as work:
                remote = Path(work) / "ledger.jsonl"
                if offsite.get_file(LEDGER_KEY, remote):
                    entries += ledger.parse(remote.read_text())
        except Exception as exc:  # the pick still works from the local ledger
            log.warning("could not read the offsite drill ledger (%s); using the local one", exc)
    return ledger.deduplicated(entries)


def ledger_entries_for_pick(entries: list[ledger.DrillLedgerEntry]) -> list[picking.LedgerEntry]:
    """Only drills that passed count as 'drilled': a failed set stays likely to be picked again."""
    return [picking.LedgerEntry(e.service, e.backup_type, e.backup_id, e.finished_at)
            for e in entries if e.status in PASSED and e.backup_type and e.backup_id]
