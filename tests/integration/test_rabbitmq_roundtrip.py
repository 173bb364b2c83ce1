"""RabbitMQ definitions round trips.

rabbitmqctl mode runs against the machine's real broker with a throwaway vhost and user:
back up → delete them → restore only that vhost → check with rabbitmqctl that they are back.
http mode is tested at its boundary: a local HTTP server standing in for the management API.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import Connection

from erp_backup.manifest import FILE_MODE, Manifest
from erp_backup.scratch.base import free_port
from erp_backup.services import rabbitmq as svc
from erp_backup.services.base import CheckContext, RunInfo, SourceUnavailable
from erp_backup.sets import BackupSet
from tests.fixtures.factories import make_backup_context, make_manifest

pytestmark = pytest.mark.integration


def rabbitmqctl(*args: str, stdin: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["rabbitmqctl", "--quiet", *args], input=stdin, capture_output=True, check=check)


def listed(*args: str) -> list[dict[str, Any]]:
    return json.loads(rabbitmqctl(*args, "--formatter", "json").stdout)


def run_backup(root: Path, conn: Connection, options: dict[str, Any] | None = None) -> tuple[BackupSet, Manifest]:
    started = datetime.now(timezone.utc)
    ctx = make_backup_context(root, service="rabbitmq", backup_type="definitions", options=options,
                              run=RunInfo("backup_rabbitmq_definitions", "manual", started),
                              backup_id="20261126T034500Z", connection=conn)
    outcome = svc.backup(ctx)
    manifest = make_manifest(context=ctx, outcome=outcome, captured_started_at=started,
                             captured_finished_at=datetime.now(timezone.utc))
    return ctx.backup_set, manifest


LOCAL_BROKER = Connection(conn_id="erp_rabbitmq", conn_type="amqp", host="127.0.0.1", port=5672,
                          login="guest", password="guest")


@pytest.fixture
def throwaway_vhost() -> Iterator[dict[str, str]]:
    """A vhost with a durable queue, a topic exchange, a binding, a policy and a user with a password."""
    name = f"erp_test_{uuid.uuid4().hex[:12]}"
    objects = {"vhost": name, "user": name, "password": uuid.uuid4().hex, "queue": "erp.orders",
               "exchange": "erp.events", "routing_key": "order.*"}
    try:
        rabbitmqctl("add_vhost", name)
        rabbitmqctl("add_user", name, stdin=objects["password"].encode() + b"\n")
        rabbitmqctl("set_permissions", "-p", name, name, ".*", ".*", ".*")
        rabbitmqctl("set_policy", "-p", name, "erp-ttl", "^erp\\.", '{"message-ttl": 60000}', "--apply-to", "queues")
        topology = {
            "queues": [{"name": objects["queue"], "vhost": name, "durable": True, "auto_delete": False,
                        "arguments": {"x-queue-type": "classic"}}],
            "exchanges": [{"name": objects["exchange"], "vhost": name, "type": "topic", "durable": True,
                           "auto_delete": False, "internal": False, "arguments": {}}],
            "bindings": [{"source": objects["exchange"], "vhost": name, "destination": objects["queue"],
                          "destination_type": "queue", "routing_key": objects["routing_key"], "arguments": {}}],
        }
        rabbitmqctl("import_definitions", "--format", "json", stdin=json.dumps(topology).encode())
        yield objects
    finally:
        rabbitmqctl("delete_vhost", name, check=False)
        rabbitmqctl("delete_user", name, check=False)


def test_backup_delete_and_restore_one_vhost_on_the_real_broker(tmp_path: Path, throwaway_vhost, caplog):
    name = throwaway_vhost["vhost"]
    with caplog.at_level("DEBUG"):
        backup_set, manifest = run_backup(tmp_path, LOCAL_BROKER)

    path = backup_set.path / svc.DEFINITIONS_FILE
    assert [entry.path for entry in manifest.files] == [svc.DEFINITIONS_FILE]
    assert (path.stat().st_mode & 0o777) == FILE_MODE
    exported = json.loads(path.read_bytes())
    our_user = next(user for user in exported["users"] if user["name"] == name)
    assert our_user["password_hash"] and our_user["password_hash"] not in caplog.text
    assert name in manifest.details["vhosts"]
    counts = manifest.details["counts"]
    assert counts == svc.count_definitions(exported)
    assert counts["queues"] >= 1 and counts["bindings"] >= 1 and counts["policies"] >= 1 and counts["users"] >= 2
    assert manifest.source["conn_id"] == "erp_rabbitmq" and manifest.source["host"] == "127.0.0.1"
    assert manifest.source["version"] == exported["rabbitmq_version"]
    assert manifest.tools["rabbitmqctl"] == exported["rabbitmq_version"]
    assert manifest.details["messages_included"] is False
    assert svc.verify(backup_set, manifest) == []

    rabbitmqctl("delete_vhost", name)
    rabbitmqctl("delete_user", name)
    assert name not in [vhost["name"] for vhost in listed("list_vhosts", "name")]
    assert name not in [user["user"] for user in listed("list_users")]

    dry = svc.restore(backup_set.path, manifest, {}, dry_run=True, options={"vhosts": [name]})
    assert dry.dry_run and dry.details["imported"]["queues"] == 1
    assert name not in [vhost["name"] for vhost in listed("list_vhosts", "name")]

    with caplog.at_level("DEBUG"):
        report = svc.restore(backup_set.path, manifest, {}, options={"vhosts": [name]})
    assert report.ok and report.details["missing"] == {} and report.details["vhosts"] == [name]
    assert report.details["imported"]["users"] == 1 and report.details["imported"]["global_parameters"] == 0
    assert our_user["password_hash"] not in caplog.text

    # Independent checks with rabbitmqctl.
    queues = listed("list_queues", "-p", name, "name", "durable")
    assert queues == [{"name": throwaway_vhost["queue"], "durable": True}]
    exchanges = {item["name"]: item["type"] for item in listed("list_exchanges", "-p", name, "name", "type")}
    assert exchanges[throwaway_vhost["exchange"]] == "topic"
    bindings = listed("list_bindings", "-p", name, "source_name", "destination_name", "routing_key")
    assert {"source_name": throwaway_vhost["exchange"], "destination_name": throwaway_vhost["queue"],
            "routing_key": throwaway_vhost["routing_key"]} in bindings
    assert [policy["name"] for policy in listed("list_policies", "-p", name)] == ["erp-ttl"]
    assert [perm["user"] for perm in listed("list_permissions", "-p", name)] == [name]
    assert rabbitmqctl("authenticate_user", name, stdin=throwaway_vhost["password"].encode() + b"\n",
                       check=False).returncode == 0  # the password hash came back


def test_verify_flags_tampering(tmp_path: Path):
    backup_set, manifest = run_backup(tmp_path / "staging", LOCAL_BROKER)
    path = backup_set.path / svc.DEFINITIONS_FILE

    details = json.loads(json.dumps(manifest.details))
    details["counts"]["users"] += 1
    problems = svc.verify(backup_set, dataclasses.replace(manifest, details=details))
    assert len(problems) == 1 and "users in the file, manifest says" in problems[0]

    os.chmod(path, 0o644)
    assert any("mode 644" in problem for problem in svc.verify(backup_set, manifest))
    os.chmod(path, 0o600)

    path.write_bytes(path.read_bytes()[:-5])
    assert any("not valid JSON" in problem for problem in svc.verify(backup_set, manifest))


def test_restore_refuses_an_unknown_vhost_before_touching_the_broker(tmp_path: Path):
    backup_set, manifest = run_backup(tmp_path, LOCAL_BROKER)
    with pytest.raises(svc.DefinitionsError, match="erp_missing_vhost not in this backup"):
        svc.restore(backup_set.path, manifest, {}, options={"vhosts": ["erp_missing_vhost"]})


def test_unreachable_node_names_the_connection_and_host(tmp_path: Path):
    conn = Connection(conn_id="erp_rabbitmq", conn_type="amqp", host="127.0.0.1",
                      extra=json.dumps({"node": f"erp_missing_{uuid.uuid4().hex[:6]}@localhost"}))
    with pytest.raises(SourceUnavailable, match="connection 'erp_rabbitmq': RabbitMQ node erp_missing_.* on 127.0.0.1"):
        run_backup(tmp_path, conn)
    assert not (tmp_path / "rabbitmq" / "definitions" / "20261126T034500Z" / svc.DEFINITIONS_FILE).exists()


# -- http mode at the management API boundary ---------------------------------------------------------


class FakeManagementApi:
    """Stands in for rabbitmq_management: /api/definitions with basic auth, recording each request."""

    def __init__(self, login: str, password: str, definitions: dict[str, Any]):
        self.expected_auth = "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()
        self.definitions = definitions
        self.dropped: set[str] = set()  # sections a POST accepts but does not create
        self.requests: list[tuple[str, str, str | None, bytes]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _authorised(self) -> bool:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                api.requests.append((self.command, self.path, self.headers.get("authorization"), body))
                if self.headers.get("authorization") != api.expected_auth:
                    self.send_response(401)
                    self.end_headers()
                    return False
                return True

            def do_GET(self) -> None:
                if self._authorised():
                    payload = json.dumps(api.definitions).encode()
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)

            def do_POST(self) -> None:
                if self._authorised():
                    imported = json.loads(api.requests[-1][3])
                    for section, items in imported.items():
                        if isinstance(items, list) and section not in api.dropped:
                            api.definitions.setdefault(section, []).extend(items)
                    self.send_response(204)
                    self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeManagementApi:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


HTTP_DEFINITIONS = {
    "rabbit_version": "3.13.7", "rabbitmq_version": "3.13.7",
    "users": [{"name": "erp_app", "password_hash": "HASH-must-stay-private", "tags": [], "limits": {},
               "hashing_algorithm": "rabbit_password_hashing_sha256"}],
    "vhosts": [{"name": "erp"}, {"name": "/"}],
    "permissions": [{"user": "erp_app", "vhost": "erp", "configure": ".*", "write": ".*", "read": ".*"}],
    "queues": [{"name": "erp.orders", "vhost": "erp", "durable": True, "auto_delete": False, "arguments": {}}],
    "exchanges": [], "bindings": [], "policies": [], "parameters": [], "global_parameters": [],
    "topic_permissions": [],
}


def _http_conn(port: int, password: str) -> Connection:
    return Connection(conn_id="erp_rabbitmq", conn_type="amqp", host="127.0.0.1", port=5672, login="backup",
                      password=password, extra=json.dumps({"management_port": port}))


def test_http_mode_backup_and_restore_at_the_api_boundary(tmp_path: Path, caplog):
    password = "http-" + uuid.uuid4().hex
    with FakeManagementApi("backup", password, json.loads(json.dumps(HTTP_DEFINITIONS))) as api:
        with caplog.at_level("DEBUG"):
            backup_set, manifest = run_backup(tmp_path, _http_conn(api.port, password), {"mode": "http"})
        method, path, auth, _ = api.requests[0]
        assert (method, path, auth) == ("GET", "/api/definitions", api.expected_auth)
        written = backup_set.path / svc.DEFINITIONS_FILE
        assert json.loads(written.read_bytes()) == HTTP_DEFINITIONS
        assert (written.stat().st_mode & 0o777) == FILE_MODE
        assert manifest.details["mode"] == "http" and manifest.details["counts"]["queues"] == 1
        assert manifest.source["version"] == "3.13.7" and "requests" in manifest.tools
        assert password not in caplog.text and "HASH-must-stay-private" not in caplog.text
        assert password not in manifest.to_json()
        assert svc.verify(backup_set, manifest) == []

        api.definitions = {"vhosts": [{"name": "/"}]}  # the DR target starts empty
        target = svc.RabbitEndpoint(mode="http", host="127.0.0.1", login="backup", password=password,
                                    management_url=f"http://127.0.0.1:{api.port}")
        report = svc.restore(backup_set.path, manifest, target, options={"vhosts": ["erp"]})
        posted = [json.loads(body) for method, _, _, body in api.requests if method == "POST"]
        assert len(posted) == 1 and [v["name"] for v in posted[0]["vhosts"]] == ["erp"]
        assert [u["name"] for u in posted[0]["users"]] == ["erp_app"]
        assert report.ok and report.details["missing"] == {}


def test_http_mode_wrong_password_and_unreachable_api(tmp_path: Path):
    with FakeManagementApi("backup", "right", dict(HTTP_DEFINITIONS)) as api:
        with pytest.raises(SourceUnavailable, match="connection 'erp_rabbitmq'.*rejected the credentials.*401"):
            run_backup(tmp_path / "a", _http_conn(api.port, "wrong"), {"mode": "http"})
    assert not list((tmp_path / "a").rglob(svc.DEFINITIONS_FILE))

    port = free_port()
    with pytest.raises(SourceUnavailable, match=rf"'erp_rabbitmq'.*127\.0\.0\.1:{port}.*on host 127\.0\.0\.1"):
        run_backup(tmp_path / "b", _http_conn(port, "any"), {"mode": "http"})
    shutil.rmtree(tmp_path / "b", ignore_errors=True)


def test_http_restore_reports_objects_missing_after_the_import(tmp_path: Path):
    password = "http-" + uuid.uuid4().hex
    with FakeManagementApi("backup", password, json.loads(json.dumps(HTTP_DEFINITIONS))) as api:
        backup_set, manifest = run_backup(tmp_path, _http_conn(api.port, password), {"mode": "http"})
        api.definitions, api.dropped = {"vhosts": [{"name": "/"}]}, {"queues"}
        target = svc.RabbitEndpoint(mode="http", host="127.0.0.1", login="backup", password=password,
                                    management_url=f"http://127.0.0.1:{api.port}")
        report = svc.restore(backup_set.path, manifest, target)
    assert report.problems == ["queues missing after import: erp:erp.orders"]
    assert report.details["missing"] == {"queues": ["erp:erp.orders"]}
    assert report.restored_bytes > 0 and not report.ok


def test_check_restored_compares_the_scratch_broker_with_the_backup(tmp_path: Path):
    password = "http-" + uuid.uuid4().hex
    with FakeManagementApi("backup", password, json.loads(json.dumps(HTTP_DEFINITIONS))) as api:
        backup_set, manifest = run_backup(tmp_path, _http_conn(api.port, password), {"mode": "http"})
        target = svc.RabbitEndpoint(mode="http", host="127.0.0.1", port=api.port, login="backup", password=password,
                                    management_url=f"http://127.0.0.1:{api.port}")
        guarded: list[tuple[str, int]] = []
        ctx = CheckContext(guard=lambda host, port: guarded.append((host, port)))
        api.definitions = {"vhosts": [{"name": "/"}]}  # the scratch broker starts empty
        report = svc.restore(backup_set.path, manifest, target)
        found = svc.check_restored(target, backup_set.path, manifest, report, ctx)
        assert found.problems == [] and guarded == [("127.0.0.1", api.port)]
        assert "queues: 1 in the backup, 1 on the scratch node" in found.checks

        api.definitions["queues"] = []
        lost = svc.check_restored(target, backup_set.path, manifest, report, ctx)
    assert lost.problems == ["queues: 0 on the scratch node, the backup has 1", "queues missing: erp:erp.orders"]
