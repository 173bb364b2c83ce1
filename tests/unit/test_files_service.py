"""The files service's pure parts: plan paths, excludes, CLI targets, scratch spec and sizes."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

import pytest
from airflow.sdk import Connection

from erp_backup.services import files, get_service
from erp_backup.services.base import ServiceModule, TargetUsageError
from tests.fixtures.factories import make_manifest


def test_the_module_satisfies_the_contract() -> None:
    assert isinstance(get_service("files"), ServiceModule)


@pytest.mark.parametrize("paths", [None, [], ["etc/gitlab"], "/etc/gitlab", [3]])
def test_plan_paths_must_be_a_list_of_absolute_paths(paths) -> None:
    with pytest.raises(ValueError, match="options.paths"):
        files.plan_paths({"paths": paths})


def test_walk_yields_parents_first_and_honours_excludes(tmp_path: Path) -> None:
    (tmp_path / "etc/nginx/cache").mkdir(parents=True)
    (tmp_path / "etc/nginx/nginx.conf").write_text("x")
    (tmp_path / "etc/nginx/cache/big.bin").write_text("y")
    walked = [rel for rel, _ in files.walk(tmp_path, [PurePosixPath("/etc/nginx")], ["/etc/nginx/cache"])]
    assert walked == ["etc", "etc/nginx", "etc/nginx/nginx.conf"]


def test_cli_target_is_a_new_or_empty_directory(tmp_path: Path) -> None:
    chosen = files.target_from_cli("full", str(tmp_path / "restore"), None, lambda c: None)
    assert chosen.target == tmp_path / "restore" and str(tmp_path) in chosen.description
    with pytest.raises(TargetUsageError, match="need --target"):
        files.target_from_cli("full", None, None, lambda c: None)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("a")
    with pytest.raises(TargetUsageError, match="new or empty"):
        files.target_from_cli("full", str(tmp_path / "full"), None, lambda c: None)


def test_cli_target_from_an_fs_connection(tmp_path: Path) -> None:
    conn = Connection(conn_id="dr_files", conn_type="fs", extra=json.dumps({"path": str(tmp_path / "dr")}))
    assert files.target_from_cli("full", None, "dr_files", lambda c: conn).target == tmp_path / "dr"
    bare = Connection(conn_id="dr_files", conn_type="fs")
    with pytest.raises(TargetUsageError, match="no extra 'path'"):
        files.target_from_cli("full", None, "dr_files", lambda c: bare)


def test_scratch_is_a_local_directory_and_sizes_come_from_the_manifest() -> None:
    spec = files.scratch_spec("full", {})
    assert (spec.kind, spec.container) == ("directory", None)
    manifest = make_manifest(service="files", sizes=[10], details={"source_bytes": 4096})
    assert files.source_size(manifest) == 4096 and files.versions(manifest) == {}


def test_entries_round_trip_through_the_manifest_form() -> None:
    entry = files.Entry("etc/ssl/erp/erp.key", "file", 0o600, 0, 123, "root", "ssl-cert", 18, "a" * 64)
    assert files.Entry.from_dict(json.loads(json.dumps(entry.as_dict()))) == entry
