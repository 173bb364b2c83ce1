"""The benchmark's PostgreSQL data: a scratch cluster holding ERP-like databases of a chosen size.

Rows are generated server-side with generate_series: customers, products (with
thumbnails), orders, order lines, invoices (with incompressible PDF-like bytea)
and an audit log with jsonb payloads, plus primary keys, foreign keys and
indexes, so dumps and restores do the work a real ERP database makes them do.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.abc import Params

from erp_backup.scratch.postgres import ScratchPostgres

log = logging.getLogger(__name__)

MB = 1_000_000
SCHEMA = "erp"

# Settings for the source cluster: fast generation (wal_level minimal, no fsync
# of commits), and the same memory for every dump and restore.
SOURCE_SETTINGS = {
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "synchronous_commit": "off",
    "max_wal_size": "'4GB'",
    "shared_buffers": "'256MB'",
    "maintenance_work_mem": "'256MB'",
}
# Restore targets: stock settings except a WAL size that avoids checkpoints every few seconds.
TARGET_SETTINGS = {
    "max_wal_size": "'4GB'",
    "shared_buffers": "'256MB'",
    "maintenance_work_mem": "'256MB'",
}

# On-disk bytes per row (heap + toast + indexes), measured on PostgreSQL 15 with this generator.
# Each table gets a share of the requested size; rows = share / bytes per row.
TABLES: dict[str, tuple[float, int]] = {
    # name: (share of the database, approximate bytes per row)
    "customers": (0.06, 330),
    "products": (0.07, 1800),
    "orders": (0.15, 250),
    "order_lines": (0.30, 120),
    "invoices": (0.14, 4400),
    "audit_log": (0.28, 415),
}

_DDL = f"""
CREATE EXTENSION IF NOT EXISTS pgcrypto;
CREATE SCHEMA {SCHEMA};
CREATE TABLE {SCHEMA}.customers (
    id bigint PRIMARY KEY, code text NOT NULL, name text NOT NULL, email text, country char(2),
    credit_limit numeric(14,2), created_at timestamptz NOT NULL, attrs jsonb
);
CREATE TABLE {SCHEMA}.products (
    id bigint PRIMARY KEY, sku text NOT NULL, name text NOT NULL, description text,
    price numeric(12,2) NOT NULL, weight_kg numeric(8,3), attrs jsonb, thumbnail bytea
);
CREATE TABLE {SCHEMA}.orders (
    id bigint PRIMARY KEY, customer_id bigint NOT NULL, order_no text NOT NULL, status text NOT NULL,
    ordered_at timestamptz NOT NULL, total numeric(14,2), currency char(3), shipping jsonb, notes text
);
CREATE TABLE {SCHEMA}.order_lines (
    id bigint PRIMARY KEY, order_id bigint NOT NULL, product_id bigint NOT NULL, quantity integer NOT NULL,
    unit_price numeric(12,2) NOT NULL, discount numeric(5,2), line_total numeric(14,2)
);
CREATE TABLE {SCHEMA}.invoices (
    id bigint PRIMARY KEY, order_id bigint NOT NULL, issued_at timestamptz NOT NULL, due_on date,
    amount numeric(14,2), pdf bytea
);
CREATE TABLE {SCHEMA}.audit_log (
    id bigint PRIMARY KEY, at timestamptz NOT NULL, actor text NOT NULL, action text NOT NULL,
    entity text NOT NULL, entity_id bigint, payload jsonb
);
"""

_WORDS = (
    "ARRAY['steel','bolt','valve','pump','cable','panel','sensor','motor','filter','gasket','bearing',"
    "'bracket','module','relay','switch','housing','adapter','coupling','nozzle','spring']"
)
_WORD = f"({_WORDS})[1 + (random() * 19)::int]"

_FILL = {
    "customers": f"""
INSERT INTO {SCHEMA}.customers
SELECT g, 'C' || lpad(g::text, 9, '0'), initcap({_WORD}) || ' ' || initcap({_WORD}) || ' Co., Ltd.',
       'contact' || g || '@' || {_WORD} || '.example.com',
       (ARRAY['KR','US','DE','JP','VN','FR'])[1 + (g % 6)],
       round((random() * 1e6)::numeric, 2), now() - random() * interval '3650 days',
       jsonb_build_object('segment', (ARRAY['smb','mid','enterprise'])[1 + g % 3], 'tags',
                          jsonb_build_array({_WORD}, {_WORD}), 'vat', md5(g::text), 'since', 2000 + g % 25)
FROM generate_series(1, %(rows)s) g""",
    "products": f"""
INSERT INTO {SCHEMA}.products
SELECT g, 'SKU-' || lpad(g::text, 8, '0'), initcap({_WORD}) || ' ' || {_WORD} || ' ' || (g % 500),
       repeat({_WORD} || ' for industrial use, rated ' || (g % 90) || ' bar. ', 4),
       round((random() * 5000)::numeric, 2), round((random() * 80)::numeric, 3),
       jsonb_build_object('color', {_WORD}, 'dims', jsonb_build_array(g % 100, g % 37, g % 11)),
       CASE WHEN g % 3 = 0 THEN gen_random_bytes(1024) || gen_random_bytes(1024) || gen_random_bytes(1024) END
FROM generate_series(1, %(rows)s) g""",
    "orders": f"""
INSERT INTO {SCHEMA}.orders
SELECT g, 1 + (random() * (%(customers)s - 1))::bigint, 'SO-' || lpad(g::text, 10, '0'),
       (ARRAY['draft','confirmed','shipped','invoiced','paid','cancelled'])[1 + (random() * 5)::int],
       now() - random() * interval '1500 days', round((random() * 20000)::numeric, 2),
       (ARRAY['KRW','USD','EUR'])[1 + g % 3],
       jsonb_build_object('street', (g % 999) || ' ' || initcap({_WORD}) || ' Road', 'city',
                          initcap({_WORD}) || 'ville', 'zip', lpad((g % 99999)::text, 5, '0')),
       CASE WHEN g % 4 = 0 THEN 'Deliver to dock ' || (g % 12) || ', call ahead. ' || md5(g::text) END
FROM generate_series(1, %(rows)s) g""",
    "order_lines": f"""
INSERT INTO {SCHEMA}.order_lines
SELECT g, 1 + (g - 1) / 4, 1 + (random() * (%(products)s - 1))::bigint, 1 + (random() * 40)::int,
       p.price, p.discount, round(p.price * (1 - p.discount / 100) * (1 + g % 40), 2)
FROM generate_series(1, %(rows)s) g,
     LATERAL (SELECT round((random() * 900)::numeric, 2) AS price, round((random() * 15)::numeric, 2) AS discount) p""",
    "invoices": f"""
INSERT INTO {SCHEMA}.invoices
SELECT g, 1 + (random() * (%(orders)s - 1))::bigint, now() - random() * interval '1500 days',
       current_date + (g % 60), round((random() * 20000)::numeric, 2),
       gen_random_bytes(1024) || gen_random_bytes(1024) || decode(repeat(md5(g::text), 64), 'hex')
FROM generate_series(1, %(rows)s) g""",
    "audit_log": f"""
INSERT INTO {SCHEMA}.audit_log
SELECT g, now() - (%(rows)s - g) * interval '1 second', 'user' || (g % 250),
       (ARRAY['create','update','delete','approve','export'])[1 + g % 5],
       (ARRAY['order','invoice','customer','product'])[1 + g % 4], (random() * 1e6)::bigint,
       jsonb_build_object('before', jsonb_build_object('status', {_WORD}, 'qty', g % 50, 'note', md5(g::text)),
                          'after', jsonb_build_object('status', {_WORD}, 'qty', g % 51, 'note', md5((g + 1)::text)),
                          'ip', '10.' || (g % 250) || '.' || (g % 199) || '.' || (g % 97), 'client', 'erp-web/4.' || (g % 9))
FROM generate_series(1, %(rows)s) g""",
}

_CONSTRAINTS = f"""
CREATE INDEX ON {SCHEMA}.orders (customer_id);
CREATE INDEX ON {SCHEMA}.orders (ordered_at);
CREATE INDEX ON {SCHEMA}.order_lines (order_id);
CREATE INDEX ON {SCHEMA}.invoices (order_id);
CREATE INDEX ON {SCHEMA}.audit_log (entity, entity_id);
CREATE UNIQUE INDEX ON {SCHEMA}.customers (code);
ALTER TABLE {SCHEMA}.orders ADD FOREIGN KEY (customer_id) REFERENCES {SCHEMA}.customers (id);
ALTER TABLE {SCHEMA}.order_lines ADD FOREIGN KEY (order_id) REFERENCES {SCHEMA}.orders (id);
ALTER TABLE {SCHEMA}.order_lines ADD FOREIGN KEY (product_id) REFERENCES {SCHEMA}.products (id);
ALTER TABLE {SCHEMA}.invoices ADD FOREIGN KEY (order_id) REFERENCES {SCHEMA}.orders (id);
"""


@dataclass(frozen=True)
class DatabaseInfo:
    name: str
    requested_mb: float
    size_bytes: int  # pg_database_size
    rows: int
    seconds: float


def fetch_value(conn: psycopg.Connection[Any], query: str, params: Params | None = None) -> Any:
    """The first column of the first row of `query`, which must return a row."""
    row = conn.execute(query, params).fetchone()
    if row is None:
        raise LookupError(f"no row from {query!r}")
    return row[0]


def row_counts(size_mb: float) -> dict[str, int]:
    """Rows per table for a database of about `size_mb` MB on disk."""
    counts = {name: max(10, math.ceil(share * size_mb * MB / per_row)) for name, (share, per_row) in TABLES.items()}
    # Every order has four lines: the lines' share decides the order count's floor.
    counts["orders"] = max(counts["orders"], math.ceil(counts["order_lines"] / 4))
    return counts


def build_database(cluster: ScratchPostgres, dbname: str, size_mb: float) -> DatabaseInfo:
    """Create `dbname` in the cluster and fill it to about `size_mb` MB (tables in two sessions)."""
    started = time.monotonic()
    with psycopg.connect(cluster.conninfo(), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{dbname}"')
    counts = row_counts(size_mb)
    params = {"customers": counts["customers"], "products": counts["products"], "orders": counts["orders"]}
    with psycopg.connect(cluster.conninfo(dbname), autocommit=True) as conn:
        conn.execute(_DDL)

    def fill(table: str) -> None:
        with psycopg.connect(cluster.conninfo(dbname), autocommit=True) as conn:
            conn.execute("SET synchronous_commit = off")
            statement = _FILL[table]
            for key, value in {**params, "rows": counts[table]}.items():
                statement = statement.replace(f"%({key})s", str(int(value)))
            conn.execute(statement.encode())

    # Largest first, two at a time (two cores).
    order = sorted(_FILL, key=lambda t: -TABLES[t][0])
    with ThreadPoolExecutor(max_workers=2) as pool:
        for future in [pool.submit(fill, table) for table in order]:
            future.result()
    with psycopg.connect(cluster.conninfo(dbname), autocommit=True) as conn:
        for statement in filter(None, (s.strip() for s in _CONSTRAINTS.split(";"))):
            conn.execute(statement)
        conn.execute("VACUUM (FREEZE, ANALYZE)")
        conn.execute("CHECKPOINT")
        size = fetch_value(conn, "SELECT pg_database_size(current_database())")
    info = DatabaseInfo(dbname, size_mb, int(size), sum(counts.values()), time.monotonic() - started)
    log.info("built %s: %.0f MB on disk, %d rows in %.0f s", dbname, info.size_bytes / MB, info.rows, info.seconds)
    return info


def table_sizes(cluster: ScratchPostgres, dbname: str) -> dict[str, tuple[int, int]]:
    """(rows, total bytes) per table, for calibrating TABLES."""
    with psycopg.connect(cluster.conninfo(dbname)) as conn:
        result = {}
        for table in TABLES:
            rows = fetch_value(conn, f"SELECT count(*) FROM {SCHEMA}.{table}")
            size = fetch_value(conn, "SELECT pg_total_relation_size(%s::regclass)", (f"{SCHEMA}.{table}",))
            result[table] = (int(rows), int(size))
        return result


def new_cluster(name: str, settings: dict[str, str]) -> ScratchPostgres:
    cluster = ScratchPostgres.new(name=name, owner=f"bench:{name}")
    cluster.create(settings)
    cluster.start()
    return cluster
