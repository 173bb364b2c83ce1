"""Chain-aware retention, proven over random histories (hypothesis) with the real generic policy.

A history: WAL segments archived at random intervals, shipped in 6-hour WAL sets
(some windows missing: failed runs), base backups taken at random segments.
Bases are pruned first (their retention + `protected_bases`), then WAL (7 days +
`protected_wal_sets` for the retained bases), both through `retention.decide`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from erp_backup.retention import SetRecord, decide
from erp_backup.services.postgres.chain import BaseInfo, WalSetInfo, anchor_base, protected_bases, protected_wal_sets
from erp_backup.services.postgres.segments import Segment
from erp_backup.sets import SetState

UTC = timezone.utc
T0 = datetime(2026, 1, 1, tzinfo=UTC)
WINDOW = timedelta(hours=6)


@dataclass
class History:
    archived_at: list[datetime]  # segment n archived at archived_at[n]
    wal_sets: dict[str, tuple[list[int], datetime]]  # id -> (segment numbers, captured_at)
    bases: list[BaseInfo]
    now: datetime
    wal_retention: timedelta
    base_retention: timedelta

    def infos(self) -> list[WalSetInfo]:
        return [WalSetInfo(i, Segment(1, min(s)), Segment(1, max(s))) for i, (s, _) in self.wal_sets.items()]

    def set_of(self, segno: int) -> str | None:
        return next((i for i, (s, _) in self.wal_sets.items() if segno in s), None)


@st.composite
def histories(draw: st.DrawFn) -> History:
    gaps = draw(st.lists(st.integers(min_value=1, max_value=12 * 60), min_size=1, max_size=60))
    archived_at, moment = [], T0
    for minutes in gaps:
        moment += timedelta(minutes=minutes)
        archived_at.append(moment)
    count = len(archived_at)

    windows: dict[int, list[int]] = {}
    for segno, when in enumerate(archived_at):
        windows.setdefault(int((when - T0) / WINDOW), []).append(segno)
    missing = draw(st.sets(st.sampled_from(sorted(windows)), max_size=max(0, len(windows) // 4)))
    wal_sets = {
        f"W{k:04d}": (segnos, T0 + WINDOW * (k + 1) + timedelta(minutes=5))
        for k, segnos in windows.items()
        if k not in missing
    }

    starts = draw(st.sets(st.integers(min_value=0, max_value=count - 1), max_size=8))
    bases = []
    for start in sorted(starts):
        end = min(count - 1, start + draw(st.integers(min_value=0, max_value=2)))
        bases.append(BaseInfo(f"B{start:04d}", Segment(1, start), Segment(1, end), archived_at[end] - timedelta(seconds=1)))

    # Mostly "now" shortly after the last segment, so the WAL window cuts through the history.
    now = archived_at[-1] + timedelta(minutes=draw(st.integers(min_value=0, max_value=3 * 24 * 60)))
    wal_retention = timedelta(days=draw(st.integers(min_value=1, max_value=7)))
    base_retention = timedelta(days=draw(st.integers(min_value=1, max_value=120)))
    return History(archived_at, wal_sets, bases, now, wal_retention, base_retention)


def prune(history: History) -> tuple[set[str], set[str]]:
    """(retained base ids, retained WAL set ids) after both prunes, as the DAGs would run them."""
    base_records = [SetRecord(b.backup_id, SetState.OFFSITE, b.consistent_at, True) for b in history.bases]
    base_decisions = decide(
        base_records, history.base_retention, history.now, require_offsite=False,
        protected=protected_bases(history.bases, history.now, history.wal_retention),
    )
    kept_bases = {d.backup_id for d in base_decisions if not d.delete}
    retained = [b for b in history.bases if b.backup_id in kept_bases]
    wal_records = [SetRecord(i, SetState.OFFSITE, captured, True) for i, (_, captured) in history.wal_sets.items()]
    wal_decisions = decide(
        wal_records, history.wal_retention, history.now, require_offsite=False,
        protected=protected_wal_sets(history.infos(), retained, history.now, history.wal_retention),
    )
    return kept_bases, {d.backup_id for d in wal_decisions if not d.delete}


def shipped_segments(history: History) -> set[int]:
    return {s for segnos, _ in history.wal_sets.values() for s in segnos}


@settings(max_examples=150, deadline=None)
@given(histories())
def test_every_retained_base_keeps_the_wal_from_its_start_to_its_end(history: History) -> None:
    kept_bases, kept_wal = prune(history)
    for base in history.bases:
        if base.backup_id not in kept_bases:
            continue
        for segno in range(base.start.segno, base.end.segno + 1):
            holder = history.set_of(segno)
            assert holder is None or holder in kept_wal, f"base {base.backup_id} lost segment {segno} (set {holder})"


@settings(max_examples=150, deadline=None)
@given(histories())
def test_the_anchor_base_and_all_wal_from_it_forward_are_kept(history: History) -> None:
    kept_bases, kept_wal = prune(history)
    before_window = [b for b in history.bases if b.consistent_at <= history.now - history.wal_retention]
    if not before_window:
        return
    anchor = max(before_window, key=lambda b: (b.consistent_at, b.backup_id))  # ties: the later id
    assert anchor.backup_id in kept_bases
    for segno in shipped_segments(history):
        if segno >= anchor.start.segno:
            assert history.set_of(segno) in kept_wal, f"segment {segno} after anchor {anchor.backup_id} was dropped"


@settings(max_examples=150, deadline=None)
@given(histories())
def test_nothing_newer_than_the_wal_window_is_dropped(history: History) -> None:
    kept_bases, kept_wal = prune(history)
    window_start = history.now - history.wal_retention
    for set_id, (_, captured) in history.wal_sets.items():
        if captured >= window_start:
            assert set_id in kept_wal
    for base in history.bases:
        if base.consistent_at > window_start:
            assert base.backup_id in kept_bases


@settings(max_examples=150, deadline=None)
@given(histories())
def test_every_point_in_the_window_stays_recoverable(history: History) -> None:
    """A target at any shipped segment's archive time in the window, reachable before the prune, stays reachable."""
    kept_bases, kept_wal = prune(history)
    window_start = history.now - history.wal_retention
    shipped = shipped_segments(history)

    def reachable(target_segno: int, bases: list[BaseInfo], wal_ids: set[str]) -> bool:
        target_time = history.archived_at[target_segno]
        for base in bases:
            if base.consistent_at > target_time or base.start.segno > target_segno:
                continue
            needed = range(base.end.segno + 1, target_segno + 1)
            if all(history.set_of(s) in wal_ids for s in needed):
                return True
        return False

    all_ids = set(history.wal_sets)
    kept = [b for b in history.bases if b.backup_id in kept_bases]
    for segno in shipped:
        if history.archived_at[segno] >= window_start and reachable(segno, history.bases, all_ids):
            assert reachable(segno, kept, kept_wal), f"target at segment {segno} became unrecoverable"


@settings(max_examples=150, deadline=None)
@given(histories())
def test_old_wal_no_base_needs_is_still_pruned(history: History) -> None:
    """The chain rules keep what recovery needs, not everything: the 7-day retention still frees space."""
    kept_bases, kept_wal = prune(history)
    window_start = history.now - history.wal_retention
    retained = [b for b in history.bases if b.backup_id in kept_bases]
    anchor = anchor_base(retained, window_start)
    newest = max(history.wal_sets, key=lambda i: (history.wal_sets[i][1], i), default=None)
    for set_id, (segnos, captured) in history.wal_sets.items():
        needed_by_base = any(b.start.segno <= max(segnos) and min(segnos) <= b.end.segno for b in retained)
        after_anchor = anchor is not None and max(segnos) >= anchor.start.segno
        if captured < window_start and not needed_by_base and not after_anchor and set_id != newest:
            assert set_id not in kept_wal, f"{set_id} is needed by no base and is past the window"


def test_a_newer_base_takes_over_as_anchor_and_frees_the_older_chain() -> None:
    week = timedelta(days=7)
    old = BaseInfo("B-old", Segment(1, 10), Segment(1, 10), T0)
    new = BaseInfo("B-new", Segment(1, 50), Segment(1, 51), T0 + timedelta(days=7))
    sets = [
        WalSetInfo("W-old", Segment(1, 11), Segment(1, 30)),
        WalSetInfo("W-mid", Segment(1, 31), Segment(1, 49)),
        WalSetInfo("W-new", Segment(1, 50), Segment(1, 60)),
    ]
    early = T0 + timedelta(days=10)  # window starts on day 3: B-old is the anchor
    bases_kept = protected_bases([old, new], early, week)
    assert set(bases_kept) == {"B-old", "B-new"}
    assert "newest base backup consistent at or before" in bases_kept["B-old"] and "inside the WAL window" in bases_kept["B-new"]
    assert set(protected_wal_sets(sets, [old, new], early, week)) == {"W-old", "W-mid", "W-new"}
    late = T0 + timedelta(days=15)  # window starts on day 8: B-new is the anchor now
    assert set(protected_bases([old, new], late, week)) == {"B-new"}
    protected = protected_wal_sets(sets, [old, new], late, week)
    assert set(protected) == {"W-new"} and "B-new" in protected["W-new"]


def test_history_files_are_kept_while_a_retained_base_is_on_that_timeline() -> None:
    week = timedelta(days=7)
    now = T0 + timedelta(days=30)
    base_tl2 = BaseInfo("B2", Segment(2, 80), Segment(2, 80), T0 + timedelta(days=29))
    history_set = WalSetInfo("W-switch", None, None, frozenset({2}))
    future_history = WalSetInfo("W-switch3", None, None, frozenset({3}))
    protected = protected_wal_sets([history_set, future_history], [base_tl2], now, week)
    assert "timeline 2" in protected["W-switch"] and "W-switch3" not in protected
