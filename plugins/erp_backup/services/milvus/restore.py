"""Milvus collection restore (`full`): recreate exported collections, insert their rows, check them.

Each collection is recreated (optionally renamed with a suffix) with its schema, indexes,
properties and partitions; rows are inserted in requests under the 64 MB gRPC limit, then
flushed and checked against the manifest alone: counts per partition (from partition
statistics; milvus-lite 3.2.2 ignores partition_names in ``count(*)``), the total with
``count(*)``, and the recorded sample searches (the same top-k ids). A failed check is a
problem in the report, never an exception. Aliases are recreated only when not renamed.

Primary keys of auto_id collections are kept by creating the collection with the property
``allow_insert_auto_id=true`` (recent Milvus releases; milvus-lite 3.2.2 takes explicit keys
even without it) and dropping that property afterwards if the source did not have it. A
server that does not know the property rejects the keyed inserts: restore with
``keep_primary_keys=False`` there; Milvus then assigns new keys and the search id check is
skipped for those collections.

A dry run reads the target (which collections exist) and writes nothing; a milvus-lite
file that does not exist is not created.

Restore options: suffix, collections, drop_existing, keep_primary_keys, max_request_bytes,
read_batch_rows, min_search_overlap (1.0; lower it for approximate indexes on a real
cluster), token, db_name, timeout_s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from erp_backup.manifest import Manifest
from erp_backup.services.base import CheckContext, Checks, RestoreReport
from erp_backup.services.milvus.endpoints import MilvusTarget, RestoreConflict, connect
from erp_backup.services.milvus.export import DEFAULT_BATCH_SIZE, search_ids
from erp_backup.services.milvus.schema import (
    MAX_REQUEST_BYTES,
    Layout,
    arrow_layout,
    batch_to_rows,
    index_params_from_definition,
    primary_field,
    rows_per_request,
    schema_from_definition,
)

log = logging.getLogger(__name__)

ALLOW_INSERT_AUTO_ID = "allow_insert_auto_id"


@dataclass(frozen=True)
class RestoreSettings:
    suffix: str = ""
    collections: tuple[str, ...] | None = None
    drop_existing: bool = False
    keep_primary_keys: bool = True
    max_request_bytes: int = MAX_REQUEST_BYTES
    read_batch_rows: int = DEFAULT_BATCH_SIZE
    min_search_overlap: float = 1.0
    token: str = field(default="", repr=False)
    db_name: str = ""
    timeout_s: float = 30.0

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> RestoreSettings:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown Milvus restore option(s) {unknown} (known: {', '.join(sorted(known))})")
        values = dict(options)
        if values.get("collections") is not None:
            values["collections"] = tuple(values["collections"])
        return cls(**values)


def _count_rows(client: Any, collection: str) -> int:
    result = client.query(collection, filter="", output_fields=["count(*)"], consistency_level="Strong")
    return int(result[0]["count(*)"])


def _partition_rows(client: Any, collection: str, partition: str) -> int:
    """Rows in one partition from its statistics (exact after flush on a fresh collection).

    Not count(*) with partition_names: milvus-lite 3.2.2 ignores partition_names there.
    """
    return int(client.get_partition_stats(collection, partition)["row_count"])


def _insert_file(client: Any, target_name: str, path: Path, layout: Layout, partition: str | None,
                 skip: frozenset[str], settings: RestoreSettings) -> int:
    inserted = 0
    kwargs = {"partition_name": partition} if partition else {}
    with pq.ParquetFile(path) as parquet:
        for batch in parquet.iter_batches(batch_size=settings.read_batch_rows):
            step = rows_per_request(batch.nbytes, batch.num_rows, settings.max_request_bytes)
            for start in range(0, batch.num_rows, step):
                rows = batch_to_rows(batch.slice(start, step), layout, skip)
                client.insert(target_name, rows, **kwargs)
                inserted += len(rows)
    return inserted


def _create_collection(client: Any, target_name: str, definition: dict[str, Any], keep_keys: bool) -> bool:
    """Create the collection with its schema, indexes, properties and partitions.

    True if `allow_insert_auto_id` was added only so the keys could be kept (it is dropped afterwards).
    """
    properties = dict(definition["properties"])
    added_auto_id_property = definition["auto_id"] and keep_keys and ALLOW_INSERT_AUTO_ID not in properties
    if added_auto_id_property:
        properties[ALLOW_INSERT_AUTO_ID] = "true"
    create_kwargs: dict[str, Any] = {"properties": properties}
    if definition.get("consistency_level") is not None:
        create_kwargs["consistency_level"] = definition["consistency_level"]
    if definition.get("num_shards"):
        create_kwargs["num_shards"] = int(definition["num_shards"])
    if definition.get("partition_key") and definition.get("num_partitions"):
        create_kwargs["num_partitions"] = int(definition["num_partitions"])
    index_params = index_params_from_definition(definition)
    client.create_collection(
        target_name, schema=schema_from_definition(definition),
        index_params=index_params if len(index_params) else None, **create_kwargs,
    )
    if not definition.get("partition_key"):
        existing = set(client.list_partitions(target_name))
        for partition in definition["partitions"]:
            if partition not in existing:
                client.create_partition(target_name, partition)
    return bool(added_auto_id_property)


def _insert_partitions(client: Any, set_dir: Path, collection: dict[str, Any], target_name: str, keep_keys: bool,
                       settings: RestoreSettings) -> dict[str, int]:
    definition = collection["definition"]
    layout = arrow_layout(definition)
    skip = frozenset() if keep_keys else frozenset({primary_field(definition)["name"]})
    inserted: dict[str, int] = {}
    for partition in collection["partitions"]:
        into = None if definition.get("partition_key") else partition["name"]
        inserted[partition["name"]] = 0
        for exported in partition["files"]:
            try:
                inserted[partition["name"]] += _insert_file(
                    client, target_name, set_dir / exported["path"], layout, into, skip, settings
                )
            except Exception as exc:
                hint = (
                    " (this server may not accept primary keys for auto_id collections: "
                    "restore with keep_primary_keys=False)"
                    if definition["auto_id"] and keep_keys else ""
                )
                raise RuntimeError(
                    f"restore of {target_name}: inserting {exported['path']} into partition "
                    f"{partition['name']!r} failed: {exc}{hint}"
                ) from exc
    return inserted


def _restore_collection(
    client: Any, set_dir: Path, collection: dict[str, Any], settings: RestoreSettings
) -> dict[str, Any]:
    definition = collection["definition"]
    target_name = f"{definition['name']}{settings.suffix}"
    started = time.monotonic()
    keep_keys = not definition["auto_id"] or settings.keep_primary_keys
    added_auto_id_property = _create_collection(client, target_name, definition, keep_keys)
    inserted = _insert_partitions(client, set_dir, collection, target_name, keep_keys, settings)
    client.flush(target_name)
    notes = []
    if added_auto_id_property:
        try:
            client.drop_collection_properties(target_name, property_keys=[ALLOW_INSERT_AUTO_ID])
        except Exception as exc:
            notes.append(f"{ALLOW_INSERT_AUTO_ID}=true left on {target_name}: could not drop it ({exc})")
    return {
        "restored_as": target_name,
        "rows_inserted": inserted,
        "primary_keys": "kept" if keep_keys else "reassigned",
        "notes": notes,
        "seconds": round(time.monotonic() - started, 3),
    }


def _check_collection(client: Any, collection: dict[str, Any], restored: dict[str, Any],
                      settings: RestoreSettings) -> tuple[dict[str, Any], list[str]]:
    definition = collection["definition"]
    target_name = restored["restored_as"]
    problems: list[str] = []
    expected_total = sum(p["rows"] for p in collection["partitions"])
    counts: dict[str, int] = {"*": _count_rows(client, target_name)}
    if counts["*"] != expected_total:
        problems.append(f"{target_name}: count(*) is {counts['*']} after restore, the backup has {expected_total} rows")
    if not definition.get("partition_key"):
        for partition in collection["partitions"]:
            counts[partition["name"]] = _partition_rows(client, target_name, partition["name"])
            if counts[partition["name"]] != partition["rows"]:
                problems.append(
                    f"{target_name}/{partition['name']}: {counts[partition['name']]} rows after restore, "
                    f"the backup has {partition['rows']}"
                )
    search_report: dict[str, Any] = {"queries": 0, "min_overlap": None}
    if restored["primary_keys"] == "reassigned":
        search_report["skipped"] = "primary keys were reassigned"
    else:
        pk_name = primary_field(definition)["name"]
        overlaps = []
        for sample in collection.get("searches", []):
            got = search_ids(client, target_name, sample["field"], sample["metric_type"], sample["queries"],
                              sample["top_k"], pk_name)
            for number, (expected_ids, got_ids) in enumerate(zip(sample["expected_ids"], got, strict=False)):
                overlap = len(set(expected_ids) & set(got_ids)) / len(expected_ids) if expected_ids else 1.0
                overlaps.append(overlap)
                if overlap < settings.min_search_overlap:
                    problems.append(
                        f"{target_name}: search #{number} on {sample['field']} returned {got_ids}, "
                        f"the source returned {expected_ids} (overlap {overlap:.2f})"
                    )
        search_report = {"queries": len(overlaps), "min_overlap": min(overlaps) if overlaps else None}
    return {"rows": counts, "search": search_report}, problems


def _drop_collection(client: Any, name: str, reason: str) -> None:
    """Drop a collection and the aliases pointing at it (Milvus refuses to drop an aliased collection)."""
    for alias in client.list_aliases(collection_name=name).get("aliases", []):
        log.info("dropping alias %s of %s: %s", alias, name, reason)
        client.drop_alias(alias)
    log.info("dropping collection %s: %s", name, reason)
    client.drop_collection(name)


def _create_aliases(client: Any, collection: str, aliases: list[str], problems: list[str]) -> list[str]:
    created = []
    for alias in aliases:
        try:
            client.create_alias(collection, alias)
            created.append(alias)
        except Exception as exc:
            problems.append(f"alias {alias!r} → {collection}: {exc} (point it by hand with alter_alias)")
    return created


# ───────────────────────── the restore ─────────────────────────


def _chosen(manifest: Manifest, settings: RestoreSettings) -> list[str]:
    names = sorted(manifest.details["collections"])
    if settings.collections is None:
        return names
    missing = sorted(set(settings.collections) - set(names))
    if missing:
        raise ValueError(f"backup {manifest.backup_id} has no collection(s) {missing} (it has {names})")
    return [n for n in names if n in settings.collections]


def destination_of(target: Any, settings: RestoreSettings) -> MilvusTarget:
    """A MilvusTarget from a URI, a milvus-lite path or a MilvusTarget; options token/db_name override."""
    if isinstance(target, MilvusTarget):
        return MilvusTarget(uri=target.uri, token=settings.token or target.token, db_name=settings.db_name or target.db_name)
    return MilvusTarget(uri=str(target), token=settings.token, db_name=settings.db_name)


def _collection_bytes(manifest: Manifest, collection: Mapping[str, Any]) -> int:
    sizes = {entry.path: entry.size for entry in manifest.files}
    return sum(sizes.get(f["path"], 0) for partition in collection["partitions"] for f in partition["files"])


def _planned(client: Any, manifest: Manifest, names: list[str], settings: RestoreSettings,
             destination: MilvusTarget) -> dict[str, tuple[bool, str]]:
    """For each collection: whether its target name exists already, and what the restore will do."""
    planned = {}
    for name in names:
        target_name = f"{name}{settings.suffix}"
        exists = client is not None and client.has_collection(target_name)
        if exists and not settings.drop_existing:
            raise RestoreConflict(
                f"collection {target_name!r} already exists in {destination.display}: restore with a suffix "
                "(suffix='_restored') or drop_existing=True"
            )
        collection = manifest.details["collections"][name]
        planned[name] = exists, (
            f"{'drop and ' if exists else ''}create {target_name!r} with {collection['rows']} rows "
            f"({_collection_bytes(manifest, collection)} bytes of parquet) from backup {manifest.backup_id}"
        )
    return planned


def _aliases_and_checks(client: Any, manifest: Manifest, names: list[str], settings: RestoreSettings,
                        report: RestoreReport) -> None:
    collections = manifest.details["collections"]
    for name in names:
        restored = report.details["collections"][name]
        aliases = collections[name]["definition"]["aliases"]
        if settings.suffix:
            restored["aliases"] = {"skipped": aliases, "reason": "collection was renamed"}
        else:
            restored["aliases"] = {"created": _create_aliases(client, restored["restored_as"], aliases, report.problems)}
        restored["checks"], problems = _check_collection(client, collections[name], restored, settings)
        report.problems.extend(problems)
        if not problems:
            report.checks.append(f"{restored['restored_as']}: {restored['checks']['rows']['*']} rows, "
                                 f"{restored['checks']['search'].get('queries', 0)} sample searches match")


def _open_target(destination: MilvusTarget, settings: RestoreSettings, dry_run: bool) -> Any:
    """A client on the target; None for a dry run into a milvus-lite file that does not exist yet."""
    if dry_run and destination.is_local and not Path(destination.uri).exists():
        return None
    return connect(destination, timeout_s=settings.timeout_s, must_exist=False)


def restore_full(set_dir: Path, manifest: Manifest, target: Any, *, dry_run: bool = False,
                 options: Mapping[str, Any] | None = None) -> RestoreReport:
    """Recreate the exported collections in the Milvus at `target` (a URI, milvus-lite path or MilvusTarget)."""
    settings = RestoreSettings.from_options(options or {})
    names = _chosen(manifest, settings)
    destination = destination_of(target, settings)
    collections: dict[str, Any] = manifest.details["collections"]
    report = RestoreReport(dry_run=dry_run, details={
        "target": destination.display, "backup_id": manifest.backup_id, "suffix": settings.suffix, "collections": {},
    })
    started = time.monotonic()
    client = _open_target(destination, settings, dry_run)
    try:
        for name, (exists, action) in _planned(client, manifest, names, settings, destination).items():
            report.actions.append(action)
            if dry_run:
                log.info("dry run: would %s", action)
                report.details["collections"][name] = {"restored_as": f"{name}{settings.suffix}", "would": action}
                continue
            if exists:
                _drop_collection(client, f"{name}{settings.suffix}",
                                 f"drop_existing=True for restore of backup {manifest.backup_id}")
            log.info("restore: %s", action)
            report.details["collections"][name] = _restore_collection(client, set_dir, collections[name], settings)
            report.restored_bytes += _collection_bytes(manifest, collections[name])
        if not dry_run:
            _aliases_and_checks(client, manifest, names, settings, report)
    finally:
        if client is not None:
            client.close()
    report.details["rows"] = sum(collections[n]["rows"] for n in names)
    report.details["seconds"] = round(time.monotonic() - started, 3)
    return report


# ───────────────────────── the drill's check ─────────────────────────


def check_full(target: Any, manifest: Manifest, report: RestoreReport, ctx: CheckContext) -> Checks:
    """Row counts per collection on the restored target, plus the restore's sample-search summary."""
    restored = report.details.get("collections") or {}
    destination = target if isinstance(target, MilvusTarget) else MilvusTarget(uri=str(target))
    client = connect(destination, must_exist=True)
    found = Checks()
    try:
        for name, collection in sorted(manifest.details.get("collections", {}).items()):
            target_name = (restored.get(name) or {}).get("restored_as") or name
            expected, got = int(collection["rows"]), _count_rows(client, target_name)
            if got != expected:
                found.problems.append(f"collection {target_name}: {got} rows after restore, the backup has {expected}")
            else:
                found.checks.append(f"collection {target_name}: {got} rows")
    finally:
        client.close()
    for name, done in sorted(restored.items()):
        search = (done.get("checks") or {}).get("search") or {}
        if search.get("queries"):
            found.checks.append(f"collection {name}: {search['queries']} sample searches, "
                                f"min top-k overlap {search['min_overlap']}")
    return found
