"""The measurements behind `bench/run`: each phase times ours against its baselines and fills `Results`.

Data: two scratch clusters built by `pgdata`. Backup: ours in a task-like child process
against `pg_dumpall | gzip` and `pg_dumpall > /dev/null`, with the peak RSS of the
process tree. Restore, checksum, offsite upload and DAG parse each against a baseline.
Methods are interleaved and their order rotated over the `--repeat` runs.
Heavy and Airflow-bound modules are imported inside the phases, after
`bench/benchmark.py` has prepared the environment.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import (
    BENCH,
    MIB,
    PYTHON,
    ROOT,
    BenchError,
    Results,
    backup_id,
    child_result,
    free_port,
    median,
    pg_args,
    shell,
    shipped_level,
)
from bench.machine import TreeSampler

if TYPE_CHECKING:
    from erp_backup.manifest import Manifest
    from erp_backup.scratch.postgres import ScratchPostgres
    from erp_backup.sets import BackupSet

OFFSITE_CONN_ID = "bench_offsite"
S3_KEYS = {"aws_access_key_id": "bench-access-key", "aws_secret_access_key": "bench-secret-key", "region_name": "us-east-1"}
DIAGNOSE_SAMPLE = 32 * MIB  # compression levels are compared on this much of the raw dump
CHECKED_TABLES = ["erp.order_lines", "erp.audit_log", "erp.invoices"]  # row counts every restore must match

log = logging.getLogger("bench")


def build_data(res: Results, clusters: list[ScratchPostgres]) -> tuple[ScratchPostgres, ScratchPostgres]:
    """The large (source) and small clusters, each with an `erp_bench` database; appended to `clusters`."""
    import psycopg

    from bench import pgdata

    source = pgdata.new_cluster("bench-source", pgdata.SOURCE_SETTINGS)
    clusters.append(source)
    small = pgdata.new_cluster("bench-small", pgdata.SOURCE_SETTINGS)
    clusters.append(small)
    large_info = pgdata.build_database(source, "erp_bench", res.args.size_mb)
    small_info = pgdata.build_database(small, "erp_bench", res.args.small_size_mb)
    with psycopg.connect(source.conninfo()) as conn:
        res.data["server_version"] = pgdata.fetch_value(conn, "SHOW server_version")
    res.data.update({
        "large_mb": res.args.size_mb, "large_bytes": large_info.size_bytes, "large_rows": large_info.rows,
        "large_seconds": large_info.seconds, "small_mb": res.args.small_size_mb, "small_bytes": small_info.size_bytes,
        "small_rows": small_info.rows, "small_seconds": small_info.seconds,
    })
    return source, small


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


def phase_backup(res: Results, source: ScratchPostgres, work: Path) -> tuple[Path, Path]:
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


def phase_rss_small(res: Results, small: ScratchPostgres, work: Path) -> None:
    """Our backup of the small database: its peak RSS against the large one's (from the backup phase)."""
    runs = []
    for i in range(res.args.repeat):
        result = run_backup_child(small.port, work / "sets-small", 100 + i)
        shutil.rmtree(result["set_dir"])
        runs.append(result)
    res.rss = {"small": runs, "large": res.backup["runs"]}


def count_rows(port: int, dbname: str, tables: list[str]) -> dict[str, int]:
    import psycopg

    from bench.pgdata import fetch_value

    with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname={dbname}") as conn:
        return {t: int(fetch_value(conn, f"SELECT count(*) FROM {t}")) for t in tables}


def custom_dumps(source: ScratchPostgres, custom_dir: Path) -> dict[str, int]:
    """`pg_dump -Fc` files and globals for the restore baseline; returns the source's CHECKED_TABLES row counts."""
    shell(f"pg_dumpall {pg_args(source.port)} --globals-only > {custom_dir / 'globals.sql'}", what="globals")
    for dbname in ("erp_bench", "postgres"):
        shell(f"pg_dump {pg_args(source.port)} -Fc -d {dbname} -f {custom_dir / dbname}.dump", what="pg_dump -Fc")
    return count_rows(source.port, "erp_bench", CHECKED_TABLES)


def phase_restore(res: Results, set_dir: Path, seed_file: Path, custom_dir: Path, expected: dict[str, int]) -> None:
    """Ours vs `pg_restore -j<cores>` of pg_dump -Fc files vs `gunzip | psql`, each into a fresh cluster."""
    from bench import pgdata
    from erp_backup.manifest import MANIFEST_NAME, Manifest
    from erp_backup.services import postgres

    manifest = Manifest.read(set_dir / MANIFEST_NAME)
    jobs = os.cpu_count() or 2
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "pg_restore": [], "seed": []}

    def ours(cluster: ScratchPostgres) -> dict[str, Any]:
        clock = time.monotonic()
        report = postgres.restore(set_dir, manifest, cluster.conninfo(), options={"jobs": jobs})
        report.raise_for_problems(f"restore of {set_dir}")
        return {"seconds": time.monotonic() - clock, "durations": report.details["durations"]}

    def pg_restore(cluster: ScratchPostgres) -> dict[str, Any]:
        clock = time.monotonic()
        shell(f"psql -X -q {pg_args(cluster.port)} -d postgres -f {custom_dir / 'globals.sql'} >/dev/null",
              what="psql globals", check=False)  # "role postgres already exists" is expected
        for dump in sorted(custom_dir.glob("*.dump")):
            if dump.stem == "postgres":
                continue  # nothing in it; the target has its own
            shell(f"pg_restore {pg_args(cluster.port)} -j {jobs} --create -d postgres {dump}", what=f"pg_restore {dump.name}")
        return {"seconds": time.monotonic() - clock}

    def seed(cluster: ScratchPostgres) -> dict[str, Any]:
        seconds, _ = shell(f"gunzip -c {seed_file} | psql -X -q {pg_args(cluster.port)} -d postgres >/dev/null",
                           what="gunzip | psql", check=False)  # as the seed runs it: errors do not stop psql
        return {"seconds": seconds}

    methods: list[Callable[[ScratchPostgres], dict[str, Any]]] = [ours, pg_restore, seed]
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


def big_file_case(directory: Path, size_mib: int) -> Manifest:
    """A file of `size_mib` MiB of random data in `directory`, and a manifest with its `sha256sum`."""
    from erp_backup.manifest import FileEntry, Manifest

    directory.mkdir()
    big = directory / "big.bin"
    block = os.urandom(8 * MIB)
    with open(big, "wb") as handle:
        for i in range(size_mib // 8):
            handle.write(block[i % 7:] + block[: i % 7])  # distinct blocks, no pattern a hash could skip
    expected = subprocess.run(["sha256sum", str(big)], capture_output=True, text=True, check=True).stdout.split()[0]
    return Manifest(
        service="bench", backup_type="file", backup_id=backup_id(0), captured_started_at=datetime.now(UTC),
        captured_finished_at=datetime.now(UTC), run={}, source={}, tools={},
        files=[FileEntry(path=big.name, size=big.stat().st_size, sha256=expected)],
    )


def phase_checksum(res: Results, set_dir: Path, work: Path) -> None:
    """`find_problems` (manifest.sha256_file) vs `sha256sum` on the backup set and on one big file."""
    from erp_backup.checksum import find_problems
    from erp_backup.manifest import MANIFEST_NAME, Manifest

    manifest = Manifest.read(set_dir / MANIFEST_NAME)
    big_dir = work / "checksum"
    big_manifest = big_file_case(big_dir, res.args.checksum_mb)
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
    res.checksum = {"set_bytes": manifest.total_size, "big_bytes": big_manifest.total_size, **times}
    shutil.rmtree(big_dir)


@contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server in its own process on 127.0.0.1; yields its URL and stops it afterwards."""
    port = free_port()
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
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def upload_ours(backup_set: BackupSet, bucket: str, total: int) -> float:
    """Seconds for `S3Offsite.upload_set` of the set into `bucket`, checked to have verified `total` bytes."""
    from erp_backup.offsite import S3Offsite

    offsite = S3Offsite(OFFSITE_CONN_ID, bucket, "erp")
    _ = offsite.client  # connect before the clock starts, as the raw client was
    clock = time.monotonic()
    report = offsite.upload_set(backup_set)
    seconds = time.monotonic() - clock
    if not report.verified or report.bytes_uploaded != total:
        raise BenchError(f"upload_set: {report}")
    return seconds


def upload_boto3(client: Any, backup_set: BackupSet, files: list[str], bucket: str) -> float:
    """Seconds for plain boto3 `upload_file` of each file of the set into `bucket`."""
    clock = time.monotonic()
    for name in files:
        client.upload_file(str(backup_set.path / name), bucket, f"erp/{backup_set.key}/{name}")
    return time.monotonic() - clock


def empty_bucket(client: Any, bucket: str) -> None:
    for obj in client.list_objects_v2(Bucket=bucket).get("Contents", []):
        client.delete_object(Bucket=bucket, Key=obj["Key"])
    client.delete_bucket(Bucket=bucket)


def phase_offsite(res: Results, set_dir: Path) -> None:
    """S3Offsite.upload_set vs plain boto3 upload_file of the same files, to a moto server in its own process."""
    import boto3

    from erp_backup.checksum import verify_and_seal
    from erp_backup.manifest import MANIFEST_NAME, Manifest
    from erp_backup.sets import SUMS_NAME, BackupSet

    backup_set = BackupSet(set_dir.parents[2], "postgres", "full", set_dir.name)
    verify_and_seal(backup_set)
    manifest = Manifest.read(set_dir / MANIFEST_NAME)
    files = [entry.path for entry in manifest.files] + [SUMS_NAME, MANIFEST_NAME]
    total = sum((set_dir / f).stat().st_size for f in files)
    with moto_server() as url:
        os.environ[f"AIRFLOW_CONN_{OFFSITE_CONN_ID.upper()}"] = json.dumps({
            "conn_type": "aws", "login": S3_KEYS["aws_access_key_id"], "password": S3_KEYS["aws_secret_access_key"],
            "extra": {"endpoint_url": url, "region_name": S3_KEYS["region_name"]},
        })
        client = boto3.client("s3", endpoint_url=url, **S3_KEYS)
        times: dict[str, list[float]] = {"ours": [], "boto3": []}
        for i in range(res.args.repeat):
            for tool in (["ours", "boto3"] if i % 2 == 0 else ["boto3", "ours"]):
                bucket = f"bench-{tool}-{uuid.uuid4().hex[:8]}"
                client.create_bucket(Bucket=bucket)
                if tool == "ours":
                    times["ours"].append(upload_ours(backup_set, bucket, total))
                else:
                    times["boto3"].append(upload_boto3(client, backup_set, files, bucket))
                empty_bucket(client, bucket)
                log.info("upload run %d %s: %.2f s", i + 1, tool, times[tool][-1])
    res.offsite = {"bytes": total, "files": len(files), **times}


def parse_dag_file(path: Path, *extra: str) -> dict[str, Any]:
    """The timing `dag_parse_child.py` reports for one DAG file, parsed in a fresh process."""
    what = " ".join(["parsing", path.name, *extra])
    done = subprocess.run([PYTHON, str(BENCH / "dag_parse_child.py"), str(path), *extra], capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"{what} failed: {(done.stdout + done.stderr)[-2000:]}")
    return child_result(done.stdout, what)


def phase_dags(res: Results) -> None:
    """Each DAG file parsed by a fresh DagBag in a fresh process (Airflow imported before the clock)."""
    per_file: dict[str, dict[str, Any]] = {}
    for path in sorted((ROOT / "dags").glob("*.py")):
        if path.name.startswith("_"):
            continue
        runs = [parse_dag_file(path) for _ in range(res.args.repeat)]
        per_file[path.name] = {
            "seconds": [r["seconds"] for r in runs],
            "dags": runs[-1]["dags"],
            "import_errors": runs[-1]["import_errors"],
        }
        log.info("parse %s: %.3f s", path.name, median(per_file[path.name]["seconds"]))
    res.dags = per_file


def diagnose_variants(res: Results, source: ScratchPostgres, work: Path) -> dict[str, Any]:
    """Our backup without the inventory, without zstd, and at level 3: time, output and peak RSS of each."""
    variants = {
        "no zstd, no inventory (plumbing only)": ["--no-compress", "--no-inventory"],
        f"no inventory (level {shipped_level()})": ["--no-inventory"],
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
    return result


def diagnose_levels(sample: bytes, work: Path) -> dict[str, dict[str, float]]:
    """Output size and time of zstd levels (in memory) and gzip -6/-9 (from the page cache) on `sample`."""
    import zstandard

    levels: dict[str, dict[str, float]] = {}
    for level in (1, 3, 6, 9, 12, 15):
        clock = time.monotonic()
        size = len(zstandard.ZstdCompressor(level=level, threads=-1).compress(sample))
        levels[f"zstd {level}"] = {"bytes": size, "seconds": time.monotonic() - clock}
    sample_file = work / "sample.dump"
    sample_file.write_bytes(sample)
    for label, command in (("gzip -6", "gzip -6 -c"), ("gzip -9", "gzip -9 -c")):
        seconds, stderr = shell(f"{command} {sample_file} | wc -c 1>&2", what=label)
        levels[label] = {"bytes": int(stderr.strip().splitlines()[-1]), "seconds": seconds}
    sample_file.unlink()
    return levels


def raw_dump_sample(set_dir: Path, work: Path) -> bytes:
    """The first DIAGNOSE_SAMPLE bytes of our `erp_bench` dump, decompressed."""
    from erp_backup.stream import decompress_to

    raw = work / "raw.dump"
    decompress_to(next((set_dir / "databases").glob("erp_bench*")), raw)
    with open(raw, "rb") as handle:
        sample = handle.read(DIAGNOSE_SAMPLE)
    raw.unlink()
    return sample


def diagnose_parse(res: Results) -> dict[str, dict[str, Any]]:
    """Each DAG file's parse time with the Slack notifier import and the first Asset URI paid (and timed) first."""
    parse: dict[str, dict[str, Any]] = {}
    for path in sorted((ROOT / "dags").glob("*.py")):
        runs = [parse_dag_file(path, "--preload") for _ in range(res.args.repeat)]
        parse[path.name] = {
            "seconds": [r["seconds"] for r in runs],
            **{key: [r["preloaded"][key] for r in runs] for key in runs[0]["preloaded"]},
        }
    return parse


def phase_diagnose(res: Results, source: ScratchPostgres, work: Path, set_dir: Path) -> None:
    """Where the time and bytes go: backup variants, zstd levels on the same raw dump, DAG parse costs."""
    variants = diagnose_variants(res, source, work)
    sample = raw_dump_sample(set_dir, work)
    res.diagnose = {"variants": variants, "sample_bytes": len(sample), "levels": diagnose_levels(sample, work),
                    "parse": diagnose_parse(res)}
