"""The drill's shared vocabulary: its errors, what a listing of sets holds, and how a set's size is measured."""

from __future__ import annotations

from dataclasses import dataclass, field

from erp_backup.drill import pick as picking
from erp_backup.manifest import Manifest
from erp_backup.services import get_service


class DrillFailed(RuntimeError):
    """A drill step failed. The message names the service, backup and what is wrong."""


class DrillVerificationFailed(DrillFailed):
    """The restored data does not match the manifest. The message lists every mismatch."""


def size_measure(manifest: Manifest) -> tuple[int, str]:
    """(bytes, what they are): the source size the service recorded in the manifest, else the set size."""
    recorded = get_service(manifest.service).source_size(manifest)
    if recorded:
        return recorded, f"{manifest.service} source size"
    return manifest.total_size, "set size"


@dataclass
class Listing:
    complete: list[tuple[picking.Candidate, Manifest]]
    incomplete: list[str]  # "<type>/<id>" without a manifest (or corrupt)
    where: str
    suspect: dict[str, str] = field(default_factory=dict)  # "<type>/<id>" -> why its offsite manifest is not trusted
