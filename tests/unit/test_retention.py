"""The retention policy (`erp_backup.retention.decide`): examples, then properties over random histories."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from erp_backup.retention import Decision, SetRecord, backup_id_time, decide, newest_good_id
from erp_backup.sets import SetState, backup_id_for

UTC = timezone.utc
NOW = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)
WINDOW = timedelta(days=30)
HOLDS_DATA = {SetState.UNVERIFIED, SetState.VERIFIED, SetState.OFFSITE}


def record(days_ago: float, state: SetState = SetState.OFFSITE, *, captured_days_ago: float | None = None,
           offsite: bool | None = None) -> SetRecord:
    """A set whose id is `days_ago` old; captured then too unless told otherwise (None capture if incomplete)."""
    moment = NOW - timedelta(days=days_ago)
    captured = None
    if state is not SetState.INCOMPLETE:
        captured = NOW - timedelta(days=days_ago if captured_days_ago is None else captured_days_ago)
    return SetRecord(backup_id_for(moment), state, captured, state is SetState.OFFSITE if offsite is None else offsite)


def by_id(decisions: list[Decision]) -> dict[str, Decision]:
    return {d.backup_id: d for d in decisions}


def test_deletes_offsite_backed_sets_past_the_window_and_logs_age_in_the_reason():
    old, young, newest = record(45), record(10), record(1)
    decisions = by_id(decide([old, young, newest], WINDOW, NOW, require_offsite=True))
    assert decisions[old.backup_id].delete
    assert decisions[old.backup_id].reason == (
        "captured 2026-01-15T02:00:00+00:00, 45 days old > 30 days; offsite copy verified"
    )
    assert not decisions[young.backup_id].delete
    assert decisions[young.backup_id].reason == "captured 2026-02-19T02:00:00+00:00, 10 days old <= 30 days"


def test_a_set_exactly_at_the_window_edge_is_kept():
    edge, past, newest = record(30), record(31, captured_days_ago=30 + 1 / 1440), record(1)
    decisions = by_id(decide([edge, past, newest], WINDOW, NOW, require_offsite=True))
    assert decisions[edge.backup_id] == Decision(
        edge.backup_id, False, "captured 2026-01-30T02:00:00+00:00, 30 days old <= 30 days"
    )
    assert decisions[past.backup_id].delete


def test_newest_verified_set_is_kept_even_when_older_than_the_window():
    oldest, newest = record(90), record(60)
    decisions = by_id(decide([newest, oldest], WINDOW, NOW, require_offsite=True))
    assert decisions[oldest.backup_id].delete
    assert not decisions[newest.backup_id].delete
    assert decisions[newest.backup_id].reason.startswith("newest verified set, kept whatever its age")


def test_newest_good_set_ignores_newer_corrupt_unverified_and_incomplete_sets():
    good = record(60, SetState.VERIFIED)
    others = [record(5, SetState.CORRUPT), record(4, SetState.UNVERIFIED), record(3, SetState.INCOMPLETE)]
    assert newest_good_id([good, *others]) == good.backup_id
    assert not by_id(decide([good, *others], WINDOW, NOW, require_offsite=False))[good.backup_id].delete


def test_age_comes_from_the_manifest_capture_time_not_the_backup_id():
    # A backfilled set: its id names January, but it was captured yesterday.
    backfilled = record(60, captured_days_ago=1)
    # And the reverse: a recent id whose capture is long past the window.
    stale = record(1, captured_days_ago=60)
    newest = record(0.5)
    decisions = by_id(decide([backfilled, stale, newest], WINDOW, NOW, require_offsite=True))
    assert not decisions[backfilled.backup_id].delete
    assert decisions[stale.backup_id].delete
    assert "60 days old > 30 days" in decisions[stale.backup_id].reason


def test_staging_set_without_verified_offsite_copy_is_kept_past_the_window():
    not_uploaded = record(45, SetState.VERIFIED)
    receipt_but_missing_offsite = record(44, SetState.OFFSITE, offsite=False)
    unverified = record(43, SetState.UNVERIFIED)
    newest = record(1)
    decisions = by_id(decide([not_uploaded, receipt_but_missing_offsite, unverified, newest], WINDOW, NOW,
                             require_offsite=True))
    for kept in (not_uploaded, receipt_but_missing_offsite, unverified):
        assert not decisions[kept.backup_id].delete
        assert "no verified offsite copy" in decisions[kept.backup_id].reason
    # Offsite itself does not need a further copy.
    assert decide([not_uploaded, newest], WINDOW, NOW, require_offsite=False)[0].delete


def test_incomplete_and_corrupt_sets_are_deleted_only_past_the_window():
    young_incomplete, old_incomplete = record(10, SetState.INCOMPLETE), record(31, SetState.INCOMPLETE)
    young_corrupt, old_corrupt = record(9, SetState.CORRUPT), record(32, SetState.CORRUPT)
    decisions = by_id(decide([young_incomplete, old_incomplete, young_corrupt, old_corrupt], WINDOW, NOW,
                             require_offsite=True))
    assert not decisions[young_incomplete.backup_id].delete
    assert not decisions[young_corrupt.backup_id].delete
    assert decisions[old_incomplete.backup_id].delete
    assert decisions[old_incomplete.backup_id].reason == (
        "incomplete, 31 days old by its backup id (no manifest, so no capture time) > 30 days"
    )
    assert decisions[old_corrupt.backup_id].delete
    assert decisions[old_corrupt.backup_id].reason.startswith("corrupt, captured ")


def test_current_and_protected_sets_are_kept_with_their_reasons():
    running = record(40, SetState.INCOMPLETE)
    chain_base = record(50)
    newest = record(1)
    decisions = by_id(decide([running, chain_base, newest], WINDOW, NOW, require_offsite=True,
                             protected={chain_base.backup_id: "base of the WAL chain for 20260228T000000Z"},
                             current_id=running.backup_id))
    assert not decisions[running.backup_id].delete
    assert "running backup" in decisions[running.backup_id].reason
    assert decisions[chain_base.backup_id] == Decision(
        chain_base.backup_id, False, "protected: base of the WAL chain for 20260228T000000Z"
    )


def test_sets_whose_age_cannot_be_known_are_kept():
    unreadable_manifest = SetRecord("20250101T000000Z", SetState.VERIFIED, None, True)
    odd_name = SetRecord("leftover-upload", SetState.INCOMPLETE, None, False)
    impossible_date = SetRecord("20251399T000000Z", SetState.INCOMPLETE, None, False)
    decisions = decide([unreadable_manifest, odd_name, impossible_date], WINDOW, NOW, require_offsite=True)
    assert [d.delete for d in decisions] == [False, False, False]
    assert all("age unknown" in d.reason for d in decisions)


def test_rejects_ambiguous_inputs():
    with pytest.raises(ValueError, match="listed twice"):
        decide([record(1), record(1)], WINDOW, NOW, require_offsite=True)
    with pytest.raises(ValueError, match="timezone-aware"):
        decide([record(1)], WINDOW, NOW.replace(tzinfo=None), require_offsite=True)
    naive = SetRecord("20260101T000000Z", SetState.VERIFIED, datetime(2026, 1, 1), False)
    with pytest.raises(ValueError, match="20260101T000000Z"):
        decide([naive], WINDOW, NOW, require_offsite=True)


def test_backup_id_time_parses_only_valid_ids():
    assert backup_id_time("20260101T020000Z") == datetime(2026, 1, 1, 2, tzinfo=UTC)
    assert backup_id_time("2026-01-01") is None
    assert backup_id_time("20261301T020000Z") is None


# ---- properties over random histories ---------------------------------------------------------

MINUTES_120_DAYS = 120 * 24 * 60


@st.composite
def histories(draw):
    """Random sets: ids and capture times drawn independently (backfills, clock skew, retries).

    Ages land exactly on the window edge (and one minute either side) often enough to test it.
    """
    retention = timedelta(days=draw(st.integers(1, 90)), minutes=draw(st.sampled_from([0, 1, 719])))
    edge = int(retention.total_seconds() // 60)
    ages = st.one_of(st.integers(-60, MINUTES_120_DAYS), st.sampled_from([edge - 1, edge, edge + 1]))
    id_minutes = draw(st.lists(ages, unique=True, max_size=25))
    records = []
    for minutes in id_minutes:
        state = draw(st.sampled_from(list(SetState)))
        manifest_unreadable = state is not SetState.INCOMPLETE and draw(st.integers(0, 9)) == 0
        captured = None
        if state is not SetState.INCOMPLETE and not manifest_unreadable:
            captured = NOW - timedelta(minutes=draw(ages))
        records.append(SetRecord(
            backup_id=backup_id_for(NOW - timedelta(minutes=minutes)),
            state=state,
            captured_at=captured,
            offsite_verified=draw(st.booleans()),
        ))
    ids = [r.backup_id for r in records]
    protected_ids = draw(st.lists(st.sampled_from(ids), unique=True)) if ids else []
    protected = {backup_id: f"chain {n}" for n, backup_id in enumerate(protected_ids)}
    current_id = draw(st.sampled_from([None, "20990101T000000Z", *ids]))
    require_offsite = draw(st.booleans())
    return records, retention, require_offsite, protected, current_id


def age_of(rec: SetRecord) -> timedelta | None:
    if rec.captured_at is not None:
        return NOW - rec.captured_at
    if rec.state is SetState.INCOMPLETE:
        return NOW - backup_id_time(rec.backup_id)
    return None


def expected_newest_good(records: list[SetRecord]) -> str | None:
    good = sorted((r.captured_at, r.backup_id) for r in records if r.state.is_good and r.captured_at is not None)
    return good[-1][1] if good else None


PROPERTY_SETTINGS = settings(max_examples=200, deadline=None)


@PROPERTY_SETTINGS
@given(histories())
def test_property_decisions_cover_every_set_once_in_order_with_a_reason(history):
    records, retention, require_offsite, protected, current_id = history
    decisions = decide(records, retention, NOW, require_offsite=require_offsite, protected=protected,
                       current_id=current_id)
    assert [d.backup_id for d in decisions] == [r.backup_id for r in records]
    assert all(d.reason.strip() for d in decisions)


@PROPERTY_SETTINGS
@given(histories())
def test_property_safety_invariants(history):
    records, retention, require_offsite, protected, current_id = history
    decisions = decide(records, retention, NOW, require_offsite=require_offsite, protected=protected,
                       current_id=current_id)
    newest_good = expected_newest_good(records)
    for rec, decision in zip(records, decisions):
        if not decision.delete:
            continue
        assert rec.backup_id != newest_good, "the newest good set was deleted"
        assert rec.backup_id not in protected, "a protected set was deleted"
        assert rec.backup_id != current_id, "the running backup's set was deleted"
        assert rec.state is not SetState.SUSPECT, "a suspect set was deleted"
        age = age_of(rec)
        assert age is not None, "a set of unknown age was deleted"
        assert age > retention, f"a set within the window was deleted: {decision}"
        if require_offsite and rec.state in HOLDS_DATA:
            assert rec.offsite_verified, "a staging set without verified offsite copy was deleted"
    if newest_good is not None:
        assert not by_id(decisions)[newest_good].delete


@PROPERTY_SETTINGS
@given(histories())
def test_property_nothing_is_kept_without_a_rule_asking_for_it(history):
    """The converse: every set past the window that no rule protects is deleted."""
    records, retention, require_offsite, protected, current_id = history
    decisions = decide(records, retention, NOW, require_offsite=require_offsite, protected=protected,
                       current_id=current_id)
    newest_good = expected_newest_good(records)
    for rec, decision in zip(records, decisions):
        age = age_of(rec)
        prunable = (
            rec.backup_id not in protected
            and rec.backup_id != current_id
            and rec.backup_id != newest_good
            and rec.state is not SetState.SUSPECT  # its manifest disagrees with its upload record
            and age is not None
            and age > retention
            and not (require_offsite and rec.state in HOLDS_DATA and not rec.offsite_verified)
        )
        assert decision.delete == prunable, f"{rec} -> {decision}"


@PROPERTY_SETTINGS
@given(histories(), st.randoms(use_true_random=False))
def test_property_decisions_do_not_depend_on_input_order(history, rng: random.Random):
    records, retention, require_offsite, protected, current_id = history
    shuffled = list(records)
    rng.shuffle(shuffled)
    kwargs = dict(require_offsite=require_offsite, protected=protected, current_id=current_id)
    assert by_id(decide(records, retention, NOW, **kwargs)) == by_id(decide(shuffled, retention, NOW, **kwargs))
