"""Which backup sets a DR drill restores: a seeded, weighted random choice. Pure: no I/O.

Every enabled service gets one set (or one service is chosen, for `service=random`).
The choice leans towards what was not drilled recently, read from the drill ledger:

- a set's weight is `1 + days since that set was last drilled` (never drilled:
  `NEVER_DRILLED_DAYS`), so an undrilled set is far likelier than last week's;
- a service's weight (only for `service=random`) is `1 + days since the service's
  last drill`, same cap.

The same seed and the same inputs always give the same picks, so a rerun of a
drill run (same run id, hence the same derived seed) restores the same sets.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, TypeVar

NEVER_DRILLED_DAYS = 365.0
T = TypeVar("T")


@dataclass(frozen=True)
class Candidate:
    """One complete set that may be drilled."""

    service: str
    backup_type: str
    backup_id: str
    captured_at: datetime
    set_bytes: int
    production_bytes: int  # the size measure used to extrapolate the RTO (see drill.report)

    @property
    def key(self) -> str:
        return f"{self.service}/{self.backup_type}/{self.backup_id}"


@dataclass(frozen=True)
class LedgerEntry:
    """What the pick needs from one ledger line."""

    service: str
    backup_type: str
    backup_id: str
    finished_at: datetime

    @property
    def key(self) -> str:
        return f"{self.service}/{self.backup_type}/{self.backup_id}"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LedgerEntry:
        return cls(
            service=str(data["service"]),
            backup_type=str(data["backup_type"]),
            backup_id=str(data["backup_id"]),
            finished_at=datetime.fromisoformat(str(data["finished_at"])),
        )


@dataclass(frozen=True)
class Choice:
    """A chosen set, with the weight it had and how many sets it was chosen from."""

    candidate: Candidate
    weight: float
    total_weight: float
    candidates: int
    last_drilled: datetime | None
    newest: Candidate  # the newest complete set of the same service and type

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["candidate"]["captured_at"] = self.candidate.captured_at.isoformat()
        data["newest"]["captured_at"] = self.newest.captured_at.isoformat()
        data["last_drilled"] = self.last_drilled.isoformat() if self.last_drilled else None
        data["probability"] = round(self.weight / self.total_weight, 4) if self.total_weight else 1.0
        return data


@dataclass
class PickResult:
    seed: int
    choices: list[Choice] = field(default_factory=list)
    service_weights: dict[str, float] = field(default_factory=dict)


def derive_seed(run_id: str) -> int:
    """A stable 48-bit seed from the run id: reruns of one run pick the same sets."""
    return int(hashlib.sha256(run_id.encode("utf-8")).hexdigest()[:12], 16)


def days_since(moment: datetime | None, now: datetime) -> float:
    """Days from `moment` to `now`, capped at NEVER_DRILLED_DAYS; never (None) is the cap."""
    if moment is None:
        return NEVER_DRILLED_DAYS
    return max(0.0, min(NEVER_DRILLED_DAYS, (now - moment).total_seconds() / 86400))


def last_drilled(entries: Iterable[LedgerEntry]) -> tuple[dict[str, datetime], dict[str, datetime]]:
    """(last drill per set key, last drill per service)."""
    by_set: dict[str, datetime] = {}
    by_service: dict[str, datetime] = {}
    for entry in entries:
        if entry.key not in by_set or entry.finished_at > by_set[entry.key]:
            by_set[entry.key] = entry.finished_at
        if entry.service not in by_service or entry.finished_at > by_service[entry.service]:
            by_service[entry.service] = entry.finished_at
    return by_set, by_service


def weighted_index(rng: random.Random, weights: Sequence[float]) -> int:
    """Index i with probability weights[i] / sum(weights). Weights must be positive."""
    if not weights or any(w <= 0 for w in weights):
        raise ValueError(f"weights must be a non-empty list of positive numbers, got {list(weights)}")
    threshold = rng.random() * sum(weights)
    running = 0.0
    for index, weight in enumerate(weights):
        running += weight
        if threshold < running:
            return index
    return len(weights) - 1


def choose_service(services: Sequence[str], ledger: Iterable[LedgerEntry], now: datetime, rng: random.Random) -> tuple[str, dict[str, float]]:
    """One service, weighted by days since its last drill."""
    _, by_service = last_drilled(ledger)
    ordered = sorted(services)
    weights = {name: 1.0 + days_since(by_service.get(name), now) for name in ordered}
    return ordered[weighted_index(rng, [weights[name] for name in ordered])], weights


def choose_set(candidates: Sequence[Candidate], ledger: Iterable[LedgerEntry], now: datetime, rng: random.Random) -> Choice:
    """One set among `candidates` (one service), weighted by days since each set was last drilled."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    by_set, _ = last_drilled(ledger)
    ordered = sorted(candidates, key=lambda c: (c.backup_type, c.backup_id))
    weights = [1.0 + days_since(by_set.get(c.key), now) for c in ordered]
    index = weighted_index(rng, weights)
    chosen = ordered[index]
    same_type = [c for c in ordered if c.backup_type == chosen.backup_type]
    newest = max(same_type, key=lambda c: (c.captured_at, c.backup_id))
    return Choice(chosen, weights[index], sum(weights), len(ordered), by_set.get(chosen.key), newest)


def pick_sets(
    candidates: Mapping[str, Sequence[Candidate]],
    ledger: Sequence[LedgerEntry],
    now: datetime,
    seed: int,
    *,
    one_random_service: bool = False,
) -> PickResult:
    """One set per service in `candidates` (services without candidates are left out),
    or, with `one_random_service`, one set of one weighted-random service.
    """
    rng = random.Random(seed)
    result = PickResult(seed=seed)
    services = sorted(name for name, found in candidates.items() if found)
    if one_random_service and services:
        chosen, result.service_weights = choose_service(services, ledger, now, rng)
        services = [chosen]
    for name in services:
        result.choices.append(choose_set(candidates[name], ledger, now, rng))
    return result


def explicit_choice(candidate: Candidate, all_of_type: Sequence[Candidate], ledger: Iterable[LedgerEntry]) -> Choice:
    """A set named by the operator (backup_id param): weight 1 of 1."""
    by_set, _ = last_drilled(ledger)
    pool = list(all_of_type) or [candidate]
    newest = max(pool, key=lambda c: (c.captured_at, c.backup_id))
    return Choice(candidate, 1.0, 1.0, 1, by_set.get(candidate.key), newest)
