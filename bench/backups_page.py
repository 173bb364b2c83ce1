"""How fast the Backups page loads with many offsite sets: `bench/backups_page [--sets 1000] [--repeat 5]`.

Builds a staging root and a NAS-style offsite holding `--sets` verified offsite sets spread over
every enabled job of the committed plan, plus a drill ledger, then times what the page's route
does (`erp_backup.backups_page.app.page_html`: read the plan, check every offsite manifest,
read the ledger, render). The baseline is the least any page must do on the same machine:
read and parse the same offsite manifests. Prints both medians and their ratio. Not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path


def make_estate(root: Path, sets: int) -> tuple[Path, list[Path]]:
    from erp_backup.checksum import verify_and_seal
    from erp_backup.drill import ledger, records
    from erp_backup.manifest import FileEntry, Manifest, sha256_file, write_manifest
    from erp_backup.offsite import FilesystemOffsite
    from erp_backup.plan import load_plan
    from erp_backup.sets import BackupSet, backup_id_for

    plan = load_plan()
    (root / "nas").mkdir(exist_ok=True)
    nas = FilesystemOffsite(root / "nas")
    jobs = plan.enabled_jobs
    now = datetime.now(UTC)
    for index in range(sets):
        job = jobs[index % len(jobs)]
        finished = now - timedelta(hours=index // len(jobs) + 1)
        backup_set = BackupSet(plan.backup_root, job.service, job.backup_type, backup_id_for(finished))
        backup_set.create_dir()
        data = backup_set.path / "data.bin"
        data.write_bytes(os.urandom(256 + index % 512))
        size, sha256 = sha256_file(data)
        write_manifest(backup_set.path, Manifest(
            service=job.service, backup_type=job.backup_type, backup_id=backup_set.backup_id,
            captured_started_at=finished - timedelta(minutes=2), captured_finished_at=finished,
            run={"run_id": f"scheduled__{finished.isoformat()}"}, source={"bench": True}, tools={},
            files=[FileEntry("data.bin", size, sha256)],
        ))
        verify_and_seal(backup_set)
        nas.upload_set(backup_set)
    ledger.append(records.ledger_path(plan), [
        ledger.DrillLedgerEntry(run_id=f"scheduled__{week}", finished_at=now - timedelta(weeks=week), service=job.service,
                                status="passed", backup_type=job.backup_type, backup_id="20260101T000000Z",
                                rto_measured_s=60.0 + week, rto_extrapolated_s=90.0 + week, rto_target_s=7200.0)
        for week in range(52) for job in jobs[:1]
    ])
    return root / "nas", sorted(p for p in (root / "nas").rglob("manifest.json") if ".sha256" not in p.parts)


def timed(call: object, repeat: int) -> float:
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()  # type: ignore[operator]
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="erp-bench-page-") as work:
        root = Path(work)
        os.environ.update(ERP_BACKUP_ROOT=str(root / "staging"), ERP_OFFSITE_KIND="filesystem",
                          ERP_OFFSITE_PATH=str(root / "nas"))
        from erp_backup.backups_page.app import page_html
        from erp_backup.manifest import Manifest

        started = time.perf_counter()
        _, manifests = make_estate(root, args.sets)
        print(f"estate: {len(manifests)} offsite sets written in {time.perf_counter() - started:.1f} s")
        cold = timed(page_html, 1)  # the first load of the hour also samples every schedule's longest gap
        page = timed(page_html, args.repeat)
        baseline = timed(lambda: [Manifest.read(path) for path in manifests], args.repeat)
        print(f"page load ({len(manifests)} offsite sets): first {cold * 1000:.0f} ms, then median of {args.repeat}: "
              f"{page * 1000:.0f} ms")
        print(f"baseline (read and parse the same {len(manifests)} manifests): {baseline * 1000:.0f} ms")
        print(f"ratio page / baseline: {page / baseline:.1f}x; budget 1 s: {'met' if max(page, cold) <= 1.0 else 'NOT met'}")


if __name__ == "__main__":
    main()
