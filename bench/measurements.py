"""The benchmark behind `bench/run`: our backup, restore, checksum, upload and DAG parsing against baselines.

Builds ERP-like databases in scratch PostgreSQL clusters (never the shared server),
runs each measurement `--repeat` times (methods interleaved, order rotated) and
writes medians, ratios and PASS/MISS against the targets to BENCHMARKS.md.
A "## Notes" section already in BENCHMARKS.md is kept as it is.

Not part of the test suite: numbers depend on the machine and on its load.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from erp_backup.plan import load_plan

# The zstd level the project ships for PostgreSQL: what the backup benchmark measures.
SHIPPED_LEVEL = int(load_plan().job("postgres", "full").options.get("compress_level", 3))
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PYTHON = sys.executable
MB = 1_000_000
MIB = 1 << 20
RESULT_MARKER = "BENCH_RESULT "
OFFSITE_CONN_ID = "bench_offsite"
S3_KEYS = {"aws_access_key_id": "bench-access-key", "aws_secret_access_key": "bench-secret-key", "region_name": "us-east-1"}

# Targets (see BENCHMARKS.md).
BACKUP_VS_FLOOR_MAX = 1.15
OUTPUT_VS_SEED_MAX = 0.45
PEAK_RSS_MAX_MIB = 256
PEAK_RSS_FLAT_GROWTH = 0.10  # the larger database may add at most 10% to the peak
CHECKSUM_VS_SHA256SUM_MIN = 0.8
DAG_PARSE_MAX_S = 0.3
DIAGNOSE_SAMPLE = 32 * MIB  # compression levels are compared on this much of the raw dump

log = logging.getLogger("bench")


class BenchError(RuntimeError):
    pass


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], unit: str = "s", digits: int = 2) -> str:
    """`median (min–max)`."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} {unit}"
    return f"{median(values):.{digits}f} {unit} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def shell(script: str, *, what: str, check: bool = True) -> tuple[float, str]:
    """Run a bash pipeline (pipefail); return (seconds, stderr)."""
    clock = time.monotonic()
    done = subprocess.run(["bash", "-o", "pipefail", "-c", script], capture_output=True, text=True)
    seconds = time.monotonic() - clock
    if check and done.returncode != 0:
        raise BenchError(f"{what} failed ({done.returncode}): {done.stderr.strip()[-1500:]}")
    return seconds, done.stderr


def child_result(stdout: str, what: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    raise BenchError(f"{what}: no result line in its output:\n{stdout[-2000:]}")


def read_kib(pid: int, field_name: str) -> tuple[str, int] | None:
    """(process name, value in KiB) of a /proc/<pid>/status field; None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as handle:
            name, value = "", None
            for line in handle:
                if line.startswith("Name:"):
                    name = line.split(None, 1)[1].strip()
                elif line.startswith(field_name + ":"):
                    value = int(line.split()[1])
            return (name, value) if value is not None else None
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


# A child seen between fork and exec still reports its parent's memory; pg_wrapper (perl) execs pg_dump.
NOT_YET_EXECUTED = ("python", "perl", "bash", "sh")


class TreeSampler:
    """Polls the descendants of a process and keeps each program's highest VmHWM (KiB)."""

    def __init__(self, pid: int, every_s: float = 0.1):
        self.pid, self.every_s = pid, every_s
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                children = root.children(recursive=True)
            except psutil.NoSuchProcess:
                return
            for child in children:
                found = read_kib(child.pid, "VmHWM")
                if found and not found[0].startswith(NOT_YET_EXECUTED):
                    self.peaks[found[0]] = max(self.peaks.get(found[0], 0), found[1])
            self._stop.wait(self.every_s)


def backup_id(index: int) -> str:
    return (datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(minutes=index)).strftime("%Y%m%dT%H%M%SZ")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pg_args(port: int) -> str:
    return f"-h 127.0.0.1 -p {port} -U postgres"


# ---------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo", encoding="ascii") as handle:
        mem_kib = next(int(line.split()[1]) for line in handle if line.startswith("MemTotal:"))
    flags = open("/proc/cpuinfo", encoding="ascii", errors="replace").read()
    import zstandard

    return {
        "nproc": subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip(),
        "cpu": cpu + (" (SHA-NI)" if " sha_ni" in flags else ""),
        "ram": f"{mem_kib / MIB:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pg_dump": subprocess.run(["pg_dump", "--version"], capture_output=True, text=True).stdout.strip(),
        "zstandard": zstandard.__version__,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ---------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------


@dataclass
class Results:
    args: argparse.Namespace
    machine: dict[str, str] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    backup: dict[str, Any] = field(default_factory=dict)
    rss: dict[str, Any] = field(default_factory=dict)
    restore: dict[str, Any] = field(default_factory=dict)
    checksum: dict[str, Any] = field(default_factory=dict)
    offsite: dict[str, Any] = field(default_factory=dict)
    dags: dict[str, Any] = field(default_factory=dict)
    diagnose: dict[str, Any] = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    load: dict[str, str] = field(default_factory=dict)


def run_backup_child(port: int, root: Path, index: int, *extra: str) -> dict[str, Any]:
    argv = [PYTHON, str(BENCH / "backup_child.py"), "--port", str(port), "--root", str(root),
            "--backup-id", backup_id(index), *extra]
    clock = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with TreeSampler(proc.pid) as sampler:
        stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise BenchError(f"backup child failed ({proc.returncode}): {(stdout + stderr)[-3000:]}")
    result = child_result(stdout, "backup child")
    result["process_seconds"] = time.monotonic() - clock
    result["children_kib"] = sampler.peaks
    return result


def phase_backup(res: Results, source: Any, work: Path) -> tuple[Path, Path]:
    """Ours vs `pg_dumpall | gzip` vs `pg_dumpall > /dev/null`. Returns (our last set, last seed file)."""
    sets_root = work / "sets"
    seed_dir = work / "seed"
    seed_dir.mkdir()
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "seed": [], "floor": []}
    dumpall = f"pg_dumpall {pg_args(source.port)}"
    last_set: Path | None = None
    last_seed: Path | None = None

    def ours(i: int) -> None:
        nonlocal last_set
        result = run_backup_child(source.port, sets_root, i)
        if last_set is not None:
            shutil.rmtree(last_set)
        last_set = Path(result["set_dir"])
        runs["ours"].append(result)

    def seed(i: int) -> None:
        nonlocal last_seed
        target = seed_dir / f"dumpall-{i}.sql.gz"
        seconds, _ = shell(f"{dumpall} | gzip > {target}", what="pg_dumpall | gzip")
        if last_seed is not None:
            last_seed.unlink()
        last_seed = target
        runs["seed"].append({"seconds": seconds, "bytes": target.stat().st_size})

    def floor(i: int) -> None:
        seconds, _ = shell(f"{dumpall} > /dev/null", what="pg_dumpall > /dev/null")
        runs["floor"].append({"seconds": seconds})

    methods: list[Callable[[int], None]] = [ours, seed, floor]
    for i in range(res.args.repeat):
        for offset in range(len(methods)):
            method = methods[(i + offset) % len(methods)]
            method(i)
            log.info("backup run %d %s: %.2f s", i + 1, method.__name__, runs[method.__name__][-1]["seconds"])
    assert last_set is not None and last_seed is not None
    _, plain = shell(f"gzip -dc {last_seed} | wc -c 1>&2", what="measuring the plain dump size")
    res.backup = {
        "ours_seconds": [r["seconds"] for r in runs["ours"]],
        "ours_process_seconds": [r["process_seconds"] for r in runs["ours"]],
        "ours_dump_seconds": [sum(r["dump_seconds"].values()) for r in runs["ours"]],
        "seed_seconds": [r["seconds"] for r in runs["seed"]],
        "floor_seconds": [r["seconds"] for r in runs["floor"]],
        "ours_bytes": runs["ours"][-1]["bytes"],
        "ours_raw_bytes": runs["ours"][-1]["raw_bytes"],
        "seed_bytes": runs["seed"][-1]["bytes"],
        "plain_bytes": int(plain.strip().splitlines()[-1]),
        "runs": runs["ours"],
    }
    return last_set, last_seed


def phase_rss_small(res: Results, small: Any, work: Path) -> None:
    runs = []
    for i in range(res.args.repeat):
        result = run_backup_child(small.port, work / "sets-small", 100 + i)
        shutil.rmtree(result["set_dir"])
        runs.append(result)
    res.rss = {"small": runs, "large": res.backup["runs"]}


def count_rows(port: int, dbname: str, tables: list[str]) -> dict[str, int]:
    import psycopg

    with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname={dbname}") as conn:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}


CHECKED_TABLES = ["erp.order_lines", "erp.audit_log", "erp.invoices"]


def phase_restore(res: Results, set_dir: Path, seed_file: Path, custom_dir: Path, expected: dict[str, int]) -> None:
    """Ours vs `pg_restore -j<cores>` of pg_dump -Fc files vs `gunzip | psql`, each into a fresh cluster."""
    import pgdata

    from erp_backup.manifest import MANIFEST_NAME, Manifest
    from erp_backup.services import postgres

    manifest = Manifest.read(set_dir / MANIFEST_NAME)
    jobs = os.cpu_count() or 2
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "pg_restore": [], "seed": []}

    def ours(cluster: Any) -> dict[str, Any]:
        clock = time.monotonic()
        report = postgres.restore(set_dir, manifest, cluster.conninfo(), options={"jobs": jobs})
        report.raise_for_problems(f"restore of {set_dir}")
        return {"seconds": time.monotonic() - clock, "durations": report.details["durations"]}

    def pg_restore(cluster: Any) -> dict[str, Any]:
        clock = time.monotonic()
        shell(f"psql -X -q {pg_args(cluster.port)} -d postgres -f {custom_dir / 'globals.sql'} >/dev/null",
              what="psql globals", check=False)  # "role postgres already exists" is expected
        for dump in sorted(custom_dir.glob("*.dump")):
            if dump.stem == "postgres":
                continue  # nothing in it; the target has its own
            shell(f"pg_restore {pg_args(cluster.port)} -j {jobs} --create -d postgres {dump}", what=f"pg_restore {dump.name}")
        return {"seconds": time.monotonic() - clock}

    def seed(cluster: Any) -> dict[str, Any]:
        seconds, _ = shell(f"gunzip -c {seed_file} | psql -X -q {pg_args(cluster.port)} -d postgres >/dev/null",
                           what="gunzip | psql", check=False)  # as the seed runs it: errors do not stop psql
        return {"seconds": seconds}

    methods: list[Callable[[Any], dict[str, Any]]] = [ours, pg_restore, seed]
    for i in range(res.args.repeat):
        for offset in range(len(methods)):
            method = methods[(i + offset) % len(methods)]
            cluster = pgdata.new_cluster(f"bench-restore-{method.__name__}", pgdata.TARGET_SETTINGS)
            try:
                result = method(cluster)
                got = count_rows(cluster.port, "erp_bench", CHECKED_TABLES)
                if got != expected:
                    raise BenchError(f"restore {method.__name__}: rows {got} != source {expected}")
            finally:
                cluster.destroy()
            runs[method.__name__].append(result)
            log.info("restore run %d %s: %.2f s", i + 1, method.__name__, result["seconds"])
    res.restore = {
        "jobs": jobs,
        **{f"{name}_seconds": [r["seconds"] for r in found] for name, found in runs.items()},
        "ours_steps": {step: [r["durations"][step] for r in runs["ours"]] for step in runs["ours"][0]["durations"]},
    }


def phase_checksum(res: Results, set_dir: Path, work: Path) -> None:
    """`find_problems` (manifest.sha256_file) vs `sha256sum` on the backup set and on one big file."""
    from erp_backup.checksum import find_problems
    from erp_backup.manifest import MANIFEST_NAME, FileEntry, Manifest

    manifest = Manifest.read(set_dir / MANIFEST_NAME)
    big_dir = work / "checksum"
    big_dir.mkdir()
    big = big_dir / "big.bin"
    block = os.urandom(8 * MIB)
    with open(big, "wb") as handle:
        for i in range(res.args.checksum_mb // 8):
            handle.write(block[i % 7:] + block[: i % 7])  # distinct blocks, no pattern a hash could skip
    size = big.stat().st_size
    expected = subprocess.run(["sha256sum", str(big)], capture_output=True, text=True, check=True).stdout.split()[0]
    big_manifest = Manifest(
        service="bench", backup_type="file", backup_id=backup_id(0), captured_started_at=datetime.now(timezone.utc),
        captured_finished_at=datetime.now(timezone.utc), run={}, source={}, tools={},
        files=[FileEntry(path=big.name, size=size, sha256=expected)],
    )
    cases = {"set": (set_dir, manifest), "big": (big_dir, big_manifest)}
    times: dict[str, list[float]] = {f"{case}_{tool}": [] for case in cases for tool in ("ours", "sha256sum")}
    for i in range(res.args.repeat + 1):  # the first round only warms the page cache
        for case, (directory, case_manifest) in cases.items():
            files = [str(directory / entry.path) for entry in case_manifest.files]
            order = ["ours", "sha256sum"] if i % 2 else ["sha256sum", "ours"]
            for tool in order:
                clock = time.monotonic()
                if tool == "ours":
                    problems = find_problems(directory, case_manifest)
                    if problems:
                        raise BenchError(f"find_problems found problems in {directory}: {problems}")
                else:
                    subprocess.run(["sha256sum", *files], capture_output=True, check=True)
                if i:
                    times[f"{case}_{tool}"].append(time.monotonic() - clock)
    res.checksum = {"set_bytes": manifest.total_size, "big_bytes": size, **times}
    big.unlink()


def phase_offsite(res: Results, set_dir: Path) -> None:
    """S3Offsite.upload_set vs plain boto3 upload_file of the same files, to a moto server in its own process."""
    import boto3

    from erp_backup.checksum import verify_and_seal
    from erp_backup.manifest import MANIFEST_NAME, Manifest
    from erp_backup.offsite import S3Offsite
    from erp_backup.sets import SUMS_NAME, BackupSet

    backup_set = BackupSet(set_dir.parents[2], "postgres", "full", set_dir.name)
    verify_and_seal(backup_set)
    manifest = Manifest.read(set_dir / MANIFEST_NAME)
    files = [entry.path for entry in manifest.files] + [SUMS_NAME, MANIFEST_NAME]
    total = sum((set_dir / f).stat().st_size for f in files)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(Path(PYTHON).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise BenchError("moto_server did not start") from None
                time.sleep(0.2)
        os.environ[f"AIRFLOW_CONN_{OFFSITE_CONN_ID.upper()}"] = json.dumps({
            "conn_type": "aws", "login": S3_KEYS["aws_access_key_id"], "password": S3_KEYS["aws_secret_access_key"],
            "extra": {"endpoint_url": url, "region_name": S3_KEYS["region_name"]},
        })
        client = boto3.client("s3", endpoint_url=url, **S3_KEYS)
        times: dict[str, list[float]] = {"ours": [], "boto3": []}

        def empty(bucket: str) -> None:
            for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []):
                client.delete_object(Bucket=bucket, Key=obj["Key"])
            client.delete_bucket(Bucket=bucket)

        for i in range(res.args.repeat):
            for tool in (["ours", "boto3"] if i % 2 == 0 else ["boto3", "ours"]):
                bucket = f"bench-{tool}-{uuid.uuid4().hex[:8]}"
                client.create_bucket(Bucket=bucket)
                if tool == "ours":
                    offsite = S3Offsite(OFFSITE_CONN_ID, bucket, "erp")
                    _ = offsite.client  # connect before the clock starts, as the raw client was
                    clock = time.monotonic()
                    report = offsite.upload_set(backup_set)
                    times["ours"].append(time.monotonic() - clock)
                    if not report.verified or report.bytes_uploaded != total:
                        raise BenchError(f"upload_set: {report}")
                else:
                    clock = time.monotonic()
                    for name in files:
                        client.upload_file(str(set_dir / name), bucket, f"erp/{backup_set.key}/{name}")
                    times["boto3"].append(time.monotonic() - clock)
                empty(bucket)
                log.info("upload run %d %s: %.2f s", i + 1, tool, times[tool][-1])
        res.offsite = {"bytes": total, "files": len(files), **times}
    finally:
        server.terminate()
        server.wait(timeout=30)


def phase_dags(res: Results) -> None:
    """Each DAG file parsed by a fresh DagBag in a fresh process (Airflow imported before the clock)."""
    per_file: dict[str, dict[str, Any]] = {}
    for path in sorted((ROOT / "dags").glob("*.py")):
        if path.name.startswith("_"):
            continue
        runs = []
        for _ in range(res.args.repeat):
            done = subprocess.run([PYTHON, str(BENCH / "dag_parse_child.py"), str(path)], capture_output=True, text=True)
            if done.returncode != 0:
                raise BenchError(f"parsing {path.name} failed: {(done.stdout + done.stderr)[-2000:]}")
            runs.append(child_result(done.stdout, f"parsing {path.name}"))
        per_file[path.name] = {
            "seconds": [r["seconds"] for r in runs],
            "dags": runs[-1]["dags"],
            "import_errors": runs[-1]["import_errors"],
        }
        log.info("parse %s: %.3f s", path.name, median(per_file[path.name]["seconds"]))
    res.dags = per_file


def phase_diagnose(res: Results, source: Any, work: Path, set_dir: Path) -> None:
    """Where the time and bytes go: backup variants, zstd levels on the same raw dump, DAG parse costs."""
    import zstandard

    from erp_backup.stream import decompress_to

    variants = {
        "no zstd, no inventory (plumbing only)": ["--no-compress", "--no-inventory"],
        f"no inventory (level {SHIPPED_LEVEL})": ["--no-inventory"],
        "level 3 (with inventory)": ["--compress-level", "3"],
    }
    result: dict[str, Any] = {}
    ids = itertools.count(200)
    for _ in range(res.args.repeat):
        for name, extra in variants.items():
            run = run_backup_child(source.port, work / "sets-diag", next(ids), *extra)
            shutil.rmtree(run["set_dir"])
            entry = result.setdefault(name, {"seconds": [], "bytes": run["bytes"], "peak_kib": 0})
            entry["seconds"].append(run["seconds"])
            entry["peak_kib"] = max(entry["peak_kib"], run["self_peak_kib"])
            log.info("diagnose %s: %.2f s", name, run["seconds"])
    raw = work / "raw.dump"
    decompress_to(next((set_dir / "databases").glob("erp_bench*")), raw)
    with open(raw, "rb") as handle:
        sample = handle.read(DIAGNOSE_SAMPLE)
    raw.unlink()
    sample_file = work / "sample.dump"
    sample_file.write_bytes(sample)
    levels: dict[str, dict[str, float]] = {}
    for level in (1, 3, 6, 9, 12, 15):
        clock = time.monotonic()
        size = len(zstandard.ZstdCompressor(level=level, threads=-1).compress(sample))
        levels[f"zstd {level}"] = {"bytes": size, "seconds": time.monotonic() - clock}
    for label, command in (("gzip -6", "gzip -6 -c"), ("gzip -9", "gzip -9 -c")):
        seconds, stderr = shell(f"{command} {sample_file} | wc -c 1>&2", what=label)
        levels[label] = {"bytes": int(stderr.strip().splitlines()[-1]), "seconds": seconds}
    sample_file.unlink()

    parse: dict[str, dict[str, Any]] = {}
    for path in sorted((ROOT / "dags").glob("*.py")):
        runs = []
        for _ in range(res.args.repeat):
            done = subprocess.run([PYTHON, str(BENCH / "dag_parse_child.py"), str(path), "--preload"],
                                  capture_output=True, text=True)
            runs.append(child_result(done.stdout, f"parsing {path.name} --preload"))
        parse[path.name] = {
            "seconds": [r["seconds"] for r in runs],
            **{key: [r["preloaded"][key] for r in runs] for key in runs[0]["preloaded"]},
        }
    res.diagnose = {"variants": result, "sample_bytes": len(sample), "levels": levels, "parse": parse}


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def mib(kib: float) -> float:
    return kib / 1024


def summary_rows(res: Results) -> list[tuple[str, str, str, str, str]]:
    """(measure, ours, baseline, ratio, target + verdict) rows."""
    b, r, c, o = res.backup, res.restore, res.checksum, res.offsite
    rows: list[tuple[str, str, str, str, str]] = []
    ours_s, floor_s, seed_s = median(b["ours_seconds"]), median(b["floor_seconds"]), median(b["seed_seconds"])
    rows.append(("Backup wall time vs floor `pg_dumpall > /dev/null`", f"{ours_s:.2f} s", f"{floor_s:.2f} s",
                 f"{ours_s / floor_s:.2f}×", f"≤ {BACKUP_VS_FLOOR_MAX}× {verdict(ours_s / floor_s <= BACKUP_VS_FLOOR_MAX)}"))
    rows.append(("Backup wall time vs seed `pg_dumpall | gzip`", f"{ours_s:.2f} s", f"{seed_s:.2f} s",
                 f"{ours_s / seed_s:.2f}×", "info"))
    size_ratio = b["ours_bytes"] / b["seed_bytes"]
    rows.append(("Backup output size vs seed", f"{b['ours_bytes'] / MB:.1f} MB", f"{b['seed_bytes'] / MB:.1f} MB",
                 f"{size_ratio:.2f}×", f"≤ {OUTPUT_VS_SEED_MAX}× {verdict(size_ratio <= OUTPUT_VS_SEED_MAX)}"))
    ours_r = median(r["ours_seconds"])
    for name, label in (("pg_restore", f"`pg_restore -j{r['jobs']}` of `pg_dump -Fc`"), ("seed", "seed `gunzip | psql`")):
        base = median(r[f"{name}_seconds"])
        rows.append((f"Restore (incl. our verification) vs {label}", f"{ours_r:.2f} s", f"{base:.2f} s",
                     f"{ours_r / base:.2f}×", "info"))
    small_peak = max(x["self_peak_kib"] for x in res.rss["small"])
    large_peak = max(x["self_peak_kib"] for x in res.rss["large"])
    flat = large_peak <= small_peak * (1 + PEAK_RSS_FLAT_GROWTH)
    rows.append((f"Backup task peak RSS, {res.data['large_mb']:.0f} MB vs {res.data['small_mb']:.0f} MB database",
                 f"{mib(large_peak):.0f} MiB", f"{mib(small_peak):.0f} MiB", f"{large_peak / small_peak:.2f}×",
                 f"≤ {PEAK_RSS_MAX_MIB} MiB, flat {verdict(flat and mib(large_peak) <= PEAK_RSS_MAX_MIB)}"))
    for case, label in (("big", f"{c['big_bytes'] / MIB:.0f} MiB file"), ("set", "backup set")):
        ours_tp = c[f"{case}_bytes"] / median(c[f"{case}_ours"]) / MB
        base_tp = c[f"{case}_bytes"] / median(c[f"{case}_sha256sum"]) / MB
        target = (f"≥ {CHECKSUM_VS_SHA256SUM_MIN}× {verdict(ours_tp / base_tp >= CHECKSUM_VS_SHA256SUM_MIN)}"
                  if case == "big" else "info")
        rows.append((f"Checksum throughput vs `sha256sum` ({label})", f"{ours_tp:.0f} MB/s", f"{base_tp:.0f} MB/s",
                     f"{ours_tp / base_tp:.2f}×", target))
    ours_u, boto_u = median(o["ours"]), median(o["boto3"])
    rows.append(("Offsite upload vs boto3 `upload_file` (moto)", f"{ours_u:.2f} s", f"{boto_u:.2f} s",
                 f"{ours_u / boto_u:.2f}×", "info"))
    for name, entry in res.dags.items():
        seconds = median(entry["seconds"])
        rows.append((f"DAG parse `dags/{name}` ({entry['dags']} DAGs)", f"{seconds:.3f} s", "", "",
                     f"≤ {DAG_PARSE_MAX_S} s {verdict(seconds <= DAG_PARSE_MAX_S and not entry['import_errors'])}"))
    return rows


def markdown(res: Results, notes: str) -> str:
    a, m, d, b, r, c, o = res.args, res.machine, res.data, res.backup, res.restore, res.checksum, res.offsite
    lines = [
        "# Benchmarks",
        "",
        f"Written by `bench/run --size-mb {a.size_mb:g} --repeat {a.repeat}` on {m['date']} "
        f"(whole run {res.phase_seconds.get('total', 0) / 60:.1f} min). Not part of the test suite.",
        "",
        "**Measured on a shared machine**: other engineers' test suites were running on the same 2 cores "
        f"(load average {res.load.get('start', '?')} at the start, {res.load.get('end', '?')} at the end), "
        "so every number is noisy. Values are medians of the repeats, with (min–max) in the details.",
        "",
        "## Machine",
        "",
        "| | |", "|---|---|",
        f"| CPUs (`nproc`) | {m['nproc']} |",
        f"| CPU | {m['cpu']} |",
        f"| RAM | {m['ram']} |",
        f"| Kernel | {m['kernel']} |",
        f"| PostgreSQL | {d['server_version']}; client `{m['pg_dump']}` |",
        f"| Python | {m['python']} (zstandard {m['zstandard']}) |",
        f"| Date | {m['date']} |",
        "",
        "## Data",
        "",
        f"Scratch clusters (initdb + pg_ctl as user postgres, 127.0.0.1, shared_buffers 256MB, "
        f"max_wal_size 4GB), never the shared server. Database `erp_bench`, schema `erp`: customers, products "
        f"(every third with a 3 KiB random thumbnail), orders, order lines, invoices (2 KiB random + 1 KiB "
        f"repetitive PDF-like bytea each), audit log (jsonb); primary keys, foreign keys, 7 secondary indexes; "
        f"text, numeric, jsonb, timestamptz, bytea. Built with generate_series.",
        "",
        "| | requested | on disk (pg_database_size) | rows | built in |", "|---|---|---|---|---|",
        f"| large (all comparisons) | {d['large_mb']:.0f} MB | {d['large_bytes'] / MB:.0f} MB | {d['large_rows']:,} | {d['large_seconds']:.0f} s |",
        f"| small (peak RSS only) | {d['small_mb']:.0f} MB | {d['small_bytes'] / MB:.0f} MB | {d['small_rows']:,} | {d['small_seconds']:.0f} s |",
        "",
        f"Dump sizes of the large cluster: plain `pg_dumpall` {b['plain_bytes'] / MB:.1f} MB; our "
        f"`pg_dump -Fc -Z0` streams {b['ours_raw_bytes'] / MB:.1f} MB raw.",
        "",
        "## Summary",
        "",
        "| Measure | Ours | Baseline | Ratio | Target |", "|---|---|---|---|---|",
        *["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in summary_rows(res)],
        "",
        "## Details",
        "",
        "### Backup (whole large cluster: globals + every database)",
        "",
        "| Method | Wall time | Output |", "|---|---|---|",
        f"| Ours: `postgres.backup(ctx)` + manifest, in a task-like process | {spread(b['ours_seconds'])} | "
        f"{b['ours_bytes'] / MB:.1f} MB (zstd level {SHIPPED_LEVEL}, {b['ours_bytes'] / b['ours_raw_bytes']:.3f} of raw) |",
        f"| Ours, whole process incl. Python start and imports | {spread(b['ours_process_seconds'])} | |",
        f"| Ours, pg_dump streams only (sum over databases) | {spread(b['ours_dump_seconds'])} | |",
        f"| Seed: `pg_dumpall \\| gzip` (gzip -6) | {spread(b['seed_seconds'])} | {b['seed_bytes'] / MB:.1f} MB "
        f"({b['seed_bytes'] / b['plain_bytes']:.3f} of plain) |",
        f"| Floor: `pg_dumpall > /dev/null` | {spread(b['floor_seconds'])} | ({b['plain_bytes'] / MB:.1f} MB plain) |",
        "",
        "Our time is measured inside the backup process around `postgres.backup(ctx)` and the manifest write "
        "(the Airflow task's own start-up is not part of a backup). It includes the table inventory that runs "
        "in the dump's snapshot, zstd, SHA-256 and the fsync of every file.",
        "",
        "### Peak RSS of the backup task",
        "",
        "Backup run in a subprocess (as the Airflow task, with `airflow.sdk` imported); its VmHWM, its RSS after "
        "imports, and each child program's VmHWM sampled every 0.1 s from /proc (pg_dump, pg_dumpall). "
        "Maximum over the repeats.",
        "",
        "| Database | Task peak (VmHWM) | Task RSS after imports | Added by the backup | Children |",
        "|---|---|---|---|---|",
    ]
    for label, key, size in (("small", "small", d["small_bytes"]), ("large", "large", d["large_bytes"])):
        runs = res.rss[key]
        peak = max(x["self_peak_kib"] for x in runs)
        base = min(x["baseline_kib"] for x in runs)
        children: dict[str, int] = {}
        for x in runs:
            for name, kib in x["children_kib"].items():
                children[name] = max(children.get(name, 0), kib)
        kids = ", ".join(f"{name} {mib(kib):.0f} MiB" for name, kib in sorted(children.items())) or "none seen"
        lines.append(f"| {label} ({size / MB:.0f} MB) | {mib(peak):.0f} MiB | {mib(base):.0f} MiB | "
                     f"{mib(peak - base):.0f} MiB | {kids} |")
    lines += [
        "",
        f"### Restore (into a fresh scratch cluster each time, jobs = {r['jobs']})",
        "",
        "| Method | Wall time |", "|---|---|",
        f"| Ours: `postgres.restore` (globals, decompress, pg_restore, row counts + content hashes) | {spread(r['ours_seconds'])} |",
        *[f"| — ours, step `{step}` | {spread(values)} |" for step, values in r["ours_steps"].items()],
        f"| `psql` globals + `pg_restore -j{r['jobs']} --create` of `pg_dump -Fc` files | {spread(r['pg_restore_seconds'])} |",
        f"| Seed: `gunzip \\| psql` of the `pg_dumpall \\| gzip` file | {spread(r['seed_seconds'])} |",
        "",
        "Cluster creation is not timed. Every restore is checked afterwards (row counts of three tables).",
        "",
        "### Checksum verification",
        "",
        "| Input | `find_problems` (sha256_file) | `sha256sum` |", "|---|---|---|",
        f"| backup set, {c['set_bytes'] / MB:.1f} MB | {spread(c['set_ours'], digits=3)} | {spread(c['set_sha256sum'], digits=3)} |",
        f"| generated file, {c['big_bytes'] / MIB:.0f} MiB | {spread(c['big_ours'], digits=3)} | {spread(c['big_sha256sum'], digits=3)} |",
        "",
        "Page cache warm (one unmeasured round first), so this compares hashing, not the disk.",
        "",
        "### Offsite upload",
        "",
        f"{o['files']} objects, {o['bytes'] / MB:.1f} MB, to moto_server (own process) on 127.0.0.1.",
        "",
        "| Method | Wall time |", "|---|---|",
        f"| `S3Offsite.upload_set` (SHA-256 checksums, head + verify each object, manifest last, receipt) | {spread(o['ours'])} |",
        f"| boto3 `upload_file` per file, default TransferConfig | {spread(o['boto3'])} |",
        "",
        "### DAG parse time",
        "",
        "`DagBag(dag_folder=<file>)` in a fresh process with Airflow already imported (as the DAG processor "
        "does), so the time is the file's own imports and DAG building.",
        "",
        "| File | DAGs | Parse time | Import errors |", "|---|---|---|---|",
        *[f"| `dags/{name}` | {e['dags']} | {spread(e['seconds'], digits=3)} | {len(e['import_errors'])} |"
          for name, e in res.dags.items()],
        "",
    ]
    if res.diagnose:
        dg = res.diagnose
        lines += [
            "### Diagnostics (`--diagnose`)",
            "",
            "| Backup variant (same process and data as above) | Wall time | Output | Task peak RSS |",
            "|---|---|---|---|",
            f"| as shipped (zstd level {SHIPPED_LEVEL}, inventory) | {spread(b['ours_seconds'])} | {b['ours_bytes'] / MB:.1f} MB | "
            f"{mib(max(x['self_peak_kib'] for x in res.rss['large'])):.0f} MiB |",
            *[f"| {name} | {spread(v['seconds'])} | {v['bytes'] / MB:.1f} MB | {mib(v['peak_kib']):.0f} MiB |"
              for name, v in dg["variants"].items()],
            f"| floor `pg_dumpall > /dev/null` | {spread(b['floor_seconds'])} | | |",
            "",
            f"Compressors on the first {dg['sample_bytes'] / MIB:.0f} MiB of our raw `pg_dump -Fc -Z0` of `erp_bench`, "
            "one run each (zstd in memory with threads=-1; gzip from the page cache):",
            "",
            "| Compressor | Output / input | Time |", "|---|---|---|",
            *[f"| {name} | {v['bytes'] / dg['sample_bytes']:.3f} | {v['seconds']:.2f} s |"
              for name, v in dg["levels"].items()],
            "",
            "DAG parse with the two parse-time costs paid first, in the same fresh process "
            "(`dag_parse_child.py --preload`):",
            "",
            "| File | Parse time, rest of the file | Slack notifier import | First Asset with a URI |",
            "|---|---|---|---|",
            *[f"| `dags/{name}` | {spread(v['seconds'], digits=3)} | {spread(v['slack_notifier_import'], digits=3)} | "
              f"{spread(v['first_asset_uri'], digits=3)} |" for name, v in dg["parse"].items()],
            "",
        ]
    lines += [
        "### Phases of this run",
        "",
        "| Phase | Seconds |", "|---|---|",
        *[f"| {name} | {seconds:.0f} |" for name, seconds in res.phase_seconds.items()],
        "",
    ]
    return "\n".join(lines) + "\n" + notes


NOTES_PLACEHOLDER = """## Notes

(Written by hand after reading the numbers: why a target is missed and what would fix it.
`bench/run` keeps this section when it rewrites the file.)
"""


def existing_notes(path: Path) -> str:
    if path.exists():
        text = path.read_text(encoding="utf-8")
        index = text.find("\n## Notes")
        if index >= 0:
            return text[index + 1:]
    return NOTES_PLACEHOLDER


def print_summary(res: Results) -> None:
    rows = summary_rows(res)
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)))


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=300, help="database size on disk in MB (default 300)")
    parser.add_argument("--small-size-mb", type=float, help="the second size for peak RSS (default size/4)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; medians are reported (default 3)")
    parser.add_argument("--checksum-mb", type=int, default=512, help="size of the generated checksum file in MiB (default 512)")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--diagnose", action="store_true", help="also time backup variants and compression levels")
    parser.add_argument("--keep-work", action="store_true", help="keep the work directory (backup sets, dumps)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.size_mb <= 0 or args.checksum_mb < 8:
        parser.error("--repeat ≥ 1, --size-mb > 0 and --checksum-mb ≥ 8 please")
    args.small_size_mb = args.small_size_mb or args.size_mb / 4
    return args


def prepare_environment(work: Path) -> None:
    """Airflow reads its config at import: point it at a throwaway home before anything imports it."""
    os.environ["AIRFLOW_HOME"] = str(work / "airflow-home")
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
    os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(ROOT / "plugins")
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ.setdefault("ERP_BACKUP_ROOT", str(work / "backup-root"))
    paths = [str(ROOT / "plugins"), str(ROOT), str(BENCH)]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    for path in reversed(paths):
        if path not in sys.path:
            sys.path.insert(0, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = Path(tempfile.mkdtemp(prefix="erp-bench-"))
    prepare_environment(work)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below

    import pgdata

    from erp_backup.scratch.postgres import cleanup_stale

    cleanup_stale("bench:")
    res = Results(args=args)
    res.load["start"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    res.machine = machine_info()
    clusters: list[Any] = []
    started = time.monotonic()

    def phase(name: str, func: Callable[[], Any]) -> Any:
        log.info("== %s", name)
        clock = time.monotonic()
        value = func()
        res.phase_seconds[name] = time.monotonic() - clock
        return value

    try:
        def build() -> tuple[Any, Any]:
            source = pgdata.new_cluster("bench-source", pgdata.SOURCE_SETTINGS)
            clusters.append(source)
            small = pgdata.new_cluster("bench-small", pgdata.SOURCE_SETTINGS)
            clusters.append(small)
            large_info = pgdata.build_database(source, "erp_bench", args.size_mb)
            small_info = pgdata.build_database(small, "erp_bench", args.small_size_mb)
            import psycopg

            with psycopg.connect(source.conninfo()) as conn:
                res.data["server_version"] = conn.execute("SHOW server_version").fetchone()[0]
            res.data.update({
                "large_mb": args.size_mb, "large_bytes": large_info.size_bytes, "large_rows": large_info.rows,
                "large_seconds": large_info.seconds, "small_mb": args.small_size_mb, "small_bytes": small_info.size_bytes,
                "small_rows": small_info.rows, "small_seconds": small_info.seconds,
            })
            return source, small

        source, small = phase("build data", build)
        set_dir, seed_file = phase("backup", lambda: phase_backup(res, source, work))
        phase("peak RSS (small database)", lambda: phase_rss_small(res, small, work))
        small.destroy()
        clusters.remove(small)
        if args.diagnose:
            phase("diagnostics", lambda: phase_diagnose(res, source, work, set_dir))

        custom_dir = work / "custom"
        custom_dir.mkdir()

        def custom_dumps() -> dict[str, int]:
            shell(f"pg_dumpall {pg_args(source.port)} --globals-only > {custom_dir / 'globals.sql'}", what="globals")
            for dbname in ("erp_bench", "postgres"):
                shell(f"pg_dump {pg_args(source.port)} -Fc -d {dbname} -f {custom_dir / dbname}.dump", what="pg_dump -Fc")
            return count_rows(source.port, "erp_bench", CHECKED_TABLES)

        expected = phase("pg_dump -Fc for the restore baseline (not timed)", custom_dumps)
        source.destroy()
        clusters.remove(source)
        phase("restore", lambda: phase_restore(res, set_dir, seed_file, custom_dir, expected))
        phase("checksum", lambda: phase_checksum(res, set_dir, work))
        phase("offsite upload", lambda: phase_offsite(res, set_dir))
        phase("DAG parse", lambda: phase_dags(res))
    finally:
        for cluster in clusters:
            cluster.destroy()
        if args.keep_work:
            log.info("work directory kept: %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)

    res.phase_seconds["total"] = time.monotonic() - started
    res.load["end"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    args.output.write_text(markdown(res, existing_notes(args.output)), encoding="utf-8")
    print()
    print_summary(res)
    print(f"\nwritten to {args.output} ({res.phase_seconds['total'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
