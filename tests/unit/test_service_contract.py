"""The service contract: every module declares every verb with the protocol's signature, and nothing else names a service."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from erp_backup.services import CONTRACT, get_service, service_names
from erp_backup.services.base import ServiceModule

PACKAGE = Path(__file__).resolve().parents[2] / "plugins" / "erp_backup"
# Scratch servers are engines (a PostgreSQL server, a redis-server) that a service names in
# its ScratchSpec; their kind names may equal service names.
OWNERS = ("services", "scratch")
VERBS = [name for name in CONTRACT if not name.isupper()]


def test_the_registry_finds_every_service_by_its_file() -> None:
    assert set(service_names()) >= {"postgres", "minio", "milvus", "gitlab", "redis", "rabbitmq", "files"}


@pytest.mark.parametrize("name", service_names())
def test_module_satisfies_the_protocol(name: str) -> None:
    module = get_service(name)
    assert isinstance(module, ServiceModule)
    assert module.DRILL_TYPES <= module.RESTORE_TYPES <= module.SUPPORTED_TYPES
    assert module.PITR_TYPES <= module.SUPPORTED_TYPES


@pytest.mark.parametrize("name", service_names())
@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_the_protocol_signature(name: str, verb: str) -> None:
    expected = inspect.signature(getattr(ServiceModule, verb))
    wanted = [(p.name, p.kind) for p in expected.parameters.values() if p.name != "self"]
    found = inspect.signature(getattr(get_service(name), verb))
    assert [(p.name, p.kind) for p in found.parameters.values()][: len(wanted)] == wanted, f"{name}.{verb}{found}"
    extra = list(found.parameters.values())[len(wanted):]
    assert all(p.default is not inspect.Parameter.empty or p.kind is p.VAR_KEYWORD for p in extra), (
        f"{name}.{verb} adds required parameters: {extra}")


def _service_knowledge(path: Path, names: set[str], base: Path = PACKAGE) -> list[str]:
    """Comparisons with a service name, per-service tables and get_service("<name>") calls."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        constants: list[ast.expr] = []
        if isinstance(node, ast.Compare):
            constants = [node.left, *node.comparators]
            constants += [elt for side in constants if isinstance(side, (ast.Tuple, ast.List, ast.Set)) for elt in side.elts]
        elif isinstance(node, ast.Dict) and sum(isinstance(k, ast.Constant) and k.value in names for k in node.keys) >= 2:
            constants = [k for k in node.keys if k is not None]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "get_service":
            constants = list(node.args)
        for constant in constants:
            if isinstance(constant, ast.Constant) and constant.value in names:
                found.append(f"{path.relative_to(base)}:{constant.lineno}: {constant.value!r}")
    return found


def test_no_module_outside_the_services_names_a_service() -> None:
    names = set(service_names())
    offenders = [line for path in sorted(PACKAGE.rglob("*.py")) if path.relative_to(PACKAGE).parts[0] not in OWNERS
                 for line in _service_knowledge(path, names)]
    assert offenders == []


def test_the_check_catches_service_knowledge(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('if service == "redis": pass\nPORTS = {"postgres": 5432, "redis": 6379}\nget_service("minio")\n'
                      'kind in ("postgres", "x")\nrecord["files"] = 1\n')
    found = _service_knowledge(sample, {"redis", "postgres", "minio", "files"}, tmp_path)
    assert sorted(found) == ["sample.py:1: 'redis'", "sample.py:2: 'postgres'", "sample.py:2: 'redis'",
                             "sample.py:3: 'minio'", "sample.py:4: 'postgres'"]
