"""The service registry: every module or package under ``services/`` (but ``base``) is a service.

A new service is one module here plus one plan block. Names come from the file
system, without importing anything, so the plan can list them at DAG parse time;
a module is imported (and its contract checked) on first use.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import cast

from erp_backup.services.base import ServiceModule

NOT_SERVICES = frozenset({"base"})
CONTRACT = ("SUPPORTED_TYPES", "RESTORE_TYPES", "DRILL_TYPES", "PITR_TYPES", "RESTORE_OPTIONS", "DEFAULT_PORTS", "CLEAR_DETAILS", "backup", "verify", "restore",
            "check_restored", "target_from_cli", "scratch_spec", "scratch_target", "versions", "source_size",
            "protected_sets", "after_prune", "plan_point_in_time", "restore_to_time", "point_in_time_range", "sets_at", "read_records")


class ContractError(TypeError):
    """A service module does not declare every verb of the contract."""


@cache
def service_names() -> tuple[str, ...]:
    """Every service, sorted, from the file names under services/."""
    names = (info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))
    return tuple(sorted(name for name in names if name not in NOT_SERVICES))


@cache
def get_service(name: str) -> ServiceModule:
    """Import a service module on first use (never at DAG parse time) and check its contract."""
    if name not in service_names():
        raise LookupError(f"unknown service {name!r} (known: {', '.join(service_names())})")
    module = importlib.import_module(f"{__name__}.{name}")
    missing = [verb for verb in CONTRACT if not hasattr(module, verb)]
    if missing:
        raise ContractError(f"erp_backup.services.{name} does not declare {', '.join(missing)} "
                            "(see erp_backup/services/base.py)")
    return cast(ServiceModule, module)


def all_services() -> dict[str, ServiceModule]:
    return {name: get_service(name) for name in service_names()}
