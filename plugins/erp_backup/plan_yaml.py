"""Reading the plan's YAML strictly: a duplicate key is an error that names its line.

PyYAML keeps the last of two equal keys without a word, so a second `schedule:` in a
service block would silently replace the first. `load` composes the document once,
walks its mappings for repeated keys, then builds the data from the same nodes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

_MERGE_TAG = "tag:yaml.org,2002:merge"
_SERVICES = "plan.services"


@dataclass(frozen=True)
class DuplicateKey:
    where: str  # the dotted path of the mapping, e.g. plan.services.postgres.backups.full
    key: str
    line: int  # 1-based line of the repeated key
    first_line: int

    @property
    def service(self) -> str | None:
        """The service block the duplicate belongs to; None when it is outside every service."""
        if self.where == _SERVICES:
            return self.key
        if self.where.startswith(_SERVICES + "."):
            return self.where.split(".")[2]
        return None

    def message(self, path: Path) -> str:
        return (
            f"{path}: line {self.line}: duplicate key {self.key!r} in {self.where} (first at line {self.first_line}); "
            "YAML would silently keep only the last one, so remove or rename one of them"
        )


def duplicate_keys(node: Node | None, where: str = "plan") -> Iterator[DuplicateKey]:
    """Every key repeated within one mapping, anywhere under `node`."""
    seen_nodes: set[int] = set()
    stack: list[tuple[Node, str]] = [(node, where)] if node is not None else []
    while stack:
        current, path = stack.pop()
        if id(current) in seen_nodes:  # an alias: already walked
            continue
        seen_nodes.add(id(current))
        if isinstance(current, SequenceNode):
            stack.extend((item, f"{path}[{index}]") for index, item in enumerate(current.value))
        elif isinstance(current, MappingNode):
            first_lines: dict[str, int] = {}
            for key_node, value_node in current.value:
                if key_node.tag == _MERGE_TAG or not isinstance(key_node, ScalarNode):
                    stack.append((value_node, path))
                    continue
                key, line = str(key_node.value), key_node.start_mark.line + 1
                if key in first_lines:
                    yield DuplicateKey(path, key, line, first_lines[key])
                else:
                    first_lines[key] = line
                stack.append((value_node, f"{path}.{key}"))


def load(text: str) -> tuple[Any, list[DuplicateKey]]:
    """The document's data (as yaml.safe_load gives it) and its duplicate keys, in line order.

    Raises yaml.YAMLError for text that is not YAML.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        duplicates = sorted(duplicate_keys(node), key=lambda d: d.line)
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return data, duplicates
