"""Service modules, dispatched by name. Each exposes SUPPORTED_TYPES, backup, verify and restore."""

from __future__ import annotations

import importlib
from types import ModuleType

SERVICE_MODULES = {
    "postgres": "erp_backup.services.postgres",
    "minio": "erp_backup.services.minio",
    "milvus": "erp_backup.services.milvus",
    "gitlab": "erp_backup.services.gitlab",
    "redis": "erp_backup.services.redis",
    "rabbitmq": "erp_backup.services.rabbitmq",
}


def get_service(name: str) -> ModuleType:
    """Import a service module on first use (never at DAG parse time)."""
    try:
        return importlib.import_module(SERVICE_MODULES[name])
    except KeyError:
        raise LookupError(f"unknown service {name!r} (known: {', '.join(sorted(SERVICE_MODULES))})") from None
