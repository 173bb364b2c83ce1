"""RabbitMQ: exact rabbitmqctl argv and HTTP requests, secrets kept out of argv, and the definitions logic."""

from __future__ import annotations

import copy

import pytest
from airflow.sdk import Connection

from erp_backup.services import rabbitmq as svc
from erp_backup.services.rabbitmq import RabbitEndpoint

SECRET = "mq-Pa55-word"
COOKIE = "ERLANGCOOKIEVALUE"

DEFINITIONS = {
    "rabbit_version": "3.10.8",
    "rabbitmq_version": "3.10.8",
    "users": [
        {"name": "guest", "password_hash": "h1", "hashing_algorithm": "rabbit_password_hashing_sha256",
         "tags": ["administrator"], "limits": {}},
        {"name": "erp_app", "password_hash": "h2", "hashing_algorithm": "rabbit_password_hashing_sha256",
         "tags": [], "limits": {}},
        {"name": "billing_app", "password_hash": "h3", "hashing_algorithm": "rabbit_password_hashing_sha256",
         "tags": [], "limits": {}},
    ],
    "vhosts": [{"name": "/"}, {"name": "erp"}, {"name": "billing"}],
    "permissions": [
        {"user": "guest", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"},
        {"user": "erp_app", "vhost": "erp", "configure": ".*", "write": ".*", "read": ".*"},
        {"user": "billing_app", "vhost": "billing", "configure": ".*", "write": ".*", "read": ".*"},
    ],
    "topic_permissions": [{"user": "erp_app", "vhost": "erp", "exchange": "erp.events", "write": ".*", "read": ".*"}],
    "parameters": [{"vhost": "erp", "component": "federation-upstream", "name": "up", "value": {}}],
    "global_parameters": [{"name": "cluster_name", "value": "rabbit@erp"}],
    "policies": [{"vhost": "erp", "name": "ttl", "pattern": "^erp\\.", "apply-to": "queues",
                  "definition": {"message-ttl": 60000}, "priority": 0}],
    "queues": [
        {"name": "erp.orders", "vhost": "erp", "durable": True, "auto_delete": False, "arguments": {}},
        {"name": "invoices", "vhost": "billing", "durable": True, "auto_delete": False, "arguments": {}},
    ],
    "exchanges": [{"name": "erp.events", "vhost": "erp", "type": "topic", "durable": True, "auto_delete": False,
                   "internal": False, "arguments": {}}],
    "bindings": [{"source": "erp.events", "vhost": "erp", "destination": "erp.orders", "destination_type": "queue",
                  "routing_key": "order.*", "arguments": {}}],
}


def test_export_command_local_node_by_default():
    command = svc.export_command(RabbitEndpoint())
    assert command.argv == ("rabbitmqctl", "--quiet", "export_definitions", "-", "--format", "json")
    assert command.env == {}


def test_commands_name_the_node_and_keep_the_cookie_in_env():
    endpoint = RabbitEndpoint(node="rabbit@mq-1.erp.internal", longnames=True, erlang_cookie=COOKIE, password=SECRET)
    export = svc.export_command(endpoint)
    assert export.argv == ("rabbitmqctl", "--node", "rabbit@mq-1.erp.internal", "--longnames", "--quiet",
                           "export_definitions", "-", "--format", "json")
    assert svc.import_command(endpoint).argv == ("rabbitmqctl", "--node", "rabbit@mq-1.erp.internal", "--longnames",
                                                 "--quiet", "import_definitions", "--format", "json")
    assert svc.version_command(endpoint).argv[-1] == "version"
    for command in (export, svc.import_command(endpoint), svc.version_command(endpoint)):
        assert command.env == {"RABBITMQ_ERLANG_COOKIE": COOKIE}
        assert not any(secret in arg for arg in command.argv for secret in (COOKIE, SECRET))
        assert COOKIE not in command.describe()
    assert COOKIE not in repr(endpoint) and SECRET not in repr(endpoint)


def test_definitions_request_uses_basic_auth_not_the_url():
    conn = Connection(conn_id="erp_rabbitmq", conn_type="amqp", host="mq.erp", port=5672, login="backup",
                      password=SECRET, extra='{"mode": "http", "management_port": 15671, "scheme": "https"}')
    endpoint = RabbitEndpoint.from_connection(conn)
    request = svc.definitions_request(endpoint)
    assert (request.method, request.url, request.auth) == ("GET", "https://mq.erp:15671/api/definitions",
                                                            ("backup", SECRET))
    assert SECRET not in request.url and SECRET not in repr(request)
    assert svc.definitions_request(endpoint, "POST", vhost="/").url == "https://mq.erp:15671/api/definitions/%2F"


def test_management_url_extra_wins_and_plan_options_override_the_connection():
    conn = Connection(conn_id="erp_rabbitmq", conn_type="amqp", host="mq.erp",
                      extra='{"mode": "http", "management_url": "http://mgmt.erp/rabbit/"}')
    assert RabbitEndpoint.from_connection(conn).management_url == "http://mgmt.erp/rabbit"
    overridden = RabbitEndpoint.from_connection(conn, {"mode": "rabbitmqctl"})
    assert overridden.mode == "rabbitmqctl" and overridden.node == "rabbit@mq.erp"
    with pytest.raises(ValueError, match="mode must be one of rabbitmqctl, http"):
        RabbitEndpoint.from_connection(conn, {"mode": "amqp"})


def test_local_host_uses_the_cli_default_node():
    conn = Connection(conn_id="erp_rabbitmq", conn_type="amqp", host="127.0.0.1", port=5672)
    assert RabbitEndpoint.from_connection(conn).node is None
    named = Connection(conn_id="erp_rabbitmq", conn_type="amqp", host="127.0.0.1", extra='{"node": "rabbit@box"}')
    assert RabbitEndpoint.from_connection(named).node == "rabbit@box"


def test_count_definitions():
    assert svc.count_definitions(DEFINITIONS) == {
        "vhosts": 3, "queues": 2, "exchanges": 1, "bindings": 1, "users": 3, "policies": 1, "permissions": 3,
        "topic_permissions": 1, "parameters": 1, "global_parameters": 1,
    }


def test_select_vhosts_keeps_only_their_objects_and_the_users_they_need():
    original = copy.deepcopy(DEFINITIONS)
    selected = svc.select_vhosts(DEFINITIONS, ["erp"])
    assert DEFINITIONS == original  # the input is not modified
    assert [v["name"] for v in selected["vhosts"]] == ["erp"]
    assert [u["name"] for u in selected["users"]] == ["erp_app"]
    assert [q["name"] for q in selected["queues"]] == ["erp.orders"]
    assert selected["bindings"] == DEFINITIONS["bindings"] and selected["policies"] == DEFINITIONS["policies"]
    assert [p["user"] for p in selected["permissions"]] == ["erp_app"]
    assert len(selected["topic_permissions"]) == 1 and len(selected["parameters"]) == 1
    assert selected["global_parameters"] == []
    assert selected["rabbitmq_version"] == "3.10.8"


def test_select_vhosts_names_unknown_vhosts():
    with pytest.raises(svc.DefinitionsError, match="vhost\\(s\\) crm not in this backup \\(it has: /, billing, erp\\)"):
        svc.select_vhosts(DEFINITIONS, ["erp", "crm"])


def test_missing_definitions_lists_what_the_broker_lacks():
    assert svc.missing_definitions(DEFINITIONS, DEFINITIONS) == {}
    actual = copy.deepcopy(DEFINITIONS)
    actual["queues"] = actual["queues"][1:]
    actual["bindings"][0]["routing_key"] = "order.created"
    actual["users"] = [u for u in actual["users"] if u["name"] != "erp_app"]
    assert svc.missing_definitions(DEFINITIONS, actual) == {
        "queues": ["erp:erp.orders"],
        "bindings": ["erp:erp.events->queue:erp.orders[order.*]{}"],
        "users": ["erp_app"],
    }


def test_parse_definitions_rejects_non_exports():
    with pytest.raises(svc.DefinitionsError, match="x.json: not valid JSON"):
        svc.parse_definitions(b"{not json", "x.json")
    with pytest.raises(svc.DefinitionsError, match="no 'vhosts' section"):
        svc.parse_definitions(b'{"queues": []}', "x.json")
