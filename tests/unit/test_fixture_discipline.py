"""Tests build manifests and backup contexts only through tests/fixtures/factories.py."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
FACTORIES = TESTS / "fixtures" / "factories.py"
GUARDED = frozenset({"Manifest", "BackupContext"})


def direct_constructions(source: str) -> list[tuple[int, str]]:
    """(line, class) of every call that constructs a guarded class, by name, alias or attribute."""
    tree = ast.parse(source)
    names = {name: name for name in GUARDED}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.update({alias.asname: alias.name for alias in node.names if alias.name in GUARDED and alias.asname})
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        if called in names:
            found.append((node.lineno, names[called]))
    return sorted(found)


def test_the_detector_finds_names_aliases_and_attributes_but_not_classmethods() -> None:
    source = (
        "from erp_backup.manifest import Manifest as M\n"
        "import erp_backup.services.base as base\n"
        "a = Manifest(service='x')\n"
        "b = M()\n"
        "c = base.BackupContext(job, backup_set, run, get)\n"
        "d = Manifest.read(path)\n"
        "e = make_manifest(service='x')\n"
    )
    assert direct_constructions(source) == [(3, "Manifest"), (4, "Manifest"), (5, "BackupContext")]
    assert {name for _, name in direct_constructions(FACTORIES.read_text(encoding="utf-8"))} == GUARDED


def test_no_test_constructs_a_manifest_or_backup_context_by_hand() -> None:
    offenders = [
        f"{path.relative_to(TESTS.parent)}:{line}: {name}(...)"
        for path in sorted(TESTS.rglob("*.py"))
        if path != FACTORIES
        for line, name in direct_constructions(path.read_text(encoding="utf-8"))
    ]
    assert offenders == [], (
        "build these with tests.fixtures.factories (make_manifest, make_backup_context):\n" + "\n".join(offenders)
    )
