"""Structure of the production deployment: docker-compose.yaml, .env.example and Dockerfile.

No Docker engine runs here, so these tests parse the files and check the rules
docs/deployment.md states: the services of the official Airflow 3 layout, one set
of shared Airflow settings, /backup and the Docker socket only on the backup
worker, healthchecks, secrets only from .env, and the `erp` stand-in profile.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_PATH = ROOT / "docker-compose.yaml"
ENV_EXAMPLE_PATH = ROOT / ".env.example"
COMPOSE_OWN_VARIABLES = {"COMPOSE_PROJECT_NAME"}  # read by Compose itself, not by the file
DOCKERFILE_PATH = ROOT / "Dockerfile"

AIRFLOW_SERVICES = frozenset(
    {
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "airflow-worker",
        "airflow-worker-backup",
        "airflow-worker-drill",
        "airflow-init",
    }
)
BACKENDS = frozenset({"postgres", "redis"})
ERP_SERVICES = frozenset(
    {"erp-postgres", "erp-minio", "erp-milvus", "erp-milvus-etcd", "erp-milvus-minio", "erp-redis", "erp-rabbitmq"}
)
ONE_SHOT = frozenset({"airflow-init"})
WORKERS = frozenset({"airflow-worker", "airflow-worker-backup", "airflow-worker-drill"})
BACKUP_WORKER = "airflow-worker-backup"
DRILL_WORKER = "airflow-worker-drill"
BACKUP_QUEUE = "backup"
DRILL_QUEUE = "drill"
DEFAULT_QUEUE = "default"
# /backup: the workers that take and restore backups, and the init job that only sets its ownership.
BACKUP_MOUNTERS = frozenset({BACKUP_WORKER, DRILL_WORKER, "airflow-init"})
SOCKET_MOUNTERS = frozenset({BACKUP_WORKER, DRILL_WORKER})
# Keys that split the two workers: only the backup worker deletes offsite and encrypts; only the drill decrypts.
PRUNE_CONN, RECIPIENTS_CONN, IDENTITY_CONN = (
    "AIRFLOW_CONN_BACKUP_OFFSITE_PRUNE", "AIRFLOW_CONN_BACKUP_AGE_RECIPIENTS", "AIRFLOW_CONN_BACKUP_AGE_IDENTITY")
DOCKER_SOCKET = "/var/run/docker.sock"
CONNECTION_IDS = frozenset(
    {
        "erp_postgres",
        "backup_offsite",
        "slack_backup_alerts",
        "erp_minio",
        "erp_milvus",
        "milvus_etcd",
        "ops_gitlab",
        "erp_redis",
        "erp_rabbitmq",
    }
)
# Alerts are sent from workers, the DAG processor (DAG callbacks) and the triggerer (deadline alerts).
ALERT_CONNECTIONS = frozenset({"slack_backup_alerts"})
EXECUTION_API_URL = "http://airflow-apiserver:8080/execution/"
COMMON_MOUNTS = {name: f"/opt/airflow/{name}" for name in ("dags", "logs", "config", "plugins", "include")}
PLACEHOLDER = "change-me"

SECRET_NAME = re.compile(r"PASS|SECRET|KEY|TOKEN|CREDENTIAL|_AUTH$", re.IGNORECASE)
# ${NAME}, ${NAME:?msg}, ${NAME?msg}, ${NAME:-default}, ${NAME-default}, ${NAME:+alt}, ${NAME+alt}
REFERENCE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}")
BARE_REFERENCE = re.compile(r"\$(?P<name>[A-Za-z_][A-Za-z0-9_]*)")
REQUIRED_OPS = {None, "?", ":?"}
REF_TOKEN = "<env>"
# user:password@host, with or without a scheme in front.
URL_CREDENTIALS = re.compile(r"(?P<user>[\w.%+-]*):(?P<password>[^\s:@/]+)@(?P<host>[\w.-]+)")


# ------------------------------------------------------------------ parsing helpers
def load_compose(path: Path = COMPOSE_PATH) -> dict[str, Any]:
    """safe_load resolves the x-* anchors and `<<` merges, as Compose does."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


class DuplicateKeyLoader(yaml.SafeLoader):
    """safe_load silently keeps the last of two equal keys; Compose refuses the file."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_env_file(path: Path = ENV_EXAMPLE_PATH) -> dict[str, str]:
    """KEY=value lines as Compose reads .env: comments skipped, surrounding quotes removed."""
    values: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}:{number}: expected KEY=value, got {raw!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        assert key.strip() not in values, f"{path.name}:{number}: {key.strip()} is defined twice"
        values[key.strip()] = value
    return values


def unescaped(text: str) -> str:
    """Drop Compose's `$$` escapes: what remains with a `$` is interpolated."""
    return text.replace("$$", "")


def iter_strings(node: Any, where: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from iter_strings(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from iter_strings(value, f"{where}[{index}]")
    elif isinstance(node, str):
        yield where, node


def referenced_variables(doc: Any) -> set[str]:
    names: set[str] = set()
    for _, text in iter_strings(doc):
        text = unescaped(text)
        names.update(match["name"] for match in REFERENCE.finditer(text))
        names.update(match["name"] for match in BARE_REFERENCE.finditer(REFERENCE.sub("", text)))
    return names


def is_required_reference(value: Any) -> bool:
    """The whole value is one `${VAR}` / `${VAR:?msg}`: no literal, no default to fall back on."""
    match = REFERENCE.fullmatch(str(value))
    return bool(match) and match["op"] in REQUIRED_OPS


def effective_text(text: str) -> str:
    """What a value contains once interpolated: required references become a token, defaults stay literal."""

    def replace(match: re.Match[str]) -> str:
        if match["op"] in REQUIRED_OPS:
            return REF_TOKEN
        if match["op"] in {"-", ":-"}:
            return match["arg"]
        return REF_TOKEN

    return REFERENCE.sub(replace, unescaped(text))


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool


def split_outside_references(text: str, sep: str = ":") -> list[str]:
    parts, current, depth = [], "", 0
    for index, char in enumerate(text):
        if char == "{" and index and text[index - 1] == "$":
            depth += 1
        elif char == "}" and depth:
            depth -= 1
        if char == sep and not depth:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def mounts(service: dict[str, Any]) -> list[Mount]:
    result = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            result.append(Mount(str(volume.get("source", "")), volume["target"], bool(volume.get("read_only"))))
            continue
        parts = split_outside_references(volume)
        if len(parts) == 1:
            result.append(Mount("", parts[0], False))
        else:
            mode = parts[2] if len(parts) > 2 else "rw"
            result.append(Mount(parts[0], parts[1], "ro" in mode.split(",")))
    return result


def command_argv(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(arg) for arg in command]


def worker_queues(service: dict[str, Any]) -> set[str]:
    argv = command_argv(service)
    assert argv[:2] == ["celery", "worker"], f"not a Celery worker command: {argv}"
    for index, arg in enumerate(argv):
        if arg in {"-q", "--queues"}:
            return set(argv[index + 1].split(","))
        if arg.startswith("--queues="):
            return set(arg.split("=", 1)[1].split(","))
    return {DEFAULT_QUEUE}


def postgres_settings(service: dict[str, Any]) -> dict[str, str]:
    argv = command_argv(service)
    settings = {}
    for flag, value in zip(argv, argv[1:]):
        if flag == "-c":
            key, _, setting = value.partition("=")
            settings[key] = setting
    return settings


def environment_blocks(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, str]]]:
    """Every environment in the file: the services' and the x-* anchors' (plain maps are env fragments)."""
    for name, service in (doc.get("services") or {}).items():
        yield f"services.{name}.environment", environment(service)
    for key, block in doc.items():
        if key.startswith("x-") and isinstance(block, dict):
            if "environment" in block:
                yield f"{key}.environment", environment(block)
            else:
                yield key, {str(k): str(v) for k, v in block.items() if not isinstance(v, (dict, list))}


def literal_secrets(doc: dict[str, Any]) -> list[str]:
    """Entries whose name says secret (or AIRFLOW_CONN_*) but whose value is not a required ${VAR}."""
    return [
        f"{where}.{key} = {value!r}"
        for where, env in environment_blocks(doc)
        for key, value in env.items()
        if (SECRET_NAME.search(key) or key.startswith("AIRFLOW_CONN_")) and not is_required_reference(value)
    ]


def literal_url_credentials(doc: Any) -> list[str]:
    """Every `user:password@host` anywhere in the file whose password is not a required ${VAR}."""
    problems = []
    for where, text in iter_strings(doc):
        for match in URL_CREDENTIALS.finditer(effective_text(text)):
            if match["password"] != REF_TOKEN:
                problems.append(f"{where}: {match.group(0)!r}")
    return problems


def dockerfile_instructions(path: Path = DOCKERFILE_PATH) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def common(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["x-airflow-common"]


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file()


# ------------------------------------------------------------------ services and shared settings
def test_compose_file_has_no_duplicate_keys() -> None:
    yaml.load(COMPOSE_PATH.read_text(encoding="utf-8"), Loader=DuplicateKeyLoader)


def test_duplicate_key_check_allows_merges_and_catches_repeats() -> None:
    merged = "x: &a {k: 1}\ns:\n  <<: *a\n  k: 2\n"
    assert yaml.load(merged, Loader=DuplicateKeyLoader) == {"x": {"k": 1}, "s": {"k": 2}}
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'environment'"):
        yaml.load("s:\n  environment: {}\n  image: i\n  environment: {}\n", Loader=DuplicateKeyLoader)


def test_required_services_present(services: dict[str, Any]) -> None:
    missing = (AIRFLOW_SERVICES | BACKENDS | ERP_SERVICES) - services.keys()
    assert not missing, f"docker-compose.yaml lacks services: {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(AIRFLOW_SERVICES))
def test_airflow_service_uses_the_common_image_env_and_mounts(
    name: str, services: dict[str, Any], common: dict[str, Any]
) -> None:
    service = services[name]
    assert service.get("image") == common["image"], f"{name}: image must come from x-airflow-common"
    assert service.get("build") == common["build"], f"{name}: build must come from x-airflow-common"
    env = environment(service)
    drifted = {key: env.get(key) for key, value in environment(common).items() if env.get(key) != value}
    assert not drifted, f"{name}: differs from x-airflow-common environment: {drifted}"
    targets = {mount.target: mount for mount in mounts(service)}
    for mount in mounts(common):
        assert targets.get(mount.target) == mount, f"{name}: lacks the common mount {mount}"
    if name not in ONE_SHOT:
        assert service.get("user") == common["user"], f"{name}: must run as the common user"


def test_only_airflow_services_run_the_airflow_image(services: dict[str, Any], common: dict[str, Any]) -> None:
    airflow_image_users = {name for name, service in services.items() if service.get("image") == common["image"]}
    assert airflow_image_users == AIRFLOW_SERVICES


def test_executor_and_execution_api_url(services: dict[str, Any], common: dict[str, Any]) -> None:
    env = environment(common)
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == EXECUTION_API_URL
    api = urlsplit(EXECUTION_API_URL)
    apiserver = services[api.hostname or ""]
    assert command_argv(apiserver) == ["api-server"]
    published = [str(port).rsplit(":", 1)[-1] for port in apiserver.get("ports", [])]
    assert str(api.port) in published, f"the API server does not listen on {api.port}: {published}"


def test_common_settings(common: dict[str, Any]) -> None:
    env = environment(common)
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "false"
    assert env["ERP_BACKUP_ROOT"] == "/backup"
    base_url = REFERENCE.fullmatch(env["AIRFLOW__API__BASE_URL"])
    assert base_url and base_url["op"] == ":-" and base_url["arg"].startswith(("http://", "https://")), (
        "AIRFLOW__API__BASE_URL must come from .env with a URL default"
    )
    assert common["user"] == "${AIRFLOW_UID:-50000}:0"
    by_target = {mount.target: mount for mount in mounts(common)}
    for name, target in COMMON_MOUNTS.items():
        assert target in by_target, f"x-airflow-common does not mount {target}"
        assert by_target[target].source == f"./{name}"


@pytest.mark.parametrize("name", sorted((AIRFLOW_SERVICES | BACKENDS | ERP_SERVICES) - ONE_SHOT))
def test_long_running_service_has_a_healthcheck(name: str, services: dict[str, Any]) -> None:
    check = services[name].get("healthcheck") or {}
    test = check.get("test")
    assert not check.get("disable"), f"{name}: healthcheck disabled"
    assert isinstance(test, list) and test[0] in {"CMD", "CMD-SHELL"} and len(test) > 1, (
        f"{name}: healthcheck.test must be [CMD|CMD-SHELL, ...], got {test!r}"
    )


def test_every_dependency_has_a_condition(services: dict[str, Any]) -> None:
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on must be a mapping with conditions"
        for target, spec in depends.items():
            assert target in services, f"{name} depends on unknown service {target}"
            assert spec.get("condition") in conditions, f"{name} -> {target}: no valid condition"
            if name not in ERP_SERVICES:
                assert target not in ERP_SERVICES, f"{name} depends on {target}, which only runs with --profile erp"


@pytest.mark.parametrize("name", sorted(AIRFLOW_SERVICES))
def test_airflow_component_waits_for_its_backends_and_init(name: str, services: dict[str, Any]) -> None:
    depends = services[name]["depends_on"]
    for backend in BACKENDS:
        assert depends[backend]["condition"] == "service_healthy", f"{name} must wait for a healthy {backend}"
    if name not in ONE_SHOT:
        assert depends["airflow-init"]["condition"] == "service_completed_successfully"
    if name in WORKERS:
        assert depends["airflow-apiserver"]["condition"] == "service_healthy"


# ------------------------------------------------------------------ backups, queue and Docker socket
def test_backup_volume_mounted_only_where_backups_run(services: dict[str, Any]) -> None:
    mounters = {name for name, service in services.items() if any(m.target == "/backup" for m in mounts(service))}
    assert mounters == BACKUP_MOUNTERS
    init_mount = next(m for m in mounts(services["airflow-init"]) if m.target == "/backup")
    for worker in (BACKUP_WORKER, DRILL_WORKER):
        worker_mount = next(m for m in mounts(services[worker]) if m.target == "/backup")
        assert not worker_mount.read_only, f"{worker} writes /backup (sets, drill records)"
        assert worker_mount.source == init_mount.source, "airflow-init must prepare the volume the workers use"
    assert is_required_reference(init_mount.source), "the host directory for /backup must be set in .env"


def test_docker_socket_mounted_only_on_the_backup_and_drill_workers(services: dict[str, Any]) -> None:
    socket_users = {
        name
        for name, service in services.items()
        if any("docker.sock" in m.source or "docker.sock" in m.target for m in mounts(service))
    }
    assert socket_users == SOCKET_MOUNTERS
    for name in SOCKET_MOUNTERS:
        worker = services[name]
        assert any(m.target == DOCKER_SOCKET for m in mounts(worker))
        assert environment(worker)["DOCKER_HOST"] == f"unix://{DOCKER_SOCKET}"
        assert worker.get("group_add"), f"{name} needs the socket's group (DOCKER_GID)"
    assert environment(services[DRILL_WORKER])["ERP_DRILL_WORKER_CONTAINER"] == "auto"


def test_backup_and_drill_queues_are_served_only_by_their_workers(services: dict[str, Any]) -> None:
    celery_workers = {name for name, service in services.items() if command_argv(service)[:2] == ["celery", "worker"]}
    assert celery_workers == WORKERS
    assert worker_queues(services[BACKUP_WORKER]) == {BACKUP_QUEUE}
    assert worker_queues(services[DRILL_WORKER]) == {DRILL_QUEUE}
    for name in WORKERS - {BACKUP_WORKER, DRILL_WORKER}:
        assert not {BACKUP_QUEUE, DRILL_QUEUE} & worker_queues(services[name]), f"{name} must not take backup or drill tasks"
        assert DEFAULT_QUEUE in worker_queues(services[name])


def test_connections_reach_the_backup_worker_only_as_env_references(services: dict[str, Any]) -> None:
    worker_env = environment(services[BACKUP_WORKER])
    for conn_id in CONNECTION_IDS:
        key = f"AIRFLOW_CONN_{conn_id.upper()}"
        assert is_required_reference(worker_env.get(key)), f"{BACKUP_WORKER}: {key} must be ${{...}} from .env"
    backup_only = {f"AIRFLOW_CONN_{conn_id.upper()}" for conn_id in CONNECTION_IDS - ALERT_CONNECTIONS}
    for name in services.keys() - {BACKUP_WORKER, DRILL_WORKER}:
        leaked = (backup_only | {PRUNE_CONN, RECIPIENTS_CONN, IDENTITY_CONN}) & environment(services[name]).keys()
        assert not leaked, f"{name} runs no backups and must not hold {sorted(leaked)}"


def test_only_the_drill_worker_can_decrypt_and_only_the_backup_worker_can_delete(services: dict[str, Any]) -> None:
    """A stolen backup-worker key can write backups, never read one back; the drill's can read, never delete."""
    backup_env, drill_env = environment(services[BACKUP_WORKER]), environment(services[DRILL_WORKER])
    assert is_required_reference(backup_env.get(PRUNE_CONN)) and is_required_reference(backup_env.get(RECIPIENTS_CONN))
    assert IDENTITY_CONN not in backup_env, f"{BACKUP_WORKER} must not hold the age identity"
    assert is_required_reference(drill_env.get(IDENTITY_CONN)), f"{DRILL_WORKER}: {IDENTITY_CONN} must come from .env"
    assert PRUNE_CONN not in drill_env and RECIPIENTS_CONN not in drill_env
    sources = {f"AIRFLOW_CONN_{c.upper()}" for c in CONNECTION_IDS - ALERT_CONNECTIONS - {"backup_offsite"}}
    assert sources <= drill_env.keys(), "the drill checks scratch targets against every production address"
    assert is_required_reference(drill_env.get("AIRFLOW_CONN_BACKUP_OFFSITE"))


# ------------------------------------------------------------------ secrets
def test_no_literal_secrets_in_environment(compose: dict[str, Any]) -> None:
    assert literal_secrets(compose) == []


def test_no_literal_credentials_anywhere(compose: dict[str, Any]) -> None:
    assert literal_url_credentials(compose) == []


def test_secret_checks_catch_literals() -> None:
    leaky = {
        "x-env": {"AIRFLOW_CONN_X": "postgresql://u:${P:?x}@h/db", "SAFE": "${OK:?x}"},
        "services": {
            "a": {"environment": {"POSTGRES_PASSWORD": "airflow", "FERNET_KEY": "${K:-abc}", "TOKEN": "${T:?x}"}},
            "b": {"environment": ["RABBITMQ_DEFAULT_PASS=guest", "REDISCLI_AUTH=${R}"]},
            "c": {"command": "psql postgresql://postgres:postgres@db/x", "environment": {"URL": "redis://:${P:-pw}@r"}},
            "d": {"healthcheck": {"test": ["CMD", "curl", "http://u:${P:?x}@h"]}},
        },
    }
    assert sorted(literal_secrets(leaky)) == [
        "services.a.environment.FERNET_KEY = '${K:-abc}'",
        "services.a.environment.POSTGRES_PASSWORD = 'airflow'",
        "services.b.environment.RABBITMQ_DEFAULT_PASS = 'guest'",
        "x-env.AIRFLOW_CONN_X = 'postgresql://u:${P:?x}@h/db'",
    ]
    assert literal_url_credentials(leaky) == [
        "services.c.command: 'postgres:postgres@db'",
        "services.c.environment.URL: ':pw@r'",
    ]


# ------------------------------------------------------------------ .env.example
def test_env_example_defines_every_variable_the_compose_file_reads(
    compose: dict[str, Any], env_example: dict[str, str]
) -> None:
    referenced = referenced_variables(compose)
    assert referenced, "no ${VAR} found: the parser is broken"
    assert sorted(referenced - env_example.keys()) == [], "add these to .env.example"
    assert sorted(env_example.keys() - referenced - COMPOSE_OWN_VARIABLES) == [], \
        ".env.example defines variables nothing reads"


def test_the_project_name_comes_from_env_example_not_a_top_level_key(
    compose: dict[str, Any], env_example: dict[str, str]
) -> None:
    """Debian's docker-compose 1.29 rejects a top-level `name:` (and `configs` with `content`)."""
    assert "name" not in compose and "configs" not in compose
    assert env_example.get("COMPOSE_PROJECT_NAME") == "erp-backup"


def test_variable_parser_follows_compose_escapes() -> None:
    doc = {"a": "x ${ONE:?set ONE} $TWO $${NOT_ME} $$THREE_NOT ${FOUR:-d}", "b": ["${FIVE}"]}
    assert referenced_variables(doc) == {"ONE", "TWO", "FOUR", "FIVE"}


def test_env_example_holds_placeholders_only(env_example: dict[str, str]) -> None:
    for key, value in env_example.items():
        if key.startswith("AIRFLOW_CONN_"):
            continue
        if SECRET_NAME.search(key):
            assert value == PLACEHOLDER, f".env.example: {key} must be {PLACEHOLDER!r}, not a real value"


def connection_fields(value: str) -> dict[str, Any]:
    """An AIRFLOW_CONN_* value (URI or JSON) as conn_type/login/password/extra."""
    if value.lstrip().startswith("{"):
        return json.loads(value)
    uri = urlsplit(value)
    return {"conn_type": uri.scheme, "host": uri.hostname, "login": uri.username, "password": uri.password}


@pytest.mark.parametrize("conn_id", sorted(CONNECTION_IDS))
def test_env_example_connection_is_a_placeholder(conn_id: str, env_example: dict[str, str]) -> None:
    key = f"AIRFLOW_CONN_{conn_id.upper()}"
    assert key in env_example, f".env.example lacks {key}"
    fields = connection_fields(env_example[key])
    assert fields.get("conn_type"), f"{key} has no conn_type"
    assert fields.get("host") or fields.get("password"), f"{key} names no host (nor a webhook URL)"
    if fields.get("password") is not None:
        assert PLACEHOLDER in fields["password"], f"{key}: password must be the {PLACEHOLDER!r} placeholder"
    for extra_key, extra_value in (fields.get("extra") or {}).items():
        if SECRET_NAME.search(extra_key):
            assert extra_value == PLACEHOLDER, f"{key}: extra.{extra_key} must be a placeholder"


def test_env_example_connection_types(env_example: dict[str, str]) -> None:
    offsite = connection_fields(env_example["AIRFLOW_CONN_BACKUP_OFFSITE"])
    assert offsite["conn_type"] == "aws" and offsite["extra"]["endpoint_url"].startswith(("http://", "https://"))
    assert connection_fields(env_example["AIRFLOW_CONN_SLACK_BACKUP_ALERTS"])["conn_type"] == "slackwebhook"
    assert connection_fields(env_example["AIRFLOW_CONN_ERP_POSTGRES"])["conn_type"] in {"postgres", "postgresql"}


# ------------------------------------------------------------------ profile `erp`
def test_erp_services_exist_only_in_the_erp_profile(services: dict[str, Any]) -> None:
    in_erp = {name for name, service in services.items() if "erp" in (service.get("profiles") or [])}
    assert in_erp == ERP_SERVICES
    for name in ERP_SERVICES:
        assert services[name]["profiles"] == ["erp"], f"{name} must be in the erp profile only"
        assert services[name].get("container_name") == name, f"{name}: docker exec targets need a fixed name"
    for name in services.keys() - ERP_SERVICES:
        assert not services[name].get("profiles"), f"{name} must start without a profile"


def test_erp_postgres_archives_wal_with_our_script(services: dict[str, Any]) -> None:
    service = services["erp-postgres"]
    assert service["image"] == "postgres:15"
    settings = postgres_settings(service)
    assert settings.get("wal_level") == "replica"
    assert settings.get("archive_mode") == "on"
    match = re.search(r"(?P<script>\S+/archive_wal\.sh) %p %f (?P<archive>/\S+)", settings.get("archive_command", ""))
    assert match, f"archive_command must call archive_wal.sh %p %f <dir>: {settings.get('archive_command')!r}"
    by_target = {m.target: m for m in mounts(service)}
    script_dir = str(Path(match["script"]).parent)
    assert by_target[script_dir].source == "./include/scripts" and by_target[script_dir].read_only
    # The wal job reads $ERP_BACKUP_ROOT/postgres/wal_archive by default: the same host directory.
    backup_source = next(m.source for m in mounts(services[BACKUP_WORKER]) if m.target == "/backup")
    assert by_target[match["archive"]].source == f"{backup_source}/postgres/wal_archive"


def test_milvus_standalone_has_its_own_etcd_and_minio(services: dict[str, Any]) -> None:
    milvus = services["erp-milvus"]
    assert milvus["image"].startswith("milvusdb/milvus:")
    assert command_argv(milvus) == ["milvus", "run", "standalone"]
    env = environment(milvus)
    assert env["ETCD_ENDPOINTS"].split(":")[0] == "erp-milvus-etcd"
    assert env["MINIO_ADDRESS"].split(":")[0] == "erp-milvus-minio"
    assert services["erp-milvus-etcd"]["image"].startswith("quay.io/coreos/etcd:")
    assert services["erp-milvus-minio"]["image"].startswith("minio/minio")
    assert services["erp-minio"]["image"].startswith("minio/minio")
    assert services["erp-rabbitmq"]["image"] == "rabbitmq:3-management"
    assert services["erp-redis"]["image"].startswith("redis:")


def test_named_volumes_are_declared(compose: dict[str, Any], services: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for mount in mounts(service):
            named = mount.source and not mount.source.startswith((".", "/", "$", "~"))
            if named:
                assert mount.source in declared, f"{name}: volume {mount.source!r} is not declared"


# ------------------------------------------------------------------ Dockerfile
def test_dockerfile_extends_airflow_with_requirements_and_client_tools(common: dict[str, Any]) -> None:
    assert (ROOT / common["build"]["context"] / common["build"]["dockerfile"]).resolve() == DOCKERFILE_PATH
    instructions = dockerfile_instructions()
    args = dict(arg.split("=", 1) for keyword, arg in instructions if keyword == "ARG" and "=" in arg)
    base = next(arg for keyword, arg in instructions if keyword == "FROM")
    base = REFERENCE.sub(lambda m: args.get(m["name"], ""), base)
    assert base.startswith("apache/airflow:3.3.2"), f"FROM {base}"
    runs = [arg for keyword, arg in instructions if keyword == "RUN"]
    pip = [run for run in runs if "pip install" in run]
    assert any('"apache-airflow==${AIRFLOW_VERSION}"' in run and "-r /requirements.txt" in run for run in pip), pip
    apt = " ".join(run for run in runs if "apt-get install" in run).split()
    for package in ("postgresql-client-15", "zstd", "etcd-client", "redis-tools"):
        assert package in apt, f"Dockerfile does not install {package}"
    users = [arg for keyword, arg in instructions if keyword == "USER"]
    assert users and users[-1] == "airflow", "the image must end as the airflow user"
