"""PostgreSQL physical snapshot: the weekly `snapshot` backup type (pg_basebackup).

Owns: the pg_basebackup command (tar to stdout, `-X fetch`, SHA-256 backup
manifest injected into the tar), storing it as `base.tar.zst` through the
zstd → sha256 stream, verification (extract to a temp dir, `pg_verifybackup`,
because PG13–17 verify plain format only), reading start/end LSN, segments and
timeline from `backup_label` / `backup_manifest`, restoring a base to its
consistency point, and the optional EBS volume snapshot (off by default).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from erp_backup.crypto import clear_view
from erp_backup.manifest import Manifest
from erp_backup.runner import Command, CommandError, DockerExecutor, Executor, LocalExecutor, docker_api
from erp_backup.runs import utcnow
from erp_backup.scratch.base import scratch_root
from erp_backup.scratch.postgres import ScratchPostgres, chown_to_cluster_user, pg_bindir
from erp_backup.services.base import BackupContext, BackupOutcome, SourceUnavailable
from erp_backup.services.postgres.segments import DEFAULT_SEGMENT_SIZE, Segment, format_lsn, parse_lsn
from erp_backup.sets import BackupSet
from erp_backup.stream import stream_to_file

log = logging.getLogger(__name__)

BASE_FILE = "base.tar.zst"
READ_CHUNK = 1 << 20
_UNREACHABLE = re.compile(
    r"could not connect|connection refused|could not translate host|timeout expired|no route to host|"
    r"server closed the connection|Connection timed out",
    re.IGNORECASE,
)
_LABEL_START = re.compile(r"^START WAL LOCATION: ([0-9A-F]+/[0-9A-F]+) \(file ([0-9A-F]{24})\)$", re.MULTILINE)


class SnapshotError(RuntimeError):
    """The base backup could not be taken, read or verified. The message names the set."""


# --- commands (pure) ---------------------------------------------------------------------------


def basebackup_command(
    *,
    host: str,
    port: int,
    user: str,
    password: str | None,
    label: str,
    checkpoint: str = "fast",
    max_rate: str | None = None,
    binary: str = "pg_basebackup",
) -> Command:
    """pg_basebackup as one uncompressed tar on stdout, WAL fetched into it, manifest injected.

    Server-side compression cannot be combined with a manifest injected into a
    tar on stdout, so compression is our zstd stage.
    """
    argv = [
        binary,
        f"--host={host}",
        f"--port={port}",
        f"--username={user}",
        "--no-password",
        "--pgdata=-",
        "--format=tar",
        "--wal-method=fetch",
        f"--checkpoint={checkpoint}",
        "--manifest-checksums=SHA256",
        f"--label={label}",
    ]
    if max_rate:
        argv.append(f"--max-rate={max_rate}")
    return Command(tuple(argv), env={"PGPASSWORD": password} if password else {})


def verifybackup_command(backup_dir: Path, bindir: Path) -> Command:
    return Command((str(bindir / "pg_verifybackup"), str(backup_dir)))


def controldata_command(data_dir: Path, bindir: Path) -> Command:
    return Command((str(bindir / "pg_controldata"), str(data_dir)), env={"LC_ALL": "C"})


def executor_for(options: Mapping[str, Any]) -> Executor:
    """Where pg_basebackup runs: the worker (exec_mode network) or the erp-postgres container (docker)."""
    if options.get("exec_mode") == "docker":
        api = docker_api(options.get("docker_conn_id"), options.get("docker_url"))
        return DockerExecutor(api, options.get("container", "erp-postgres"), user=options.get("container_user", "postgres"))
    return LocalExecutor()


def basebackup_target(conn: Any, options: Mapping[str, Any]) -> tuple[str, int]:
    """Host and port pg_basebackup connects to; inside the container it is the server's own port."""
    if options.get("exec_mode") == "docker":
        return str(options.get("container_pg_host", "127.0.0.1")), int(options.get("container_pg_port", 5432))
    return conn.host or "127.0.0.1", int(conn.port or 5432)


def ebs_snapshot_request(volume_id: str, backup_id: str, extra_tags: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments of EC2 `create_snapshot` for the data volume."""
    tags = {"Name": f"erp-postgres-{backup_id}", "erp_backup:service": "postgres", "erp_backup:backup_id": backup_id}
    tags.update(extra_tags or {})
    return {
        "VolumeId": volume_id,
        "Description": f"ALL-ERP PostgreSQL weekly snapshot {backup_id} (crash-consistent; WAL archive makes it recoverable)",
        "TagSpecifications": [
            {"ResourceType": "snapshot", "Tags": [{"Key": key, "Value": value} for key, value in sorted(tags.items())]}
        ],
    }


def take_ebs_snapshot(options: Mapping[str, Any], backup_id: str, hook: Any = None) -> dict[str, Any]:
    """Create and wait for an EBS snapshot through the Amazon provider's EC2Hook (needs a real AWS account)."""
    volume_id = options.get("ebs_volume_id")
    if not volume_id:
        raise SnapshotError("postgres option ebs_snapshot is on but ebs_volume_id is not set in the plan")
    if hook is None:
        from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook

        hook = EC2Hook(aws_conn_id=options.get("aws_conn_id", "aws_default"), region_name=options.get("ebs_region"), api_type="client_type")
    client = hook.conn
    response = client.create_snapshot(**ebs_snapshot_request(volume_id, backup_id, options.get("ebs_tags")))
    snapshot_id = response["SnapshotId"]
    client.get_waiter("snapshot_completed").wait(SnapshotIds=[snapshot_id])
    return {"snapshot_id": snapshot_id, "volume_id": volume_id, "start_time": str(response.get("StartTime"))}


# --- reading a base backup ---------------------------------------------------------------------


@dataclass(frozen=True)
class BaseBackupInfo:
    label: str
    start_time: str
    start_lsn: int
    end_lsn: int
    checkpoint_lsn: int
    timeline: int
    segment_size: int
    system_identifier: str | None

    @property
    def start_segment(self) -> Segment:
        return Segment.of_lsn(self.start_lsn, self.timeline, self.segment_size)

    @property
    def end_segment(self) -> Segment:
        """The last segment needed for consistency (the one holding the byte before end_lsn)."""
        return Segment.of_lsn(max(self.end_lsn - 1, self.start_lsn), self.timeline, self.segment_size)

    def as_details(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "start_time": self.start_time,
            "start_lsn": format_lsn(self.start_lsn),
            "end_lsn": format_lsn(self.end_lsn),
            "checkpoint_lsn": format_lsn(self.checkpoint_lsn),
            "timeline": self.timeline,
            "start_segment": self.start_segment.name,
            "end_segment": self.end_segment.name,
            "wal_segment_size": self.segment_size,
            "system_identifier": self.system_identifier,
        }


def parse_backup_label(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def read_base_info(data_dir: Path, controldata: str = "") -> BaseBackupInfo:
    """Read backup_label and backup_manifest of an extracted base backup."""
    try:
        label_text = (data_dir / "backup_label").read_text(encoding="utf-8")
        manifest = json.loads((data_dir / "backup_manifest").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{data_dir}: not a pg_basebackup base backup: {exc}") from exc
    label = parse_backup_label(label_text)
    start = _LABEL_START.search(label_text)
    if not start:
        raise SnapshotError(f"{data_dir}/backup_label has no START WAL LOCATION line")
    ranges = manifest.get("WAL-Ranges") or []
    if not ranges:
        raise SnapshotError(f"{data_dir}/backup_manifest has no WAL-Ranges")
    timeline = int(label.get("START TIMELINE", ranges[0]["Timeline"]))
    control = {
        key.strip(): value.strip() for key, _, value in (line.partition(":") for line in controldata.splitlines())
    }
    segment_size = int(control.get("Bytes per WAL segment", DEFAULT_SEGMENT_SIZE))
    return BaseBackupInfo(
        label=label.get("LABEL", ""),
        start_time=label.get("START TIME", ""),
        start_lsn=parse_lsn(start.group(1)),
        end_lsn=max(parse_lsn(r["End-LSN"]) for r in ranges),
        checkpoint_lsn=parse_lsn(label.get("CHECKPOINT LOCATION", start.group(1))),
        timeline=timeline,
        segment_size=segment_size,
        system_identifier=control.get("Database system identifier"),
    )


def extract_base(archive: Path, data_dir: Path) -> int:
    """Stream-extract base.tar.zst into an empty `data_dir` (0700). Returns the bytes of tar read."""
    if data_dir.exists() and any(data_dir.iterdir()):
        raise SnapshotError(f"{data_dir} is not empty; a base backup is only extracted into an empty directory")
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(data_dir, 0o700)
    with open(archive, "rb") as handle, zstandard.ZstdDecompressor().stream_reader(handle, read_size=READ_CHUNK) as raw:
        with tarfile.open(fileobj=raw, mode="r|") as tar:
            tar.extractall(data_dir, filter="data")
        return raw.tell()


def verify_extracted(data_dir: Path, bindir: Path) -> dict[str, Any]:
    """pg_verifybackup on an extracted (plain) base: files against backup_manifest, and its WAL."""
    command = verifybackup_command(data_dir, bindir)
    done = subprocess.run(list(command.argv), capture_output=True, text=True)
    output = (done.stdout + done.stderr).strip()
    return {"tool": "pg_verifybackup", "status": "ok" if done.returncode == 0 else "failed", "output": output[-2000:]}


def inspect_base(archive: Path, bindir: Path, work_root: Path | None = None) -> tuple[BaseBackupInfo, dict[str, Any]]:
    """Extract a base.tar.zst into a temp dir, verify it and read its LSNs. The temp dir is removed."""
    work = Path(tempfile.mkdtemp(prefix="erp-pgverify-", dir=work_root or scratch_root()))
    try:
        data_dir = work / "data"
        started = time.monotonic()
        tar_bytes = extract_base(archive, data_dir)
        verification = verify_extracted(data_dir, bindir)
        controldata = subprocess.run(
            list(controldata_command(data_dir, bindir).argv), capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}
        ).stdout
        info = read_base_info(data_dir, controldata)
        verification.update(tar_bytes=tar_bytes, seconds=round(time.monotonic() - started, 2))
        return info, verification
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- backup, verify and restore of a base -------------------------------------------------------------------------


def backup(ctx: BackupContext, *, executor: Executor | None = None) -> BackupOutcome:
    """Take a base backup into `base.tar.zst`, verify it with pg_verifybackup, record its WAL range."""
    options = ctx.options
    role = "replication" if "replication" in ctx.job.connections else "source"
    conn_id = ctx.conn_id(role)
    conn = ctx.connection(role)
    executor = executor or executor_for(options)
    host, port = basebackup_target(conn, options)
    command = basebackup_command(
        host=host,
        port=port,
        user=conn.login or "postgres",
        password=conn.password,
        label=f"erp_backup {ctx.backup_set.backup_id}",
        checkpoint=str(options.get("checkpoint", "fast")),
        max_rate=options.get("max_rate"),
        binary=str(options.get("pg_basebackup", "pg_basebackup")),
    )
    try:
        started_at = utcnow()
        streamed = stream_to_file(executor.stream(command), ctx.set_dir, BASE_FILE, level=int(options.get("compress_level", 3)))
        finished_at = utcnow()
    except CommandError as exc:
        if _UNREACHABLE.search(exc.stderr):
            raise SourceUnavailable(
                f"pg_basebackup cannot reach PostgreSQL connection {conn_id!r} at {host}:{port} ({executor.where}): "
                f"{exc.stderr.strip()[-500:]}"
            ) from exc
        raise SnapshotError(
            f"pg_basebackup failed for {ctx.backup_set.key} on {conn_id!r}: {exc}. It needs a role with REPLICATION "
            f"and a pg_hba.conf 'replication' entry for the worker"
        ) from exc

    bindir = Path(options["pg_bindir"]) if options.get("pg_bindir") else pg_bindir()
    with clear_view(ctx.set_dir, ctx.set_dir / BASE_FILE) as base:
        info, verification = inspect_base(base, bindir)
    if verification["status"] != "ok":
        raise SnapshotError(f"pg_verifybackup rejected {ctx.backup_set.key}: {verification['output']}")
    details: dict[str, Any] = {
        **info.as_details(),
        "format": "tar",
        "compression": "zstd",
        "wal_method": "fetch",
        "tar_bytes": streamed.raw_bytes,
        "backup_start_time": started_at.isoformat(),
        "backup_end_time": finished_at.isoformat(),
        "verification": verification,
    }
    if options.get("ebs_snapshot", False):
        details["ebs_snapshot"] = take_ebs_snapshot(options, ctx.backup_set.backup_id)
    return BackupOutcome(
        files=[streamed.entry],
        source={"conn_id": conn_id, "host": host, "port": port, "executor": executor.where},
        tools={"pg_basebackup": _tool_version(executor, command.argv[0])},
        details=details,
    )


def _tool_version(executor: Executor, binary: str) -> str:
    try:
        return executor.run(Command((binary, "--version"))).decode().strip()
    except CommandError:
        return "unknown"


def verify(backup_set: BackupSet, manifest: Manifest, *, bindir: Path | None = None) -> list[str]:
    """Extract the stored base and run pg_verifybackup again; compare its LSNs with the manifest."""
    archive = backup_set.path / BASE_FILE
    try:
        info, verification = inspect_base(archive, bindir or pg_bindir())
    except (SnapshotError, OSError, tarfile.TarError, zstandard.ZstdError) as exc:
        return [f"{backup_set.key}/{BASE_FILE}: cannot extract and read: {exc}"]
    problems = []
    if verification["status"] != "ok":
        problems.append(f"{backup_set.key}: pg_verifybackup failed: {verification['output']}")
    for key in ("start_lsn", "end_lsn", "start_segment", "timeline"):
        recorded = manifest.details.get(key)
        if recorded is not None and recorded != info.as_details()[key]:
            problems.append(f"{backup_set.key}: {key} is {info.as_details()[key]} in the backup, {recorded} in the manifest")
    return problems


def prepare_data_dir(cluster: ScratchPostgres, settings: Mapping[str, str] | None = None) -> None:
    """Make an extracted base startable as a scratch cluster: config files, overrides, ownership.

    Overrides go to postgresql.auto.conf; the source's pg_hba.conf is left as it
    was and a trust-on-loopback one outside the data dir is used instead.
    """
    data_dir = cluster.data_dir
    for name in ("postgresql.conf", "pg_ident.conf", "pg_hba.conf"):
        if not (data_dir / name).exists():  # Debian keeps these in /etc/postgresql
            (data_dir / name).write_text("")
    for leftover in ("postmaster.pid", "postmaster.opts", "backup_manifest"):
        (data_dir / leftover).unlink(missing_ok=True)
    scratch_hba = cluster.base_dir / "pg_hba.scratch.conf"
    scratch_hba.write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
    # The source's archive_command must never run here: it would write into the production archive.
    cluster.configure(
        {"archive_mode": "off", "archive_command": "''", "hba_file": f"'{scratch_hba}'", **(settings or {})}
    )
    os.chmod(data_dir, 0o700)
    chown_to_cluster_user(cluster.base_dir)


def scratch_cluster(target: ScratchPostgres | str | Path, port: int | None = None) -> ScratchPostgres:
    """A scratch cluster to restore into: given, or a new one in the directory `target` (data in `<target>/data`)."""
    if isinstance(target, ScratchPostgres):
        return target
    base = Path(target)
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    return ScratchPostgres(base, port=port)


def restore(set_dir: Path, manifest: Manifest, target: ScratchPostgres | str | Path, **options: Any) -> dict[str, Any]:
    """Restore a base backup alone into a scratch cluster, recovered to its consistency point.

    The WAL fetched into the tar takes the cluster to the backup's end; no archive needed.
    For a point in time, use `pitr.restore_to_time`.
    """
    cluster = scratch_cluster(target, options.get("port"))
    started = time.monotonic()
    extract_base(set_dir / BASE_FILE, cluster.data_dir)
    prepare_data_dir(cluster, options.get("settings"))
    cluster.start(timeout=float(options.get("start_timeout", 600)))
    return {
        "backup_id": manifest.backup_id,
        "data_dir": str(cluster.data_dir),
        "port": cluster.port,
        "conninfo": cluster.conninfo(),
        "end_lsn": manifest.details.get("end_lsn"),
        "seconds": round(time.monotonic() - started, 2),
    }
