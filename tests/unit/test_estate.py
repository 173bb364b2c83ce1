"""The estate recovery's pure decisions: sets at T, dependency layers, the plan block, and how gaps are explained."""

from __future__ import annotations

from datetime import timedelta

import pytest
import yaml

from erp_backup.estate.choose import ChosenSet, EstateRefused, ServicePlan, layers
from erp_backup.estate.references import check_objects, check_vectors, run_checks
from erp_backup.plan import DEFAULT_PLAN_PATH, PlanError, load_plan
from erp_backup.services.base import newest_set_at, newest_set_of_each_type_at
from tests.fixtures.factories import CAPTURED, make_manifest


def _at(minutes: int):
    return CAPTURED + timedelta(minutes=minutes)


def test_newest_set_at_or_before_t_whatever_its_type() -> None:
    sets = [make_manifest(service="minio", backup_type=t, captured_finished_at=_at(m)) for t, m in
            (("full", 0), ("snapshot", 10), ("full", 20))]
    assert newest_set_at(sets, _at(15)) == [sets[1]]
    assert newest_set_at(sets, _at(20)) == [sets[2]]
    assert newest_set_at(sets, _at(-1)) == []


def test_newest_set_of_each_type_for_types_that_restore_different_parts() -> None:
    sets = [make_manifest(service="milvus", backup_type=t, captured_finished_at=_at(m)) for t, m in
            (("full", 0), ("etcd", 5), ("etcd", 30), ("full", 40))]
    chosen = newest_set_of_each_type_at(sets, _at(35))
    assert {(m.backup_type, m.captured_finished_at) for m in chosen} == {("full", _at(0)), ("etcd", _at(30))}


def test_layers_put_a_service_after_what_it_depends_on_and_refuse_a_cycle() -> None:
    assert layers(["a", "b", "c", "d"], {"c": ["a"], "d": ["c", "x"]}) == [["a", "b"], ["c"], ["d"]]
    with pytest.raises(EstateRefused, match="cycle among a, b"):
        layers(["a", "b"], {"a": ["b"], "b": ["a"]})


def _plan(service: str, started: int, finished: int) -> ServicePlan:
    return ServicePlan(service, [ChosenSet("full", "x", _at(finished), 1, 1, _at(started))])


def test_a_missing_object_is_explained_only_when_written_after_the_object_set_began() -> None:
    from erp_backup.estate.references import Doc

    docs = {"d1": Doc("d1", "o1", "h1", [1], _at(1)), "d2": Doc("d2", "o2", "h2", [2], _at(12)),
            "d3": Doc("d3", "o3", "h3", [3], _at(2)), "d4": Doc("d4", "o4", "bad", [4], _at(0))}
    missing, differs, orphans = check_objects(docs, {"o1": "h1", "o4": "h4", "o9": "h9"}, _plan("store", 10, 11))
    assert (missing.count, missing.explained) == (2, 1)  # d2 written after the set began; d3 before: lost
    assert (differs.count, differs.explained) == (1, 0) and differs.sample[0].startswith("d4 → o4")
    assert (orphans.count, orphans.sample, orphans.as_dict()["unexplained"]) == (1, ["o9"], None)
    vectors_missing, vector_orphans = check_vectors(docs, {"1": "d1", "2": "d2", "7": "d7"}, _plan("vec", 0, 1))
    assert (vectors_missing.count, vectors_missing.explained) == (2, 1)  # d3 written after the vector set began, d4 not
    assert vector_orphans.sample == ["vector 7 of d7"]


def test_references_that_lack_a_role_are_reported_not_checked() -> None:
    assert run_checks({"documents": {}}, lambda s, t: None, {})["status"] == "not configured"


def test_the_plan_estate_block_is_validated_naming_the_field(tmp_path) -> None:
    plan = load_plan()
    assert plan.estate is not None and plan.estate.window == timedelta(days=7)
    assert plan.estate.depends_on["milvus"] == ("minio",)
    data = yaml.safe_load(DEFAULT_PLAN_PATH.read_text())
    data["estate"]["references"]["objects"]["service"] = "nosuch"
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PlanError, match=r"plan\.estate\.references\.objects\.service: unknown service 'nosuch'"):
        load_plan(path)


def test_a_docker_recovery_keeps_pitr_and_kinds_without_a_container_local_and_says_why(tmp_path, monkeypatch) -> None:
    from erp_backup.estate.recover import PITR_STAYS_LOCAL, EstateRecovery
    from erp_backup.services import get_service

    monkeypatch.setenv("ERP_BACKUP_ROOT", str(tmp_path / "backup"))
    plan = load_plan(DEFAULT_PLAN_PATH)
    no_connection = lambda conn_id: (_ for _ in ()).throw(LookupError(conn_id))  # noqa: E731
    recovery = EstateRecovery(plan, "manual__unit", object(), get_connection=no_connection, backend="docker",
                              identities=list)
    pitr_spec = get_service("postgres").scratch_spec("snapshot", {}, pitr=True)
    assert recovery.backend_for(pitr_spec, pitr=True) == (recovery.local, PITR_STAYS_LOCAL)
    redis_spec = get_service("redis").scratch_spec("rdb", {})
    assert redis_spec.container is None
    assert recovery.backend_for(redis_spec, pitr=False) == (recovery.local, "scratch kind 'redis' has no container target")
    local = EstateRecovery(plan, "manual__unit", object(), get_connection=no_connection, backend="local", identities=list)
    assert local.backend_for(get_service("postgres").scratch_spec("full", {}), pitr=False) == (local.local, None)
    with pytest.raises(ValueError, match="backend 'podman' is not valid; valid: local, docker"):
        EstateRecovery(plan, "manual__unit", object(), get_connection=no_connection, backend="podman", identities=list)
