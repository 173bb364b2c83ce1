"""Do the restored stores agree? The cross-service reference checks, from the plan's `estate.references`.

Four directions, each counted, sampled and explained by the capture times of the sets used:

- documents whose object is missing, or whose object's SHA-256 differs;
- objects no document points at;
- documents whose vectors are missing;
- vectors whose document is missing.

A gap is *explained* when the capture times account for it: a document written after the
set of the other store was captured cannot be in that set. A gap the capture times do not
explain (a document older than the set that lacks its object, a hash that differs) is data
loss or corruption, and is reported as such. Records are read through each service's
`read_records`; nothing here knows which service holds what.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from erp_backup.estate.choose import ServicePlan
from erp_backup.services import get_service

SAMPLE = 5
ROLES = ("documents", "objects", "vectors")


@dataclass
class Gap:
    """One direction of one reference: how many, a sample, and why."""

    name: str
    count: int = 0
    sample: list[str] = field(default_factory=list)
    explained: int = 0
    explanation: str = ""
    judged: bool = True  # False: capture times cannot say whether a gap of this kind is expected

    def add(self, item: str, explained: bool) -> None:
        self.count += 1
        self.explained += int(explained)
        if len(self.sample) < SAMPLE:
            self.sample.append(item)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "count": self.count, "explained": self.explained if self.judged else None,
                "unexplained": self.count - self.explained if self.judged else None, "sample": list(self.sample),
                "explanation": self.explanation}


@dataclass
class Doc:
    key: str
    object: str
    sha256: str
    vectors: list[Any]
    written_at: datetime | None


def _documents(rows: list[dict[str, Any]], fields: Mapping[str, str]) -> dict[str, Doc]:
    written = fields.get("written_at")
    return {str(r[fields["key"]]): Doc(str(r[fields["key"]]), str(r[fields["object"]]), str(r[fields["sha256"]]),
                                       list(r[fields["vectors"]] or []), r.get(written) if written else None) for r in rows}


def _when(moment: datetime | None) -> str:
    return moment.isoformat(timespec="seconds") if moment else "unknown"


def _after(doc: Doc, captured: datetime | None) -> bool:
    return doc.written_at is not None and captured is not None and doc.written_at > captured


def _set_name(plan: ServicePlan | None) -> str:
    if plan is None:
        return "(not restored)"
    return (", ".join(f"{s.backup_type}/{s.backup_id}" for s in plan.sets)
            + f" captured {_when(plan.capture_started)} .. {_when(plan.captured_at)}")


def check_objects(docs: dict[str, Doc], objects: dict[str, str], objects_plan: ServicePlan | None) -> list[Gap]:
    captured = objects_plan.capture_started if objects_plan else None
    missing = Gap("documents whose object is missing")
    differs = Gap("documents whose object's SHA-256 differs")
    for doc in sorted(docs.values(), key=lambda d: d.key):
        if doc.object not in objects:
            missing.add(f"{doc.key} → {doc.object} (written {_when(doc.written_at)})", _after(doc, captured))
        elif objects[doc.object] != doc.sha256:
            differs.add(f"{doc.key} → {doc.object}: document says {doc.sha256[:12]}…, object is {objects[doc.object][:12]}…",
                        False)
    missing.explanation = (f"the object set ({_set_name(objects_plan)}) began before these documents were written: "
                           f"{missing.explained} of {missing.count} written after its capture began; the rest are "
                           "lost objects")
    differs.explanation = "objects are written once: a differing hash is corruption, never explained by capture times"
    referenced = {doc.object for doc in docs.values()}
    orphans = Gap("objects no document points at", judged=False)
    for key in sorted(set(objects) - referenced):
        orphans.add(key, False)
    orphans.explanation = ("objects in the object set with no document row at the recovery point: a document in "
                           "flight (object written, row not yet committed) or a deleted row; capture times cannot "
                           "tell these apart")
    return [missing, differs, orphans]


def check_vectors(docs: dict[str, Doc], vectors: dict[str, str], vectors_plan: ServicePlan | None) -> list[Gap]:
    captured = vectors_plan.capture_started if vectors_plan else None
    missing = Gap("documents whose vectors are missing")
    for doc in sorted(docs.values(), key=lambda d: d.key):
        absent = [str(v) for v in doc.vectors if str(v) not in vectors]
        if absent:
            missing.add(f"{doc.key}: {len(absent)} of {len(doc.vectors)} vectors ({', '.join(absent[:3])}) "
                        f"(written {_when(doc.written_at)})", _after(doc, captured))
    missing.explanation = (f"the vector set ({_set_name(vectors_plan)}) began before these documents were written: "
                           f"{missing.explained} of {missing.count} written after its capture began; the rest are "
                           "lost vectors")
    orphans = Gap("vectors whose document is missing", judged=False)
    for key, document in sorted(vectors.items()):
        if document not in docs:
            orphans.add(f"vector {key} of {document}", False)
    orphans.explanation = ("vectors whose document row is absent at the recovery point: a document in flight "
                           "(vectors written, row not yet committed) or a deleted row")
    return [missing, orphans]


def run_checks(references: Mapping[str, Mapping[str, Any]], target_of: Callable[[str, str | None], Any],
               plans: Mapping[str, ServicePlan]) -> dict[str, Any]:
    """Read the three roles through their services and check every direction. Roles without a restored store are skipped."""
    missing_roles = [r for r in ROLES if r not in references]
    if missing_roles:
        return {"status": "not configured", "why": f"the plan's estate.references lacks {', '.join(missing_roles)}"}
    read: dict[str, list[dict[str, Any]]] = {}
    for role in ROLES:
        entry = references[role]
        target = target_of(str(entry["service"]), entry.get("backup_type"))
        if target is None:
            return {"status": "skipped", "why": f"{entry['service']} ({role}) was not restored"}
        read[role] = get_service(str(entry["service"])).read_records(target, entry)
    doc_fields = references["documents"]["fields"]
    docs = _documents(read["documents"], doc_fields)
    objects = {str(r["key"]): str(r["sha256"]) for r in read["objects"]}
    vec_fields = references["vectors"]["fields"]
    vectors = {str(r[vec_fields["key"]]): str(r[vec_fields["document"]]) for r in read["vectors"]}
    gaps = (check_objects(docs, objects, plans.get(str(references["objects"]["service"])))
            + check_vectors(docs, vectors, plans.get(str(references["vectors"]["service"]))))
    unexplained = sum(g.count - g.explained for g in gaps if g.judged)
    return {"status": "checked", "documents": len(docs), "objects": len(objects), "vectors": len(vectors),
            "gaps": [g.as_dict() for g in gaps], "unexplained": unexplained}
