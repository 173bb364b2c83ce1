"""The soak's scheduler: every job of the plan at its cron times, the hourly watchdog, the faults.

Each run does what its DAG does, in order, through the plain step functions: backup,
checksum, offsite_upload, retention_prune. A failed step is retried as Airflow would
(after 2 and 6 more minutes of simulated time) and, once out of tries, posts the same
Slack text as the DAG's failure callback. The watchdog checks and announces every hour.
An on-call operator reads Slack every morning (09:00 Seoul) and clears the runs that
failed, oldest first, as the README says: from `backup` when the backup or its checksum
failed (a corrupt set is taken again), else from the failed task.
`Truth` records what really happened, for the assertions and the summary.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

from croniter import croniter

from erp_backup import notify, staging, steps, watchdog
from erp_backup.offsite import offsite_from_plan
from erp_backup.plan import BackupJob, Plan
from erp_backup.services.base import RunInfo
from erp_backup.sets import BackupSet, backup_id_for
from tests.integration.soak.clock import SimClock
from tests.integration.soak.faults import WINDOW_KINDS, Fault
from tests.integration.soak.proxy import TcpProxy
from tests.integration.soak.sources import PostgresSource, Source, StagingDisk
from tests.integration.soak.truth import Truth

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[3]
RETRY_DELAYS = (timedelta(0), timedelta(minutes=2), timedelta(minutes=6))  # 2 retries, 2 min doubling
OPERATOR_AT = "0 9 * * *"  # Asia/Seoul: the morning look at Slack
OPERATOR_CLEARS = 3  # then the run is left failed for someone to look at
SLOW_UPLOAD_DELAY_S = 0.02  # per 64 KiB sent: the upload really crawls
KILLED_CHILD = """
import json, sys, time
from datetime import datetime
from airflow.sdk import Connection
from erp_backup import steps, stream
from erp_backup.plan import load_plan
from erp_backup.services.base import RunInfo

args = json.loads(sys.argv[1])
now = datetime.fromisoformat(args["now"])
steps.utcnow = lambda: now
real_write = stream.FileSink.write

def crawl(self, data):  # a slow disk: the kill lands mid-write
    time.sleep(0.5)
    real_write(self, data)

stream.FileSink.write = crawl
connection = Connection(**args["connection"])
plan = load_plan()
job = plan.job(args["service"], args["backup_type"])
run = RunInfo(**{k: datetime.fromisoformat(v) if k != "dag_id" and k != "run_id" else v for k, v in args["run"].items()})
steps.backup(plan, job, run, lambda conn_id: connection)
"""


def fire_times(job: BackupJob, start: datetime, end: datetime) -> list[datetime]:
    """The job's cron fires in (start, end], computed in its timezone, as UTC instants."""
    fires = croniter(job.schedule, start.astimezone(ZoneInfo(job.timezone)))
    times = []
    while (moment := fires.get_next(datetime).astimezone(start.tzinfo)) <= end:
        times.append(moment)
    return times


def run_info(job: BackupJob, fire: datetime) -> RunInfo:
    return RunInfo(dag_id=job.dag_id, run_id=f"scheduled__{fire.isoformat()}", run_after=fire, logical_date=fire,
                   data_interval_start=fire - (job.interval or timedelta(0)), data_interval_end=fire)


class Soak:
    def __init__(self, plan: Plan, clock: SimClock, sources: list[Source], proxy: TcpProxy, disk: StagingDisk,
                 faults: list[Fault], start: datetime, end: datetime, slack: Callable[[], list[str]]) -> None:
        self.plan, self.clock, self.sources, self.proxy, self.disk = plan, clock, sources, proxy, disk
        self.source = next(s for s in sources if isinstance(s, PostgresSource))  # stopped by `source_down`
        self._connections = {cid: conn for source in sources for cid, conn in source.connections().items()}
        self.faults, self.start, self.end, self.slack = faults, start, end, slack
        self.truth = Truth(plan)
        self._active: set[Fault] = set()
        self._down: set[str] = set()  # window fault kinds in force
        self._switches = {"source_down": (self.source.stop, self.source.start), "s3_down": (proxy.down, proxy.up),
                          "full_disk": (disk.fill, disk.clear)}
        self._events: list[tuple[datetime, int, str, Any]] = []
        self._seq = itertools.count()
        self._used: set[Fault] = set()
        self.store = offsite_from_plan(plan)  # one client for the soak, as one worker would keep
        self.failed: list[tuple[datetime, BackupJob, str, str | None]] = []  # (fire, job, failed task, backup id)

    # --- the event loop ---------------------------------------------------------------

    def schedule(self, when: datetime, kind: str, payload: Any) -> None:
        order = {"tick": 0, "operator": 1, "run": 2, "ship": 3}[kind]  # checks see the state before runs at the same time
        heapq.heappush(self._events, (when, order * 10**9 + next(self._seq), kind, payload))

    def run(self) -> Truth:
        for job in self.plan.enabled_jobs:
            for fire in fire_times(job, self.start, self.end):
                self.schedule(fire, "run", job)
        for moment in fire_times(_operator_job(self.plan), self.start, self.end):
            self.schedule(moment, "operator", None)
        hour = timedelta(hours=1)
        for n in range(1, int((self.end - self.start) / hour) + 1):
            self.schedule(self.start + n * hour, "tick", None)
        while self._events:
            due, _, kind, payload = heapq.heappop(self._events)
            # One worker: an event waits for the one before it (retries and the operator's reruns take time).
            when = max(due, self.clock.now()) if kind == "tick" else due
            self.clock.set(max(when, self.clock.now()))
            self.sync_faults(self.clock.now())
            {"tick": self.tick, "operator": self.operate, "run": self.run_job, "ship": self.ship}[kind](when, payload)
        self.sync_faults(self.end + timedelta(days=365))  # clear whatever is still active
        return self.truth

    def sync_faults(self, now: datetime) -> None:
        """Bring every window fault to its state at `now` (overlapping windows of a kind count once)."""
        for fault in self.faults:
            if fault.kind in WINDOW_KINDS and fault.active(now) and fault not in self._active:
                self._active.add(fault)
                self.truth.fault(fault, now)
        self._active = {fault for fault in self._active if fault.active(now)}
        for kind, (begin, end) in self._switches.items():
            wanted = any(fault.kind == kind for fault in self._active)
            if wanted != (kind in self._down):
                (begin if wanted else end)()
                self._down.symmetric_difference_update({kind})

    def run_fault(self, kind: str, job: BackupJob, fire: datetime) -> Fault | None:
        """The first unused fault of `kind` aimed at this job at or before this run (a run that failed
        before the fault could land passes it on to the next run)."""
        for fault in self.faults:
            if fault.kind == kind and fault.dag_id == job.dag_id and fault.start <= fire and fault not in self._used:
                self._used.add(fault)
                return fault
        return None

    # --- a backup run -------------------------------------------------------------------

    def run_job(self, fire: datetime, job: BackupJob, rerun: bool = False) -> None:
        run = run_info(job, fire)
        if job.backup_type == "wal" and not rerun:
            self.source.switch_wal(fire)
            self.source.restamp(fire - timedelta(seconds=1))
        killed = None if rerun else self.run_fault("sigkill", job, fire)
        if killed:
            outcome = self.kill_a_backup(job, run)
            if outcome is None:  # the try failed before writing anything (source down, disk full): kill the next run
                self._used.discard(killed)
                killed = None
            else:
                self.truth.fault(killed, fire)
                self.truth.killed(job, outcome, backup_id_for(fire))
        backup_id = self.step(job, run, "backup", lambda: steps.backup(self.plan, job, run, self.connections),
                              first_try=1 if killed else 0)
        self.truth.bounded(job, staging.unshipped(self.plan.backup_root, job))
        for source in self.sources:
            if source.service == job.service:
                source.after_backup(job.backup_type)
        if backup_id is None:
            return self.failed.append((fire, job, "backup", None))
        self.truth.backed_up(job, BackupSet(self.plan.backup_root, job.service, job.backup_type, backup_id))
        flipped = None if rerun else self.run_fault("flipped_byte", job, fire)
        if flipped:
            self.truth.fault(flipped, fire)
            self.truth.flipped(job, self.flip_a_byte(job, backup_id), self.clock.now())
        checked = self.step(job, run, "checksum", lambda: steps.checksum(self.plan, job, backup_id))
        if flipped:
            self.truth.flip_caught(job, backup_id, caught=checked is None)
        if checked is None:
            return self.failed.append((fire, job, "checksum", backup_id))
        self.truth.verified(job, backup_id, self.clock.now())
        slow = None if rerun else self.run_fault("slow_upload", job, fire)
        if slow:
            self.truth.fault(slow, fire)
            self.schedule(self.clock.now() + (slow.end - slow.start), "ship", (job, run, backup_id, True))
        else:
            self.ship(self.clock.now(), (job, run, backup_id, False))

    def ship(self, when: datetime, payload: tuple[BackupJob, RunInfo, str, bool]) -> None:
        job, run, backup_id, slow = payload
        self.proxy.delay_s = SLOW_UPLOAD_DELAY_S if slow else 0.0
        try:
            uploaded = self.step(job, run, "offsite_upload", lambda: steps.offsite_upload(self.plan, job, backup_id, offsite=self.store))
        finally:
            self.proxy.delay_s = 0.0
        if uploaded is None:
            return self.failed.append((run.moment, job, "offsite_upload", backup_id))
        self.truth.shipped(job, backup_id, self.clock.now())
        report = self.step(job, run, "retention_prune", lambda: steps.retention_prune(
            self.plan, job, backup_id, offsite=self.store, now=self.clock.now()))
        if report is None:
            return self.failed.append((run.moment, job, "retention_prune", backup_id))
        self.truth.pruned(job, report)

    def operate(self, when: datetime, _: Any) -> None:
        """Clear the failed runs, oldest first (a WAL chain is mended in order), each at most OPERATOR_CLEARS times."""
        failed, self.failed = sorted(self.failed, key=lambda f: (f[0], f[1].dag_id)), []
        for fire, job, task_id, backup_id in failed:
            if self.truth.clears[(job.dag_id, fire)] >= OPERATOR_CLEARS:
                continue
            self.clock.set(max(self.clock.now(), when))
            self.sync_faults(self.clock.now())
            self.truth.cleared(job, task_id, fire)
            if task_id in ("backup", "checksum"):
                self.run_job(fire, job, rerun=True)
            else:
                self.ship(self.clock.now(), (job, run_info(job, fire), backup_id, False))

    def connections(self, conn_id: str) -> Any:
        if conn_id not in self._connections:
            raise LookupError(f"the soak defines no connection {conn_id!r}")
        return self._connections[conn_id]

    def step(self, job: BackupJob, run: RunInfo, task_id: str, call: Callable[[], Any], first_try: int = 0) -> Any:
        """Run one task with Airflow's tries; None when every try failed (the failure alert is then sent)."""
        started = self.clock.now()
        error: BaseException | None = None
        for number, delay in enumerate(RETRY_DELAYS[first_try:], start=first_try + 1):
            self.clock.set(started + delay)
            self.sync_faults(self.clock.now())
            try:
                return call()
            except Exception as exc:  # noqa: BLE001 (every failure is recorded and alerted, as Airflow would)
                error = exc
                self.truth.failed_try(job, task_id, run, exc)
        context = {"ti": SimpleNamespace(dag_id=job.dag_id, task_id=task_id, run_id=run.run_id,
                                         try_number=len(RETRY_DELAYS), task=SimpleNamespace(retries=len(RETRY_DELAYS) - 1),
                                         log_url="(soak)"),
                   "exception": error}
        notify.send(self.plan.slack_conn_id, notify.failure_text(context))
        self.truth.failed_task(job, task_id, run, error)
        return None

    # --- faults that hit one run --------------------------------------------------------

    def kill_a_backup(self, job: BackupJob, run: RunInfo) -> dict[str, Any] | None:
        """Run the backup's first try in its own process and SIGKILL it mid-write (None: it failed first)."""
        args = {"now": self.clock.now().isoformat(), "connection": self.source.connection_fields(),
                "service": job.service, "backup_type": job.backup_type,
                "run": {k: v for k, v in run.as_dict().items() if v is not None}}
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'plugins'}:{ROOT}"}
        child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, json.dumps(args)], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        set_dir = BackupSet(self.plan.backup_root, job.service, job.backup_type, backup_id_for(run.moment)).path
        deadline = time.monotonic() + 120
        while not any(p.is_file() and p.name != ".writer.json" and p.stat().st_size for p in _files(set_dir)):
            if child.poll() is not None:
                log.warning("the backup to kill failed first: %s", child.stderr.read()[-500:])
                return None
            if time.monotonic() > deadline:
                child.kill()
                raise AssertionError(f"the backup to kill never wrote: {child.stderr.read()[-2000:]}")
            time.sleep(0.05)
        time.sleep(0.3)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        state = BackupSet(self.plan.backup_root, job.service, job.backup_type, backup_id_for(run.moment)).state
        marker = (set_dir / ".writer.json").read_text() if (set_dir / ".writer.json").exists() else ""
        return {"pid": child.pid, "state": state.value, "marker": json.loads(marker) if marker else None}

    def flip_a_byte(self, job: BackupJob, backup_id: str) -> str:
        backup_set = BackupSet(self.plan.backup_root, job.service, job.backup_type, backup_id)
        entry = max(backup_set.manifest().files, key=lambda e: e.size)
        path = backup_set.path / entry.path
        with open(path, "r+b") as handle:
            handle.seek(entry.size // 2)
            byte = handle.read(1)
            handle.seek(entry.size // 2)
            handle.write(bytes([byte[0] ^ 0x01]))
        return backup_id

    # --- the hourly watchdog ------------------------------------------------------------

    def tick(self, when: datetime, _: Any) -> None:
        for source in self.sources:
            source.work(when)
        self.source.restamp(when)
        statuses = watchdog.check(self.plan, when, self.store)
        heard = len(self.slack())
        try:
            watchdog.announce(self.plan, statuses)
        except OSError as exc:  # the alert state cannot be written on a full disk: sent, but the task fails
            self.truth.watchdog_failed(when, exc)
        self.truth.checked(when, statuses, self.slack()[heard:])
        for job in self.plan.enabled_jobs:
            self.truth.bounded(job, staging.unshipped(self.plan.backup_root, job))


def _operator_job(plan: Plan) -> BackupJob:
    from dataclasses import replace

    return replace(plan.enabled_jobs[0], schedule=OPERATOR_AT, timezone="Asia/Seoul")


def _files(path: Path) -> list[Path]:
    return list(path.rglob("*")) if path.is_dir() else []
