"""The content hash: the fast record hash, and the text fallback for types without an extended hash."""

from __future__ import annotations

import psycopg
import pytest

from erp_backup.services.postgres import content as pg_content

pytestmark = pytest.mark.integration

SHARED = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


@pytest.mark.parametrize("payload_type", ["jsonb", "json"])  # json has no extended hash: text fallback
def test_hash_is_order_independent_and_sees_one_changed_value(payload_type):
    with psycopg.connect(SHARED) as conn:
        pg_content.apply_session_settings(conn)
        for name, order in (("forward", "ASC"), ("backward", "DESC")):
            conn.execute(
                f"CREATE TEMP TABLE {name} AS SELECT g AS id, format('{{\"n\": %s}}', g)::{payload_type} AS payload, "
                f"g * 1.5 AS amount FROM generate_series(1, 500) g ORDER BY g {order}"
            )
        (schema,) = conn.execute("SELECT pg_my_temp_schema()::regnamespace::text").fetchone()
        forward = pg_content.hash_table(conn, schema, "forward")
        assert forward[0] == 500 and forward[1] != 0
        assert pg_content.hash_table(conn, schema, "backward") == forward
        conn.execute(f"UPDATE backward SET payload = '{{\"n\": -1}}'::{payload_type} WHERE id = 250")
        assert pg_content.hash_table(conn, schema, "backward")[1] != forward[1]
        # The fallback ran inside a savepoint: the surrounding transaction is still usable.
        assert conn.execute("SELECT count(*) FROM forward").fetchone()[0] == 500
        conn.rollback()


def test_fast_and_text_hashes_differ_so_one_method_is_used_per_table():
    with psycopg.connect(SHARED) as conn:
        pg_content.apply_session_settings(conn)
        conn.execute("CREATE TEMP TABLE t AS SELECT g AS id FROM generate_series(1, 10) g")
        (schema,) = conn.execute("SELECT pg_my_temp_schema()::regnamespace::text").fetchone()
        fast = pg_content.hash_table(conn, schema, "t")
        text = conn.execute(pg_content._TABLE_CONTENT_TEXT.format(*map(psycopg.sql.Identifier, (schema, "t")))).fetchone()
        assert fast[0] == int(text[0]) == 10 and fast[1] != int(text[1])
        conn.rollback()
