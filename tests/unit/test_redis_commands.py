"""Redis: exact redis-cli / redis-server argv, secrets only in env, and the pure checks behind verify/restore."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from airflow.sdk import Connection
from hypothesis import given
from hypothesis import strategies as st

from erp_backup.services.redis import commands as svc
from erp_backup.services.redis.commands import RedisEndpoint, SampledKey

SECRET = "s3cr3t-Pa55"
ENDPOINT = RedisEndpoint(host="10.0.0.5", port=6380, user="backup", password=SECRET)
PLAIN = RedisEndpoint(host="127.0.0.1", port=6379)


def _no_secret_in_argv(command) -> None:
    assert all(SECRET not in arg for arg in command.argv)


def test_rdb_command_streams_to_stdout_with_password_in_env_only():
    command = svc.rdb_command(ENDPOINT)
    assert command.argv == ("redis-cli", "-h", "10.0.0.5", "-p", "6380", "--user", "backup", "--rdb", "-")
    assert command.env == {"REDISCLI_AUTH": SECRET}
    _no_secret_in_argv(command)
    assert SECRET not in command.describe()


def test_commands_without_password_have_no_auth_env():
    assert svc.rdb_command(PLAIN).env == {}
    assert svc.info_command(PLAIN, "keyspace").argv == ("redis-cli", "-h", "127.0.0.1", "-p", "6379", "-e", "INFO",
                                                         "keyspace")


def test_scan_and_digest_commands_select_the_db():
    assert svc.scan_command(ENDPOINT, 13).argv == (
        "redis-cli", "-h", "10.0.0.5", "-p", "6380", "--user", "backup", "-n", "13", "--scan",
    )
    command = svc.digest_command(ENDPOINT, 2, ["a", "b:c"], max_items=100, max_bytes=2048)
    assert command.argv == (
        "redis-cli", "-h", "10.0.0.5", "-p", "6380", "--user", "backup", "-n", "2", "-e", "--raw",
        "EVALSHA", svc.DIGEST_SCRIPT_SHA1, "2", "a", "b:c", "100", "2048",
    )
    assert svc.DIGEST_SCRIPT_SHA1 == hashlib.sha1(svc.DIGEST_SCRIPT.encode()).hexdigest()
    for built in (command, svc.scan_command(ENDPOINT, 13), svc.load_script_command(ENDPOINT)):
        _no_secret_in_argv(built)
        assert built.env == {"REDISCLI_AUTH": SECRET}


def test_tls_options_come_from_the_connection_extra():
    conn = Connection(conn_id="erp_redis", conn_type="redis", host="redis.erp", port=6390, password=SECRET,
                      extra='{"tls": true, "cacert": "/etc/ssl/erp-ca.pem"}')
    endpoint = RedisEndpoint.from_connection(conn)
    assert svc.cli_command(endpoint, "PING").argv == (
        "redis-cli", "-h", "redis.erp", "-p", "6390", "--tls", "--cacert", "/etc/ssl/erp-ca.pem", "-e", "PING",
    )
    assert "password" not in repr(endpoint) and SECRET not in repr(endpoint)


def test_connection_defaults():
    endpoint = RedisEndpoint.from_connection(Connection(conn_id="erp_redis", conn_type="redis"))
    assert (endpoint.host, endpoint.port, endpoint.user, endpoint.password) == ("127.0.0.1", 6379, None, None)


def test_check_rdb_and_version_commands():
    assert svc.check_rdb_command(Path("/tmp/x/dump.rdb")).argv == ("redis-check-rdb", "/tmp/x/dump.rdb")
    assert svc.cli_version_command().argv == ("redis-cli", "--version")


# -- the RDB stream ----------------------------------------------------------------------------------

rdb_bodies = st.binary(max_size=300).map(lambda body: b"REDIS0010" + body + b"\xff" + bytes(8))
eof_marks = st.text(alphabet="0123456789abcdef", min_size=40, max_size=40).map(str.encode)


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:])]


@given(rdb=rdb_bodies, mark=eof_marks, cuts=st.lists(st.integers(min_value=0), max_size=6))
def test_strip_eof_mark_removes_the_mark_whatever_the_chunking(rdb: bytes, mark: bytes, cuts: list[int]):
    assert b"".join(svc.strip_eof_mark(_chunked(rdb + mark, cuts))) == rdb


@given(rdb=rdb_bodies, cuts=st.lists(st.integers(min_value=0), max_size=6))
def test_strip_eof_mark_keeps_an_rdb_without_mark_intact(rdb: bytes, cuts: list[int]):
    assert b"".join(svc.strip_eof_mark(_chunked(rdb, cuts))) == rdb


def test_strip_eof_mark_rejects_what_is_not_an_rdb():
    with pytest.raises(svc.RdbStreamError, match="not an RDB"):
        list(svc.strip_eof_mark([b"-ERR unknown command\r\n"]))
    with pytest.raises(svc.RdbStreamError, match="0 bytes"):
        list(svc.strip_eof_mark([]))


# -- keyspace and samples ----------------------------------------------------------------------------

INFO_KEYSPACE = "# Keyspace\r\ndb0:keys=12,expires=3,avg_ttl=5000\r\ndb13:keys=7,expires=0,avg_ttl=0\r\n"


def test_parse_keyspace():
    assert svc.parse_keyspace(INFO_KEYSPACE) == {0: {"keys": 12, "expires": 3}, 13: {"keys": 7, "expires": 0}}
    assert svc.parse_keyspace("# Keyspace\r\n") == {}


def test_expected_key_counts_is_exact_for_a_stable_persistent_db_and_tolerates_ttls_and_writes():
    before = {0: {"keys": 12, "expires": 3}, 13: {"keys": 7, "expires": 0}}
    after = {0: {"keys": 14, "expires": 4}, 13: {"keys": 7, "expires": 0}, 2: {"keys": 1, "expires": 0}}
    assert svc.expected_key_counts(before, after) == {0: (8, 14), 2: (0, 1), 13: (7, 7)}


def test_check_key_counts_flags_dbs_outside_the_range_and_unexpected_dbs():
    checks, problems = svc.check_key_counts({0: (8, 14), 13: (7, 7)}, {0: {"keys": 9}, 13: {"keys": 6}, 4: {"keys": 2}})
    assert checks["0"] == {"restored": 9, "expected_min": 8, "expected_max": 14}
    assert problems == ["db4: 2 keys restored, backup had 0", "db13: 6 keys restored, backup had 7"]


def test_choose_sample_is_sorted_and_deterministic():
    keys = ["b", "a", "d", "c", "a"]
    assert svc.choose_sample(keys, 3) == ["a", "b", "c"]
    assert svc.choose_sample(reversed(keys), 3) == ["a", "b", "c"]


def test_parse_digests_reads_four_lines_per_key():
    output = b"hash\n-1\n3\nabc\nstring\n9000\n5\ndef\nnone\n-2\n0\n\n"
    assert svc.parse_digests(1, ["h", "s", "gone"], output) == [
        SampledKey(1, "h", "hash", True, 3, "abc"),
        SampledKey(1, "s", "string", False, 5, "def"),
        SampledKey(1, "gone", "none", False, 0, ""),
    ]
    with pytest.raises(ValueError, match="for 2 keys"):
        svc.parse_digests(1, ["a", "b"], b"hash\n-1\n")


def test_compare_sample_tolerates_expired_volatile_keys_only():
    persistent = SampledKey(0, "p", "hash", True, 2, "d1")
    volatile = SampledKey(0, "v", "string", False, 4, "d2")
    changed = SampledKey(0, "c", "list", True, 3, "d3")
    restored = {(0, "p"): persistent, (0, "c"): SampledKey(0, "c", "list", True, 2, "zz")}
    result = svc.compare_sample([persistent, volatile, changed], restored)
    assert (result["matched"], result["expired"]) == (1, 1)
    assert len(result["problems"]) == 1 and "key 'c'" in result["problems"][0]

    missing = svc.compare_sample([persistent], {})
    assert missing["problems"] == ["db0 key 'p': missing after restore"]


def test_sampled_key_round_trips_through_the_manifest_json():
    key = SampledKey(3, "erp:k", "zset", True, 10, "f" * 40)
    assert SampledKey.from_dict(key.as_dict()) == key
