"""The plan's `estate` block: when the estate drill runs, the recovery order, and the references between stores.

```yaml
estate:
  schedule: "0 7 * * 0#1"   # first Sunday of the month
  timezone: Asia/Seoul
  window: 7d                # the drill recovers to a random time within the last 7 days
  depends_on: {milvus: [minio]}
  references:
    documents: {service: postgres, database: erp, table: documents,
                fields: {key: doc_key, object: object_key, sha256: sha256, vectors: chunk_ids, written_at: created_at}}
    objects: {service: minio, bucket: erp-documents, prefix: docs/}
    vectors: {service: milvus, collection: erp_doc_chunks, fields: {key: chunk_id, document: doc_key}}
```

`documents` rows point at `objects` (by key, with a SHA-256) and at `vectors` (by primary
key); each vector points back at its document.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from erp_backup.plan import _Reader

ROLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # role: (required keys, required fields)
    "documents": (("service", "database", "table", "fields"), ("key", "object", "sha256", "vectors")),
    "objects": (("service", "bucket"), ()),
    "vectors": (("service", "collection", "fields"), ("key", "document")),
}
OPTIONAL_KEYS = ("prefix", "backup_type")
OPTIONAL_FIELDS = ("written_at",)


@dataclass(frozen=True)
class EstatePlan:
    schedule: str
    timezone: str
    window: timedelta
    depends_on: MappingProxyType[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    references: MappingProxyType[str, MappingProxyType[str, Any]] = field(default_factory=lambda: MappingProxyType({}))

    def reference(self, role: str) -> MappingProxyType[str, Any] | None:
        return self.references.get(role)


def _read_reference(refs: _Reader, role: str, services: set[str]) -> MappingProxyType[str, Any]:
    entry = refs.sub(role)
    keys, fields = ROLES[role]
    entry.only(*keys, *OPTIONAL_KEYS)
    for key in keys:
        if key != "fields":
            entry.get(key, str)
    if entry.data["service"] not in services:
        entry.fail(f"unknown service {entry.data['service']!r} (known: {', '.join(sorted(services))})", "service")
    if "fields" in keys:
        mapping = entry.sub("fields")
        mapping.only(*fields, *OPTIONAL_FIELDS)
        for name in fields:
            mapping.get(name, str)
    return MappingProxyType(dict(entry.data))


def read_estate(top: _Reader, tz: str, services: set[str]) -> EstatePlan | None:
    """The `estate` block, validated; None when the plan has none."""
    if "estate" not in top.data:
        return None
    estate = top.sub("estate")
    estate.only("schedule", "timezone", "window", "depends_on", "references")
    depends = estate.get("depends_on", dict, {})
    for name, needs in depends.items():
        if name not in services or not isinstance(needs, list) or not set(needs) <= services:
            estate.fail(f"{name}: must be a known service mapped to a list of known services "
                        f"(known: {', '.join(sorted(services))})", "depends_on")
    refs = estate.sub("references", {})
    refs.only(*ROLES)
    return EstatePlan(
        schedule=estate.cron("schedule"),
        timezone=estate.timezone("timezone", tz),
        window=estate.duration("window", "7d"),
        depends_on=MappingProxyType({str(k): tuple(v) for k, v in depends.items()}),
        references=MappingProxyType({role: _read_reference(refs, role, services) for role in refs.data}),
    )
