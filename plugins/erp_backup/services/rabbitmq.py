"""RabbitMQ: definitions export (users, vhosts, permissions, queues, exchanges, bindings, policies, parameters).

Two modes, chosen by the plan option or connection extra ``mode``:

- ``rabbitmqctl`` (default): ``rabbitmqctl export_definitions -`` streams JSON to stdout; no
  management plugin needed. The node comes from the connection extra ``node`` (else
  ``rabbit@<host>``, or the CLI's default node for a local host).
- ``http``: ``GET /api/definitions`` on the management API with basic auth from the
  connection (extra ``management_url``, or ``http://<host>:<management_port|15672>``).

The export holds password hashes: it is written 0600 as ``definitions.json`` (kept
uncompressed so an operator can import it by hand) and its content is never logged.
Restore imports it with ``rabbitmqctl import_definitions`` from stdin (so no extra copy of
the hashes lands on disk) or ``POST /api/definitions``, optionally only for selected
vhosts, then re-exports and checks that every imported object is present.

Messages are not backed up. A definitions export describes the broker's topology and
access rules (vhosts, users and their password hashes, permissions, exchanges, queues,
bindings, policies and parameters) but not the messages sitting in queues. In ALL-ERP,
RabbitMQ carries work in flight: messages are transient by design, produced again by
their publishers or consumed within seconds, and the durable state they lead to lives
in PostgreSQL, which has its own backups. Copying queue contents would need the broker
stopped (or a shovel draining every queue) and would replay stale work on restore. After
a restore, queues come back empty; publishers must be able to resend, and consumers must
stay idempotent.
"""

from __future__ import annotations

import json
import logging
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

from erp_backup.manifest import Manifest
from erp_backup.runner import Command, CommandError, DockerExecutor, Executor, LocalExecutor, docker_api
from erp_backup.services.base import (
    BackupContext,
    BackupOutcome,
    CheckContext,
    Checks,
    CliTarget,
    ContainerSpec,
    RestoreReport,
    ScratchSpec,
    SourceUnavailable,
    TargetUsageError,
    connection_for,
)
from erp_backup.services.base import newest_set_at as sets_at  # noqa: F401
from erp_backup.services.base import no_after_prune as after_prune  # noqa: F401
from erp_backup.services.base import no_point_in_time as plan_point_in_time  # noqa: F401
from erp_backup.services.base import no_point_in_time_range as point_in_time_range  # noqa: F401
from erp_backup.services.base import no_protected_sets as protected_sets  # noqa: F401
from erp_backup.services.base import no_records as read_records  # noqa: F401
from erp_backup.services.base import no_restore_to_time as restore_to_time  # noqa: F401
from erp_backup.sets import BackupSet
from erp_backup.stream import stream_to_file

if TYPE_CHECKING:
    from erp_backup.scratch.base import TargetInfo

log = logging.getLogger(__name__)

SUPPORTED_TYPES = frozenset({"definitions"})
RESTORE_TYPES = frozenset({"definitions"})
DRILL_TYPES = frozenset({"definitions"})
PITR_TYPES: frozenset[str] = frozenset()
RESTORE_OPTIONS = frozenset({"vhosts"})
DEFAULT_PORTS = {"source": 5672}
CLEAR_DETAILS = frozenset({"rabbitmq_version"})
DEFINITIONS_FILE = "definitions.json"
MODES = ("rabbitmqctl", "http")
DEFAULT_MANAGEMENT_PORT = 15672
HTTP_TIMEOUT_S = 60.0
HTTP_CHUNK = 1 << 16
# rabbitmqctl exits 69 (EX_UNAVAILABLE) when it cannot reach or authenticate to the node.
EXIT_UNAVAILABLE = 69
_LOCAL_HOSTS = frozenset({"", "localhost", "127.0.0.1", "::1"})

# The sections counted in the manifest and checked on verify.
COUNTED = ("vhosts", "queues", "exchanges", "bindings", "users", "policies", "permissions",
           "topic_permissions", "parameters", "global_parameters")
# The sections scoped to a vhost, filtered by a selective restore.
VHOST_SCOPED = ("queues", "exchanges", "bindings", "policies", "permissions", "topic_permissions", "parameters")


class DefinitionsError(ValueError):
    """A definitions export is unreadable or does not match its manifest."""


@dataclass(frozen=True)
class RabbitEndpoint:
    """Where definitions come from or go to, from a connection or a restore target."""

    mode: Literal["rabbitmqctl", "http"] = "rabbitmqctl"
    host: str = "127.0.0.1"
    port: int | None = None
    node: str | None = None
    longnames: bool = False
    management_url: str | None = None
    login: str | None = None
    password: str | None = field(default=None, repr=False)
    erlang_cookie: str | None = field(default=None, repr=False)
    verify_tls: bool | str = True
    exec_mode: Literal["local", "docker"] = "local"
    container: str | None = None
    docker_conn_id: str | None = None

    @classmethod
    def from_connection(cls, conn: Any, options: Mapping[str, Any] | None = None) -> RabbitEndpoint:
        """Connection fields plus its extra; plan options override the extra."""
        settings = {**(getattr(conn, "extra_dejson", None) or {}), **(options or {})}
        mode = settings.get("mode", "rabbitmqctl")
        if mode not in MODES:
            raise ValueError(f"rabbitmq mode must be one of {', '.join(MODES)}, got {mode!r}")
        host = conn.host or "127.0.0.1"
        node = settings.get("node")
        if not node and host not in _LOCAL_HOSTS:
            node = f"rabbit@{host}"
        management_url = settings.get("management_url") or (
            f"{settings.get('scheme', 'http')}://{host}:{settings.get('management_port', DEFAULT_MANAGEMENT_PORT)}"
        )
        return cls(
            mode=mode,
            host=host,
            port=conn.port,
            node=node,
            longnames=bool(settings.get("longnames", False)),
            management_url=management_url.rstrip("/"),
            login=conn.login or None,
            password=conn.password or None,
            erlang_cookie=settings.get("erlang_cookie"),
            verify_tls=settings.get("verify", True),
            exec_mode=settings.get("exec_mode", "local"),
            container=settings.get("container"),
            docker_conn_id=settings.get("docker_conn_id"),
        )

    @property
    def where(self) -> str:
        if self.mode == "http":
            return f"management API {self.management_url}"
        return f"node {self.node or '(CLI default)'} on {self.host}"


# -- commands (pure) ----------------------------------------------------------------------------------


def ctl_command(endpoint: RabbitEndpoint, *args: str) -> Command:
    """rabbitmqctl against the endpoint's node; an Erlang cookie travels only in the environment."""
    argv: list[str] = ["rabbitmqctl"]
    if endpoint.node:
        argv += ["--node", endpoint.node]
    if endpoint.longnames:
        argv.append("--longnames")
    argv += ["--quiet", *args]
    env = {"RABBITMQ_ERLANG_COOKIE": endpoint.erlang_cookie} if endpoint.erlang_cookie else {}
    return Command(tuple(argv), env)


def export_command(endpoint: RabbitEndpoint) -> Command:
    return ctl_command(endpoint, "export_definitions", "-", "--format", "json")


def import_command(endpoint: RabbitEndpoint) -> Command:
    """Import definitions read from stdin (no file argument: 3.10's CLI takes "-" for a file name)."""
    return ctl_command(endpoint, "import_definitions", "--format", "json")


def version_command(endpoint: RabbitEndpoint) -> Command:
    return ctl_command(endpoint, "version")


@dataclass(frozen=True)
class HttpRequest:
    method: str
    url: str
    auth: tuple[str, str] | None = field(default=None, repr=False)

    @property
    def user(self) -> str | None:
        return self.auth[0] if self.auth else None


def definitions_request(endpoint: RabbitEndpoint, method: str = "GET", vhost: str | None = None) -> HttpRequest:
    """The management API call for (all or one vhost's) definitions, basic auth from the connection."""
    url = f"{endpoint.management_url}/api/definitions"
    if vhost is not None:
        url += "/" + quote(vhost, safe="")
    auth = (endpoint.login or "", endpoint.password or "") if endpoint.login else None
    return HttpRequest(method, url, auth)


# -- pure helpers ------------------------------------------------------------------------------------


def count_definitions(definitions: Mapping[str, Any]) -> dict[str, int]:
    return {section: len(definitions.get(section) or []) for section in COUNTED}


def select_vhosts(definitions: Mapping[str, Any], vhosts: Iterable[str]) -> dict[str, Any]:
    """The part of a full export that belongs to `vhosts`, plus the users their permissions name.

    Cluster-wide sections (global parameters) are left out: a selective restore must not
    change anything outside the chosen vhosts except re-creating the users they need.
    """
    wanted = set(vhosts)
    available = {vhost["name"] for vhost in definitions.get("vhosts") or []}
    unknown = sorted(wanted - available)
    if unknown:
        raise DefinitionsError(
            f"vhost(s) {', '.join(unknown)} not in this backup (it has: {', '.join(sorted(available)) or 'none'})"
        )
    selected: dict[str, Any] = {
        key: value for key, value in definitions.items() if key in ("rabbit_version", "rabbitmq_version")
    }
    selected["vhosts"] = [vhost for vhost in definitions.get("vhosts") or [] if vhost["name"] in wanted]
    for section in VHOST_SCOPED:
        selected[section] = [item for item in definitions.get(section) or [] if item.get("vhost") in wanted]
    needed_users = {item["user"] for item in selected["permissions"] + selected["topic_permissions"]}
    selected["users"] = [user for user in definitions.get("users") or [] if user["name"] in needed_users]
    selected["global_parameters"] = []
    return selected


def _identity(section: str, item: Mapping[str, Any]) -> str:
    """A stable name for one object of a section, used to compare two exports."""
    if section in ("vhosts", "users", "global_parameters"):
        return item["name"]
    if section == "permissions":
        return f"{item['user']}@{item['vhost']}"
    if section == "topic_permissions":
        return f"{item['user']}@{item['vhost']}:{item['exchange']}"
    if section == "bindings":
        arguments = json.dumps(item.get("arguments") or {}, sort_keys=True)
        return (f"{item['vhost']}:{item['source']}->{item['destination_type']}:{item['destination']}"
                f"[{item.get('routing_key', '')}]{arguments}")
    if section == "parameters":
        return f"{item['vhost']}:{item['component']}:{item['name']}"
    return f"{item['vhost']}:{item['name']}"


def missing_definitions(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> dict[str, list[str]]:
    """Per section, the objects of `expected` that `actual` lacks (empty dict: all present)."""
    missing: dict[str, list[str]] = {}
    for section in COUNTED:
        have = {_identity(section, item) for item in actual.get(section) or []}
        lacking = sorted(_identity(section, item) for item in expected.get(section) or []
                         if _identity(section, item) not in have)
        if lacking:
            missing[section] = lacking
    return missing


def parse_definitions(data: bytes, origin: str) -> dict[str, Any]:
    try:
        definitions = json.loads(data)
    except json.JSONDecodeError as exc:
        raise DefinitionsError(f"{origin}: not valid JSON ({exc.msg} at char {exc.pos})") from None
    except ValueError as exc:  # bytes that do not decode as UTF-8/16/32
        raise DefinitionsError(f"{origin}: not valid JSON ({exc})") from None
    if not isinstance(definitions, dict) or "vhosts" not in definitions:
        raise DefinitionsError(f"{origin}: not a RabbitMQ definitions export (no 'vhosts' section)")
    return definitions


# -- talking to RabbitMQ -----------------------------------------------------------------------------


def _executor(endpoint: RabbitEndpoint) -> Executor:
    if endpoint.exec_mode == "docker":
        if not endpoint.container:
            raise ValueError("rabbitmq exec_mode 'docker' needs a 'container' option")
        return DockerExecutor(docker_api(endpoint.docker_conn_id), endpoint.container)
    return LocalExecutor()


class _Broker:
    """Definitions in and out of one broker, with errors that name the connection and host."""

    def __init__(self, endpoint: RabbitEndpoint, label: str, executor: Executor | None = None):
        self.endpoint, self.label = endpoint, label
        self._executor = executor

    @property
    def executor(self) -> Executor:
        if self._executor is None:
            self._executor = _executor(self.endpoint)
        return self._executor

    def _ctl_error(self, exc: CommandError) -> Exception:
        lines = [line for line in exc.stderr.strip().splitlines() if line.strip()]
        detail = lines[0] if lines else str(exc)
        if exc.returncode in (EXIT_UNAVAILABLE, None) or "unable to perform an operation on node" in exc.stderr:
            return SourceUnavailable(
                f"{self.label}: RabbitMQ {self.endpoint.where} is unreachable: {detail} "
                "(check the node name, the Erlang cookie and that the broker runs)"
            )
        return RuntimeError(f"{self.label}: rabbitmqctl failed on {self.endpoint.where} (exit {exc.returncode}): "
                            f"{detail}")

    def _http_error(self, response: Any) -> Exception:
        where = f"{self.label}: RabbitMQ {self.endpoint.where}"
        if response.status_code in (401, 403):
            return SourceUnavailable(f"{where} rejected the credentials of user {self.endpoint.login!r} "
                                     f"(HTTP {response.status_code}); fix the login/password there")
        if response.status_code == 404:
            return SourceUnavailable(f"{where} has no /api/definitions (HTTP 404): is rabbitmq_management enabled?")
        return RuntimeError(f"{where} answered HTTP {response.status_code}")

    def _send(self, request: HttpRequest, **kwargs: Any) -> Any:
        import requests

        log.info("%s %s (user %s)", request.method, request.url, request.user)
        try:
            response = requests.request(
                request.method, request.url, auth=request.auth, timeout=HTTP_TIMEOUT_S,
                verify=self.endpoint.verify_tls, **kwargs,
            )
        except requests.RequestException as exc:
            raise SourceUnavailable(
                f"{self.label}: RabbitMQ {self.endpoint.where} on host {self.endpoint.host} is unreachable: "
                f"{type(exc).__name__}"
            ) from exc
        if response.status_code >= 300:
            response.close()
            raise self._http_error(response)
        return response

    def export_chunks(self) -> Iterator[bytes]:
        """The definitions export as a byte stream (never logged)."""
        if self.endpoint.mode == "http":
            response = self._send(definitions_request(self.endpoint), stream=True)
            with response:
                yield from response.iter_content(HTTP_CHUNK)
            return
        try:
            yield from self.executor.stream(export_command(self.endpoint))
        except CommandError as exc:
            raise self._ctl_error(exc) from exc

    def export(self) -> dict[str, Any]:
        return parse_definitions(b"".join(self.export_chunks()), f"{self.label} export")

    def import_definitions(self, definitions: Mapping[str, Any]) -> int:
        """Import `definitions`; returns the size of the JSON sent."""
        body = json.dumps(definitions).encode()
        if self.endpoint.mode == "http":
            self._send(definitions_request(self.endpoint, "POST"), data=body,
                       headers={"content-type": "application/json"}).close()
            return len(body)
        try:
            self.executor.run(import_command(self.endpoint), stdin=body)
        except CommandError as exc:
            raise self._ctl_error(exc) from exc
        return len(body)

    def tool_versions(self) -> dict[str, str]:
        if self.endpoint.mode == "http":
            import requests

            return {"requests": requests.__version__}
        try:
            version = self.executor.run(version_command(self.endpoint)).decode().strip()
        except CommandError as exc:
            raise self._ctl_error(exc) from exc
        return {"rabbitmqctl": version}


# -- the service verbs -------------------------------------------------------------------------------


def backup(ctx: BackupContext, executor: Executor | None = None) -> BackupOutcome:
    """Export definitions to definitions.json (0600) and count what it holds."""
    conn_id = ctx.conn_id("source")
    endpoint = RabbitEndpoint.from_connection(ctx.connection("source"), ctx.options)
    broker = _Broker(endpoint, f"connection {conn_id!r}", executor)
    exported: list[bytes] = []  # kept as it streams: the file may be encrypted (erp_backup.crypto)

    def keeping(chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            exported.append(chunk)
            yield chunk

    result = stream_to_file(keeping(broker.export_chunks()), ctx.set_dir, DEFINITIONS_FILE, compress=False)
    path = ctx.set_dir / DEFINITIONS_FILE
    try:
        definitions = parse_definitions(b"".join(exported), f"{conn_id} export")
    except DefinitionsError:
        path.unlink()
        raise
    version = definitions.get("rabbitmq_version") or definitions.get("rabbit_version") or "unknown"
    counts = count_definitions(definitions)
    log.info("exported RabbitMQ definitions from %s: %s", endpoint.where,
             ", ".join(f"{count} {section}" for section, count in counts.items()))
    return BackupOutcome(
        files=[result.entry],
        source={"conn_id": conn_id, "host": endpoint.host, "port": endpoint.port, "version": version,
                "mode": endpoint.mode, "node": endpoint.node},
        tools=broker.tool_versions(),
        details={
            "mode": endpoint.mode,
            "file": DEFINITIONS_FILE,
            "rabbitmq_version": version,
            "counts": counts,
            "vhosts": sorted(vhost["name"] for vhost in definitions.get("vhosts") or []),
            "messages_included": False,
        },
    )


def verify(backup_set: BackupSet, manifest: Manifest) -> list[str]:
    """The export parses, is private (0600), and holds exactly the counts the manifest recorded."""
    path = backup_set.path / DEFINITIONS_FILE
    if not path.is_file():
        return [f"{backup_set.key}: {DEFINITIONS_FILE} is missing"]
    problems: list[str] = []
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        problems.append(f"{backup_set.key}: {DEFINITIONS_FILE} holds password hashes but has mode {mode:o}, not 600")
    try:
        definitions = parse_definitions(path.read_bytes(), f"{backup_set.key}/{DEFINITIONS_FILE}")
    except DefinitionsError as exc:
        return [*problems, str(exc)]
    recorded = manifest.details.get("counts")
    if not recorded:
        return [*problems, f"{backup_set.key}: manifest has no definition counts"]
    counts = count_definitions(definitions)
    for section in COUNTED:
        if section in recorded and recorded[section] != counts[section]:
            problems.append(f"{backup_set.key}: {counts[section]} {section} in the file, manifest says "
                            f"{recorded[section]}")
    return problems


# -- restore and the drill's checks ------------------------------------------------------------------


def _target_endpoint(target: Any) -> RabbitEndpoint:
    if isinstance(target, RabbitEndpoint):
        return target
    if target is None or isinstance(target, Mapping):
        spec = dict(target or {})
        unknown = set(spec) - set(RabbitEndpoint.__dataclass_fields__)
        if unknown:
            raise ValueError(f"rabbitmq restore target: unknown keys {sorted(unknown)}")
        return RabbitEndpoint(**spec)
    return RabbitEndpoint.from_connection(target)  # an Airflow connection


def _selection(definitions: dict[str, Any], options: Mapping[str, Any] | None) -> tuple[dict[str, Any], bool]:
    """The definitions to import (only the `vhosts` option's, if given) and whether that is a selection."""
    unknown = sorted(set(options or {}) - RESTORE_OPTIONS)
    if unknown:
        raise ValueError(f"rabbitmq restore: unknown option(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(RESTORE_OPTIONS))})")
    vhosts = (options or {}).get("vhosts")
    if vhosts is None:
        return definitions, False
    return select_vhosts(definitions, [vhosts] if isinstance(vhosts, str) else vhosts), True


def missing_problems(missing: Mapping[str, list[str]]) -> list[str]:
    """One sentence per section with objects missing after an import (the first ten named)."""
    return [f"{section} missing after import: {', '.join(names[:10])}"
            + (f" and {len(names) - 10} more" if len(names) > 10 else "") for section, names in missing.items()]


def _import_and_check(endpoint: RabbitEndpoint, definitions: Mapping[str, Any], report: RestoreReport) -> None:
    broker = _Broker(endpoint, f"restore target {endpoint.where}")
    importing = time.monotonic()
    report.restored_bytes = broker.import_definitions(definitions)
    report.actions.append(f"imported the definitions ({report.restored_bytes} bytes) into {endpoint.where}")
    report.details["import_seconds"] = round(time.monotonic() - importing, 3)
    checking = time.monotonic()
    missing = missing_definitions(definitions, broker.export())
    report.problems += missing_problems(missing)
    report.checks += [f"{section}: {count} imported, all present after the import"
                      for section, count in report.details["imported"].items() if count and section not in missing]
    report.details.update(missing=missing, check_seconds=round(time.monotonic() - checking, 3))


def restore(set_dir: Path, manifest: Manifest, target: Any = None, *, dry_run: bool = False,
            options: Mapping[str, Any] | None = None) -> RestoreReport:
    """Import the backup's definitions into a broker and check every imported object is there.

    `target`: a RabbitEndpoint, a dict of its fields (`{}`: the local node via rabbitmqctl), or an
    Airflow connection. Option `vhosts`: restore only these vhosts, their objects and the users
    their permissions name. Objects missing after the import are the report's problems.
    """
    started = time.monotonic()
    endpoint = _target_endpoint(target)
    definitions = parse_definitions((Path(set_dir) / DEFINITIONS_FILE).read_bytes(),
                                    f"backup {manifest.backup_id}/{DEFINITIONS_FILE}")
    definitions, selective = _selection(definitions, options)
    counts = count_definitions(definitions)
    summary = ", ".join(f"{count} {section}" for section, count in counts.items())
    report = RestoreReport(dry_run=dry_run, details={
        "backup_id": manifest.backup_id, "target": endpoint.where, "mode": endpoint.mode,
        "vhosts": sorted(vhost["name"] for vhost in definitions.get("vhosts") or []), "selective": selective,
        "imported": counts,
    })
    if dry_run:
        log.info("dry run: would import into %s: %s", endpoint.where, summary)
        report.actions = [f"import into {endpoint.where}: {summary}",
                          "export the broker's definitions again and check every imported object is there"]
        return report
    log.info("importing %s definitions of backup %s into %s (vhosts: %s)", "selected" if selective else "all",
             manifest.backup_id, endpoint.where, ", ".join(report.details["vhosts"]))
    _import_and_check(endpoint, definitions, report)
    report.details["total_seconds"] = round(time.monotonic() - started, 3)
    return report


def check_restored(target: Any, set_dir: Path, manifest: Manifest, report: RestoreReport,
                   ctx: CheckContext) -> Checks:
    """The drill's check: the scratch broker holds every object of the backup, and at least its counts."""
    endpoint = _target_endpoint(target)
    if endpoint.port:
        ctx.guard(endpoint.host, endpoint.port)
    exported = _Broker(endpoint, f"scratch {endpoint.where}").export()
    backup = parse_definitions((Path(set_dir) / DEFINITIONS_FILE).read_bytes(), f"backup {manifest.backup_id}")
    recorded = manifest.details.get("counts") or {}
    restored = count_definitions(exported)
    problems = [f"{section}: {restored[section]} on the scratch node, the backup has {count}"
                for section, count in recorded.items() if section in restored and restored[section] < count]
    problems += [f"{section} missing: {', '.join(names[:10])}"
                 for section, names in missing_definitions(backup, exported).items()]
    checks = [f"{section}: {count} in the backup, {restored.get(section)} on the scratch node"
              for section, count in sorted(recorded.items()) if count]
    return Checks(checks, problems)


# -- targets, versions, sizes -----------------------------------------------------------------------

TARGET_HELP = ("rabbitmq restores take --target local, --target <node name> (rabbit@host), or "
               "--target-conn <connection id> (its extra mode=http for the management API)")
SCRATCH_USER = "drill"


def target_from_cli(backup_type: str, target: str | None, target_conn: str | None,
                    get_connection: Callable[[str], Any]) -> CliTarget:
    """The local node, a node by name, or the broker a connection names."""
    if target_conn and target:
        raise TargetUsageError(f"give --target or --target-conn, not both: {TARGET_HELP}")
    if target_conn:
        try:
            endpoint = RabbitEndpoint.from_connection(connection_for(target_conn, get_connection))
        except ValueError as exc:
            raise TargetUsageError(f"--target-conn {target_conn}: {exc}") from exc
        return CliTarget(endpoint, f"{endpoint.where} (connection {target_conn!r})")
    if target in (None, "local"):
        return CliTarget(RabbitEndpoint(), "the local node (rabbitmqctl's default)")
    if "://" in target or "@" not in target:
        raise TargetUsageError(TARGET_HELP)
    return CliTarget(RabbitEndpoint(node=target), f"node {target} (rabbitmqctl)")


def _major_minor(version: Any) -> str | None:
    found = re.search(r"\d+(?:\.\d+)?", str(version)) if version else None
    return found.group(0) if found else None


def scratch_spec(backup_type: str, versions: Mapping[str, Any], *, pitr: bool = False) -> ScratchSpec:
    """A scratch node; in Docker the management image of the backed-up release (definitions go over HTTP)."""
    image = f"rabbitmq:{_major_minor(versions.get('rabbitmq')) or '3.10'}-management"
    return ScratchSpec("rabbitmq", ContainerSpec(image, DEFAULT_MANAGEMENT_PORT, {"RABBITMQ_DEFAULT_USER": SCRATCH_USER},
                                                 None, secret_env=("RABBITMQ_DEFAULT_PASS",)))


def scratch_target(info: TargetInfo) -> RabbitEndpoint:
    """A container's management API (no docker exec needed), or a local node through rabbitmqctl."""
    if info.container:
        host = info.host or "127.0.0.1"
        return RabbitEndpoint(mode="http", host=host, port=info.port, management_url=f"http://{host}:{info.port}",
                              login=SCRATCH_USER, password=info.secret)
    return RabbitEndpoint(mode="rabbitmqctl", host="127.0.0.1", port=info.port, node=info.node)


def versions(manifest: Manifest) -> dict[str, Any]:
    """The broker's release: rabbitmqctl's version, else the one the export names (http mode)."""
    version = manifest.tools.get("rabbitmqctl") or manifest.details.get("rabbitmq_version")
    return {"rabbitmq": version} if version and version != "unknown" else {}


def source_size(manifest: Manifest) -> int | None:
    """The export's size: definitions.json is stored uncompressed, so its manifest entry is the broker's export."""
    sizes = [entry.size for entry in manifest.files if entry.path == DEFINITIONS_FILE]
    return sizes[0] if sizes and sizes[0] > 0 else None
