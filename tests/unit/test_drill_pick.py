"""The drill's pure parts: weighted seeded pick, params validation, report numbers and ledger merge."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from erp_backup.drill import ledger
from erp_backup.drill import pick as picking
from erp_backup.drill import report as drill_report
from erp_backup.drill.model import size_measure
from erp_backup.drill.params import DrillParamError, drill_params, parse_request
from erp_backup.drill.records import ServiceState, ledger_entries_for_pick
from erp_backup.plan import DEFAULT_PLAN_PATH, parse_plan
from tests.fixtures.factories import drill_entry, make_manifest

NOW = datetime(2026, 11, 29, 21, 0, tzinfo=UTC)  # Sunday 06:00 Asia/Seoul


def plan_with(*services: str, root: Path = Path("/backup")):
    """The committed plan with exactly PostgreSQL and `services` enabled."""
    data = yaml.safe_load(DEFAULT_PLAN_PATH.read_text())
    for name, service in data["services"].items():
        service["enabled"] = name == "postgres" or name in services
    data["backup_root"] = str(root)
    return parse_plan(DEFAULT_PLAN_PATH, data)


def candidate(service: str, days_old: float, backup_type: str = "full", size: int = 1000) -> picking.Candidate:
    captured = NOW - timedelta(days=days_old)
    return picking.Candidate(service, backup_type, captured.strftime("%Y%m%dT%H%M%SZ"), captured, size, size)


def drilled(c: picking.Candidate, days_ago: float) -> picking.LedgerEntry:
    return picking.LedgerEntry(c.service, c.backup_type, c.backup_id, NOW - timedelta(days=days_ago))


# ───────────── the pick ─────────────


def test_seed_from_run_id_is_stable_and_distinct():
    assert picking.derive_seed("scheduled__2026-11-29T21:00:00+00:00") == picking.derive_seed("scheduled__2026-11-29T21:00:00+00:00")
    assert picking.derive_seed("scheduled__2026-11-29T21:00:00+00:00") != picking.derive_seed("manual__2026-11-29T21:00:00+00:00")


def test_set_weight_is_one_plus_days_since_last_drill_and_never_is_the_cap():
    old, recent, never = candidate("postgres", 20), candidate("postgres", 10), candidate("postgres", 3)
    ledger = [drilled(old, 7), drilled(recent, 0.5)]
    weights = {}
    for seed in range(50):
        choice = picking.choose_set([old, recent, never], ledger, NOW, random.Random(seed))
        weights[choice.candidate.backup_id] = choice.weight
        assert choice.total_weight == pytest.approx(8 + 1.5 + 1 + picking.NEVER_DRILLED_DAYS)
        assert choice.candidates == 3 and choice.newest == never
    assert weights[never.backup_id] == 1 + picking.NEVER_DRILLED_DAYS
    assert weights.get(old.backup_id, 8.0) == pytest.approx(8.0)


def test_undrilled_sets_are_picked_far_more_often_than_yesterdays():
    fresh, drilled_yesterday = candidate("redis", 2, "rdb"), candidate("redis", 1, "rdb")
    ledger = [drilled(drilled_yesterday, 1)]
    counts = Counter(
        picking.pick_sets({"redis": [fresh, drilled_yesterday]}, ledger, NOW, seed).choices[0].candidate.backup_id
        for seed in range(400)
    )
    # weights 366 vs 2: the drilled set has p = 0.54 %
    assert counts[fresh.backup_id] >= 390
    assert counts[drilled_yesterday.backup_id] >= 1 or counts[fresh.backup_id] == 400


def test_same_seed_same_picks_and_one_set_per_service():
    candidates = {
        "postgres": [candidate("postgres", d) for d in (1, 2, 3, 4, 5)],
        "redis": [candidate("redis", d, "rdb") for d in (1, 2, 3)],
        "gitlab": [],
    }
    first = picking.pick_sets(candidates, [], NOW, 1234)
    second = picking.pick_sets(candidates, [], NOW, 1234)
    assert [c.candidate for c in first.choices] == [c.candidate for c in second.choices]
    assert [c.candidate.service for c in first.choices] == ["postgres", "redis"]  # gitlab has nothing to pick
    different = {picking.pick_sets(candidates, [], NOW, seed).choices[0].candidate.backup_id for seed in range(30)}
    assert len(different) > 1  # the seed matters


def test_random_service_leans_to_the_least_recently_drilled_service():
    pg, rd = candidate("postgres", 1), candidate("redis", 1, "rdb")
    ledger = [drilled(pg, 0.2)]  # postgres drilled this morning, redis never
    chosen = Counter(
        picking.pick_sets({"postgres": [pg], "redis": [rd]}, ledger, NOW, seed, one_random_service=True).choices[0].candidate.service
        for seed in range(200)
    )
    assert chosen["redis"] > 190
    result = picking.pick_sets({"postgres": [pg], "redis": [rd]}, ledger, NOW, 7, one_random_service=True)
    assert len(result.choices) == 1 and result.service_weights == {"postgres": pytest.approx(1.2), "redis": 366.0}


def test_weighted_index_boundaries():
    class Fixed(random.Random):
        def __init__(self, value: float):
            super().__init__(0)
            self.value = value

        def random(self) -> float:
            return self.value

    assert picking.weighted_index(Fixed(0.0), [1, 3]) == 0
    assert picking.weighted_index(Fixed(0.249), [1, 3]) == 0
    assert picking.weighted_index(Fixed(0.25), [1, 3]) == 1
    assert picking.weighted_index(Fixed(0.999), [1, 3]) == 1
    with pytest.raises(ValueError):
        picking.weighted_index(Fixed(0.5), [1, 0])


@settings(max_examples=60, deadline=None)
@given(
    ages=st.lists(st.floats(min_value=0, max_value=60), min_size=1, max_size=12, unique=True),
    drilled_days=st.lists(st.one_of(st.none(), st.floats(min_value=0, max_value=400)), min_size=12, max_size=12),
    seed=st.integers(min_value=0, max_value=2**48),
)
def test_pick_is_always_one_of_the_candidates_and_reproducible(ages, drilled_days, seed):
    cands = [candidate("milvus", age, "full") for age in ages]
    ledger = [drilled(c, d) for c, d in zip(cands, drilled_days) if d is not None]
    one = picking.pick_sets({"milvus": cands}, ledger, NOW, seed)
    two = picking.pick_sets({"milvus": list(reversed(cands))}, list(reversed(ledger)), NOW, seed)
    assert one.choices[0].candidate in cands
    assert one.choices[0].candidate == two.choices[0].candidate  # input order does not matter
    assert 1.0 <= one.choices[0].weight <= 1 + picking.NEVER_DRILLED_DAYS


def test_failed_drills_do_not_count_as_drilled():
    entries = [
        drill_entry("postgres", "failed", backup_type="full", backup_id="20261120T170000Z", failed_step="verify"),
        drill_entry("gitlab", "prepared", backup_type="full", backup_id="20261120T190000Z"),
        drill_entry("redis", "failed", failed_step="pick"),  # no set was picked
    ]
    assert [e.service for e in ledger_entries_for_pick(entries)] == ["gitlab"]


# ───────────── params ─────────────


def test_params_form_has_defaults_and_descriptions():
    plan = plan_with("redis")
    form = drill_params(plan)
    assert set(form) == {"service", "backup_id", "source", "target_time", "keep_scratch", "seed", "backend"}
    assert all(param.description for param in form.values())
    assert form["service"].schema["enum"] == ["all", "random", "postgres", "redis"]
    assert form["source"].value == "offsite" and form["keep_scratch"].value is False and form["seed"].value is None


def test_optional_params_are_nullable_so_the_defaults_trigger_a_run():
    form = drill_params(plan_with("redis"))
    for name in ("backup_id", "target_time", "seed"):
        assert form[name].value is None and "null" in form[name].schema["type"], name
    for name in ("service", "source", "backend", "keep_scratch"):  # required, with a valid default
        assert "null" not in form[name].schema["type"] and form[name].value is not None, name
    validated = {name: param.resolve() for name, param in form.items()}
    assert parse_request(validated, plan_with("redis"), "manual__x").backup_id is None


def test_unknown_service_lists_the_valid_ones():
    with pytest.raises(DrillParamError, match=r"service 'mysql' .* valid: all, random, postgres, redis"):
        parse_request({"service": "mysql"}, plan_with("redis"), "run")


@pytest.mark.parametrize(("params", "message"), [
    ({"service": "all", "backup_id": "20261120T170000Z"}, "needs a service: set service to one of postgres"),
    ({"service": "postgres", "backup_id": "yesterday"}, "is not a backup id; use <YYYYMMDDTHHMMSSZ>"),
    ({"service": "redis", "target_time": "2026-11-26T10:15:00+09:00"}, "set service to one of postgres"),
    ({"service": "postgres", "target_time": "2026-11-26 10:15"}, "has no UTC offset"),
    ({"service": "postgres", "target_time": "tuesday"}, "is not an ISO 8601 time"),
    ({"source": "tape"}, "valid: offsite, local"),
    ({"seed": "abc"}, "seed 'abc' is not an integer"),
])
def test_bad_params_say_what_is_valid(params, message):
    with pytest.raises(DrillParamError, match=message):
        parse_request(params, plan_with("redis"), "run")


def test_seed_defaults_to_the_run_id_and_backup_id_may_name_the_type():
    request = parse_request({"service": "postgres", "backup_id": "full/20261120T170000Z", "seed": None}, plan_with(), "run-1")
    assert (request.seed, request.seed_from) == (picking.derive_seed("run-1"), "run id")
    assert (request.backup_type, request.backup_id) == ("full", "20261120T170000Z")
    assert parse_request({"seed": 42}, plan_with(), "run-1").seed == 42
    pitr = parse_request({"service": "postgres", "target_time": "2026-11-26T10:15:00+09:00"}, plan_with(), "r")
    assert pitr.target_time == datetime(2026, 11, 26, 1, 15, tzinfo=UTC)


# ───────────── report numbers ─────────────


def test_size_measure_prefers_the_source_size_in_the_details():
    assert size_measure(make_manifest(details={"raw_bytes": 5000}, sizes=[100, 200])) == (5000, "postgres source size")
    assert size_measure(make_manifest(details={}, sizes=[100, 200])) == (300, "set size")


def test_rto_measured_is_fetch_restore_verify_and_extrapolation_scales_by_production_size(tmp_path):
    plan = plan_with(root=tmp_path)
    pick = {"run_id": "manual__x", "service": "postgres", "backup_type": "full", "backup_id": "20261120T170000Z",
            "size_measure": {"bytes": 400_000_000, "from": "details.raw_bytes"},
            "production": {"backup_id": "20261128T170000Z", "bytes": 1_000_000_000}, "rto_target_s": 7200.0,
            "set_bytes": 100_000_000}
    state = ServiceState(plan, "manual__x", "postgres")
    for step, seconds in (("start_target", 3.0), ("fetch", 10.0), ("restore", 50.0), ("verify", 20.0), ("teardown", 1.0)):
        state.write(step, {"status": "ok", "seconds": seconds})
    result = drill_report.service_result(plan, pick)
    assert result["status"] == "passed" and result["failed_step"] is None
    assert result["rto"]["measured_s"] == 80.0
    assert result["rto"]["scale"] == 2.5 and result["rto"]["extrapolated_s"] == 200.0
    assert result["rto"]["within_target"] is True

    state.write("verify", {"status": "failed", "seconds": 2.0, "error": "DrillVerificationFailed: erp.t: 3 rows"})
    failed = drill_report.service_result(plan, pick)
    assert (failed["status"], failed["failed_step"], failed["rto"]["measured_s"]) == ("failed", "verify", None)
    assert "3 rows" in failed["error"]


def test_ledger_merge_appends_once():
    entry = drill_entry("redis", backup_type="rdb", backup_id="20261120T181500Z", run_id="r1")
    once, added = ledger.merge("", [entry])
    twice, added_again = ledger.merge(once, [entry])
    assert (added, added_again) == (1, 0) and once == twice and once.count("\n") == 1


def test_markdown_and_slack_name_the_failure():
    report = {
        "run_id": "manual__1", "status": "failed", "error": None, "finished_at": NOW.isoformat(),
        "request": {"service": "postgres", "source": "offsite"},
        "services": [{"service": "postgres", "backup_type": "full", "backup_id": "20261120T170000Z", "status": "failed",
                      "failed_step": "fetch", "error": "ChecksumMismatch: file databases/erp.dump.zst differs"}],
    }
    assert "databases/erp.dump.zst" in drill_report.render_markdown(report)
    text = drill_report.slack_text(report)
    assert "FAILED" in text and "failed at fetch" in text and "databases/erp.dump.zst" in text
