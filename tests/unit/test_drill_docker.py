"""Drill targets at the Docker API boundary (a fake APIClient records the calls), and the production guard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import Connection
from docker.errors import ImageNotFound
from docker.types import HostConfig

from erp_backup.drill.targets import (
    DRILL_LABEL,
    SERVICE_LABEL,
    DockerBackend,
    LocalBackend,
    ProductionEndpoint,
    ProductionGuard,
    ProductionTargetRefused,
    TargetError,
)
from erp_backup.plan import DrillDockerPlan
from erp_backup.scratch.base import TargetInfo
from erp_backup.services import get_service
from erp_backup.services.base import ScratchSpec
from tests.unit.test_drill_pick import plan_with

RUN_ID = "scheduled__2026-11-29T21:00:00+00:00"
OWNER = f"drill:{RUN_ID}"


class FakeAPIClient:
    """Records every call; answers like the Docker API does (docker.APIClient method names and arguments)."""

    def __init__(self, host_ip: str = "127.0.0.1", host_port: str = "49153", existing: list[dict] | None = None,
                 networks: list[dict] | None = None, images: set[str] | None = None):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.host_ip, self.host_port = host_ip, host_port
        self.existing, self.existing_networks = existing or [], networks or []
        self.images = images  # None: every image is on the engine

    def _record(self, _call: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((_call, args, kwargs))

    def named(self, name: str) -> list[tuple[tuple, dict]]:
        return [(args, kwargs) for call, args, kwargs in self.calls if call == name]

    def create_network(self, name, **kwargs):
        self._record("create_network", name, **kwargs)
        return {"Id": f"net-{name}"}

    def inspect_image(self, image):
        self._record("inspect_image", image)
        if self.images is not None and image not in self.images:
            raise ImageNotFound(f"No such image: {image}")
        return {"Id": f"sha256:{image}"}

    def pull(self, repository, tag=None, **kwargs):
        self._record("pull", repository, tag=tag, **kwargs)

    def create_host_config(self, **kwargs):
        self._record("create_host_config", **kwargs)
        return HostConfig(version="1.44", **kwargs)

    def create_container(self, **kwargs):
        self._record("create_container", **kwargs)
        return {"Id": "c0ffee"}

    def start(self, container):
        self._record("start", container)

    def port(self, container, private_port):
        self._record("port", container, private_port)
        return [{"HostIp": self.host_ip, "HostPort": self.host_port}]

    def connect_container_to_network(self, container, net_id, **kwargs):
        self._record("connect_container_to_network", container, net_id, **kwargs)

    def disconnect_container_from_network(self, container, net_id, **kwargs):
        self._record("disconnect_container_from_network", container, net_id, **kwargs)

    def remove_container(self, container, **kwargs):
        self._record("remove_container", container, **kwargs)

    def remove_network(self, net_id):
        self._record("remove_network", net_id)

    def containers(self, **kwargs):
        self._record("containers", **kwargs)
        return self.existing

    def networks(self, **kwargs):
        self._record("networks", **kwargs)
        return self.existing_networks


def spec(service: str, backup_type: str, versions: dict[str, Any]) -> ScratchSpec:
    return get_service(service).scratch_spec(backup_type, versions)


def backend(tmp_path: Path, api: FakeAPIClient, guard: ProductionGuard | None = None, **kwargs: Any) -> DockerBackend:
    guard = guard or ProductionGuard([])
    ready_calls: list[TargetInfo] = []
    docker = DockerBackend(api, guard, LocalBackend(tmp_path, guard), ready=ready_calls.append, **kwargs)
    docker.ready_calls = ready_calls  # type: ignore[attr-defined]
    return docker


def test_postgres_target_is_the_backed_up_major_on_an_internal_network_forwarded_from_loopback(tmp_path):
    api = FakeAPIClient()
    docker = backend(tmp_path, api)
    info = docker.start(spec("postgres", "full", {"postgres_major": 16}), "postgres", "full", OWNER, run_id=RUN_ID)

    name = info.container
    assert name and name.startswith("erp-drill-scheduled-2026-11-29t21-00") and name.endswith("-postgres")
    proxy = f"{name}-proxy"
    assert (info.network, info.proxy) == (name, proxy)
    labels = {DRILL_LABEL: RUN_ID, SERVICE_LABEL: "postgres"}
    # The target's network is internal (no route out); only the forwarder's own network publishes a port.
    assert api.named("create_network") == [
        ((name,), {"driver": "bridge", "internal": True, "labels": labels, "check_duplicate": True}),
        ((proxy,), {"driver": "bridge", "internal": False, "labels": labels, "check_duplicate": True})]
    assert api.named("inspect_image") == [(("postgres:16",), {}), (("alpine/socat:1.8.0.0",), {})]
    assert api.named("pull") == []
    assert api.named("create_host_config") == [
        ((), {"port_bindings": {}, "network_mode": name}),
        ((), {"port_bindings": {5432: ("127.0.0.1", None)}, "network_mode": proxy})]
    (_, created), (_, forwarder) = api.named("create_container")
    assert created["image"] == "postgres:16" and created["name"] == name and created["labels"] == labels
    assert created["ports"] == [5432] and not created["host_config"].get("PortBindings")
    assert created["host_config"]["NetworkMode"] == name
    password = created["environment"]["POSTGRES_PASSWORD"]
    assert len(password) == 32 and password not in json.dumps(created["command"] or [])
    assert forwarder["image"] == "alpine/socat:1.8.0.0" and forwarder["name"] == proxy and forwarder["labels"] == labels
    assert forwarder["command"] == ["TCP-LISTEN:5432,fork,reuseaddr", f"TCP:{name}:5432"]
    assert forwarder["host_config"]["PortBindings"] == {"5432/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]}
    assert forwarder["host_config"]["NetworkMode"] == proxy and "environment" not in forwarder
    assert password not in json.dumps(forwarder)
    assert api.named("connect_container_to_network") == [((proxy, name), {})]
    assert api.named("start") == [((name,), {}), ((proxy,), {})]
    assert api.named("port") == [((proxy, 5432), {})]
    assert (info.host, info.port, info.backend, info.kind) == ("127.0.0.1", 49153, "docker", "postgres")
    assert info.pg_conninfo == f"host=127.0.0.1 port=49153 user=postgres dbname=postgres password={password}"
    assert password not in info.describe() and password not in repr(info)
    assert docker.ready_calls == [info]
    assert [call for call, _, _ in api.calls] == [
        "create_network", "inspect_image", "create_host_config", "create_container", "start",
        "inspect_image", "create_network", "create_host_config", "create_container", "connect_container_to_network",
        "start", "port",
    ]


def test_the_plan_names_the_forwarders_image(tmp_path):
    api = FakeAPIClient(images={"postgres:15", "mirror.example/socat:1"})
    docker = backend(tmp_path, api, docker_plan=DrillDockerPlan(pull="never", images={"proxy": "mirror.example/socat:1"}))
    info = docker.start(spec("postgres", "full", {}), "postgres", "full", OWNER, run_id=RUN_ID)
    assert [kwargs["image"] for _, kwargs in api.named("create_container")] == ["postgres:15", "mirror.example/socat:1"]
    assert info.port == 49153


def test_a_missing_forwarder_image_with_pull_never_leaves_nothing(tmp_path):
    api = FakeAPIClient(images={"postgres:15"})
    docker = backend(tmp_path, api, docker_plan=DrillDockerPlan(pull="never"))
    with pytest.raises(TargetError, match=r"image alpine/socat:1.8.0.0 is not on the Docker engine"):
        docker.start(spec("postgres", "full", {}), "postgres", "full", OWNER, run_id=RUN_ID)
    (target,), = [args for args, _ in api.named("create_network")]  # the forwarder's is not made without its image
    assert [kwargs["name"] for _, kwargs in api.named("create_container")] == [target]
    assert [args[0] for args, _ in api.named("remove_container")] == [target]
    assert [args[0] for args, _ in api.named("remove_network")] == [target]
    assert docker.ready_calls == []


def test_a_missing_image_is_pulled_by_default(tmp_path):
    api = FakeAPIClient(images=set())
    backend(tmp_path, api).start(spec("postgres", "full", {"postgres_major": 16}), "postgres", "full", OWNER,
                                 run_id=RUN_ID)
    assert api.named("inspect_image") == [(("postgres:16",), {}), (("alpine/socat:1.8.0.0",), {})]
    assert api.named("pull") == [(("postgres",), {"tag": "16"}), (("alpine/socat",), {"tag": "1.8.0.0"})]


def test_pull_always_pulls_even_a_present_image(tmp_path):
    api = FakeAPIClient()
    docker = backend(tmp_path, api, docker_plan=DrillDockerPlan(pull="always"))
    docker.start(spec("postgres", "full", {}), "postgres", "full", OWNER, run_id=RUN_ID)
    assert api.named("inspect_image") == []
    assert api.named("pull") == [(("postgres",), {"tag": "15"}), (("alpine/socat",), {"tag": "1.8.0.0"})]


def test_pull_never_refuses_a_missing_image_and_leaves_nothing(tmp_path):
    api = FakeAPIClient(images={"postgres:16"})
    docker = backend(tmp_path, api, docker_plan=DrillDockerPlan(pull="never"))
    with pytest.raises(TargetError, match=r"image postgres:15 is not on the Docker engine .* 'never'"):
        docker.start(spec("postgres", "full", {}), "postgres", "full", OWNER, run_id=RUN_ID)
    assert api.named("pull") == [] and api.named("create_container") == []
    network = api.named("create_network")[0][0][0]
    assert api.named("remove_network") == [((network,), {})]


def test_the_plan_names_the_image_per_target_kind(tmp_path):
    api = FakeAPIClient()
    plan = DrillDockerPlan(images={"postgres": "mirror.example/erp/postgres:{tag}",
                                   "rabbitmq": "erp-local/rabbitmq:{tag}", "milvus_lite": "mirror.example/{image}"})
    docker = backend(tmp_path, api, docker_plan=plan)
    images = [docker.start(spec(*args), args[0], args[1], OWNER, run_id=RUN_ID).image for args in (
        ("postgres", "full", {"postgres_major": 16}), ("rabbitmq", "definitions", {"rabbitmq": "3.10.8"}),
        ("milvus", "full", {"milvus": "v2.4.15"}), ("minio", "full", {}))]
    assert images == ["mirror.example/erp/postgres:16", "erp-local/rabbitmq:3.10-management",
                      "mirror.example/milvusdb/milvus:v2.4.15", "minio/minio:latest"]
    assert [kwargs["image"] for _, kwargs in api.named("create_container")] == [
        image for target in images for image in (target, "alpine/socat:1.8.0.0")]  # each with its forwarder


def test_teardown_removes_the_containers_and_their_networks(tmp_path):
    api = FakeAPIClient()
    docker = backend(tmp_path, api)
    info = docker.start(spec("rabbitmq", "definitions", {"rabbitmq": "3.10.8"}), "rabbitmq", "definitions", OWNER, run_id=RUN_ID)
    assert api.named("inspect_image")[0] == (("rabbitmq:3.10-management",), {})
    assert api.named("create_host_config")[1][1]["port_bindings"] == {15672: ("127.0.0.1", None)}
    endpoint = get_service("rabbitmq").scratch_target(info)
    assert (endpoint.mode, endpoint.management_url, endpoint.login) == ("http", "http://127.0.0.1:49153", "drill")
    api.calls.clear()
    done = docker.stop(info)
    assert api.named("remove_container") == [((info.proxy,), {"force": True, "v": True}),
                                             ((info.container,), {"force": True, "v": True})]
    assert api.named("remove_network") == [((info.network,), {}), ((info.proxy,), {})]
    assert done == [f"removed container {info.proxy}", f"removed container {info.container}",
                    f"removed network {info.network}", f"removed network {info.proxy}"]


def test_worker_in_a_container_joins_an_internal_drill_network_and_uses_the_container_name(tmp_path):
    api = FakeAPIClient()
    docker = backend(tmp_path, api, worker_container="airflow-worker-1")
    info = docker.start(spec("milvus", "full", {}), "milvus", "full", OWNER, run_id=RUN_ID)
    assert api.named("create_network") == [((info.network,), {"driver": "bridge", "internal": True, "labels": {
        DRILL_LABEL: RUN_ID, SERVICE_LABEL: "milvus"}, "check_duplicate": True})]  # no forwarder: nothing is published
    assert info.proxy is None
    assert api.named("create_host_config") == [((), {"port_bindings": {}, "network_mode": info.network})]
    assert api.named("connect_container_to_network") == [(("airflow-worker-1", info.network), {})]
    assert api.named("port") == []
    assert (info.host, info.port, info.uri) == (info.container, 19530, f"http://{info.container}:19530")
    assert api.named("inspect_image") == [(("milvusdb/milvus:v2.5.4",), {})]
    (_, created), = api.named("create_container")
    assert created["command"] == ["milvus", "run", "standalone"]
    api.calls.clear()
    docker.stop(info)
    assert api.named("disconnect_container_from_network") == [(("airflow-worker-1", info.network), {"force": True})]


def test_worker_container_auto_is_this_container(monkeypatch, tmp_path):
    from erp_backup.drill import targets

    monkeypatch.setenv(targets.WORKER_CONTAINER_ENV, "auto")
    monkeypatch.setattr(targets.socket, "gethostname", lambda: "3f2a9c0d1e4b")
    monkeypatch.setattr("erp_backup.runner.docker_api", lambda conn_id, url: FakeAPIClient())
    guard = ProductionGuard([])
    assert DockerBackend.from_env(guard, LocalBackend(tmp_path, guard)).worker_container == "3f2a9c0d1e4b"
    monkeypatch.setenv(targets.WORKER_CONTAINER_ENV, "")
    assert DockerBackend.from_env(guard, LocalBackend(tmp_path, guard)).worker_container is None


def test_a_port_published_beyond_loopback_is_refused_and_cleaned_up(tmp_path):
    api = FakeAPIClient(host_ip="0.0.0.0")
    docker = backend(tmp_path, api)
    with pytest.raises(TargetError, match="published on '0.0.0.0', not 127.0.0.1"):
        docker.start(spec("postgres", "full", {}), "postgres", "full", OWNER, run_id=RUN_ID)
    assert len(api.named("remove_container")) == 2 and len(api.named("remove_network")) == 2  # target and forwarder
    assert docker.ready_calls == []


def test_a_target_on_a_production_endpoint_is_refused_and_cleaned_up(tmp_path):
    api = FakeAPIClient(host_port="5432")
    guard = ProductionGuard([ProductionEndpoint("erp_postgres", frozenset({"loopback"}), 5432)])
    docker = backend(tmp_path, api, guard)
    with pytest.raises(ProductionTargetRefused, match="production endpoint of connection 'erp_postgres'"):
        docker.start(spec("postgres", "full", {}), "postgres", "full", OWNER, run_id=RUN_ID)
    assert [args[0] for args, _ in api.named("remove_container")] == [
        kwargs["name"] for _, kwargs in reversed(api.named("create_container"))]  # forwarder, then target


def test_services_without_a_container_target_use_the_local_backend(tmp_path):
    api = FakeAPIClient()
    docker = backend(tmp_path, api)
    info = docker.start(spec("redis", "rdb", {"redis": "7.0.15"}), "redis", "rdb", OWNER, run_id=RUN_ID)
    assert api.calls == [] and info.backend == "local" and info.kind == "redis" and info.host == "127.0.0.1"
    assert Path(info.base_dir, ".erp-drill.json").is_file()
    docker.stop(info)
    assert not Path(info.base_dir).exists() and api.calls == []


def test_leftovers_of_other_drills_are_removed_by_label_and_this_runs_kept(tmp_path):
    api = FakeAPIClient(
        existing=[
            {"Id": "old1", "Names": ["/erp-drill-old-postgres"], "Labels": {DRILL_LABEL: "scheduled__2026-11-22"}},
            {"Id": "mine", "Names": ["/erp-drill-now-redis"], "Labels": {DRILL_LABEL: RUN_ID}},
        ],
        networks=[{"Id": "n-old", "Name": "erp-drill-old-postgres", "Labels": {DRILL_LABEL: "scheduled__2026-11-22"}},
                  {"Id": "n-mine", "Name": "erp-drill-now", "Labels": {DRILL_LABEL: RUN_ID}}],
    )
    removed = backend(tmp_path, api).cleanup_leftovers(keep_run_id=RUN_ID)
    assert api.named("containers") == [((), {"all": True, "filters": {"label": [DRILL_LABEL]}})]
    assert api.named("remove_container") == [(("old1",), {"force": True, "v": True})]
    assert api.named("remove_network") == [(("n-old",), {})]
    assert removed == ["container /erp-drill-old-postgres (drill scheduled__2026-11-22)",
                       "network erp-drill-old-postgres (drill scheduled__2026-11-22)"]


def test_container_images_follow_the_backed_up_versions():
    def image(service: str, backup_type: str, versions: dict[str, Any]) -> str | None:
        container = spec(service, backup_type, versions).container
        return container.image if container else None

    assert image("postgres", "full", {"postgres_major": 15}) == "postgres:15"
    assert image("postgres", "full", {}) == "postgres:15"
    assert image("rabbitmq", "definitions", {"rabbitmq": "3.13.7"}) == "rabbitmq:3.13-management"
    assert image("milvus", "full", {"milvus": "v2.4.15"}) == "milvusdb/milvus:v2.4.15"
    assert image("redis", "rdb", {}) is None and image("milvus", "etcd", {}) is None
    assert image("gitlab", "full", {}) is None


# ───────────── production guard ─────────────


def connections(**by_id: Connection):
    def get(conn_id: str) -> Connection:
        if conn_id not in by_id:
            raise LookupError(conn_id)
        return by_id[conn_id]
    return get


def test_guard_refuses_every_form_of_a_production_endpoint():
    plan = plan_with("redis", "milvus", "rabbitmq")
    guard = ProductionGuard.from_plan(plan, connections(
        erp_postgres=Connection(conn_id="erp_postgres", conn_type="postgres", host="localhost", port=5432),
        erp_redis=Connection(conn_id="erp_redis", conn_type="redis", host="127.0.0.1"),  # default port 6379
        erp_milvus=Connection(conn_id="erp_milvus", conn_type="generic", extra=json.dumps({"uri": "/srv/milvus/erp.db"})),
        erp_rabbitmq=Connection(conn_id="erp_rabbitmq", conn_type="amqp", host="127.0.0.1", port=5672,
                                extra=json.dumps({"node": "rabbit@erp-mq"})),
    ))

    def target(**fields: Any) -> TargetInfo:
        return TargetInfo("x", "full", fields.pop("kind", "postgres"), "local", OWNER, **fields)

    for refused in (
        target(host="127.0.0.1", port=5432),
        target(host="::1", port=5432),
        target(kind="redis", host="localhost", port=6379),
        target(kind="milvus_lite", uri="/srv/milvus/erp.db"),
        target(kind="rabbitmq", host="127.0.0.1", port=5673, node="rabbit@erp-mq"),
    ):
        with pytest.raises(ProductionTargetRefused, match="production endpoint of connection"):
            guard.check(refused)
    guard.check(target(host="127.0.0.1", port=54321))
    guard.check(target(kind="milvus_lite", uri="/tmp/erp-drill-x/drill.db"))
    guard.check(target(kind="rabbitmq", host="127.0.0.1", port=41234, node="erpdrill1a2b3c4d@localhost"))
