"""The PostgreSQL store's schema and statements: ``MIGRATIONS``, and every statement's text,
built once from the column lists (arrays in, ``unnest`` to rows: one statement a batch)."""

from __future__ import annotations

from typing import Final

from keeplink._core.commands import CommandState
from keeplink.outbox._rows import COMMAND_COLUMNS, DEVICE_COLUMNS

MIGRATIONS: Final[list[str]] = [
    # 1: the initial schema (the SQLite store's version 3, with partial indexes).
    """
    CREATE TABLE commands (
        seq               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id                TEXT NOT NULL UNIQUE,
        device            TEXT NOT NULL,
        op                TEXT NOT NULL,
        args              TEXT NOT NULL,
        state             TEXT NOT NULL,
        created_at        DOUBLE PRECISION NOT NULL,
        updated_at        DOUBLE PRECISION NOT NULL,
        idempotency_key   TEXT NOT NULL,
        key               TEXT,
        priority          BIGINT NOT NULL,
        max_attempts      BIGINT NOT NULL,
        attempts          BIGINT NOT NULL,
        expires_at        DOUBLE PRECISION,
        precondition      TEXT,
        precondition_args TEXT NOT NULL,
        error_code        TEXT,
        error_message     TEXT,
        result            TEXT,
        cycle             BIGINT NOT NULL,
        retry_at          DOUBLE PRECISION,
        CHECK ((error_code IS NULL) = (error_message IS NULL))
    );
    CREATE INDEX commands_queue ON commands (device, priority DESC, seq)
        WHERE state = 'queued';
    CREATE INDEX commands_sending ON commands (device) WHERE state = 'sending';
    CREATE INDEX commands_key ON commands (device, key)
        WHERE state = 'queued' AND key IS NOT NULL;
    CREATE INDEX commands_expiry ON commands (expires_at)
        WHERE state = 'queued' AND expires_at IS NOT NULL;
    CREATE INDEX commands_device ON commands (device, seq);
    CREATE INDEX commands_state ON commands (state, seq);
    CREATE TABLE devices (
        device        TEXT PRIMARY KEY,
        cycle         BIGINT NOT NULL,
        failed_cycles BIGINT NOT NULL,
        parked_reason TEXT,
        parked_until  DOUBLE PRECISION,
        failed_cycle  BIGINT NOT NULL
    );
    """,
    # 2: nodes of a fleet and the device leases they hold (with their fencing epochs).
    """
    CREATE TABLE nodes (
        node     TEXT PRIMARY KEY,
        seen_at  TIMESTAMPTZ NOT NULL,
        stopping BOOLEAN NOT NULL DEFAULT false
    );
    CREATE TABLE leases (
        device     TEXT PRIMARY KEY,
        node       TEXT,                      -- NULL: released
        epoch      BIGINT NOT NULL,           -- +1 at every change of owner
        expires_at TIMESTAMPTZ NOT NULL
    );
    CREATE INDEX leases_node ON leases (node);
    """,
    # 3: what each owner says of its devices (presence, link), for the other nodes' views.
    """
    CREATE TABLE device_status (
        device     TEXT PRIMARY KEY,
        node       TEXT NOT NULL,
        status     TEXT NOT NULL,             -- JSON object
        updated_at TIMESTAMPTZ NOT NULL
    );
    """,
]
"""Schema scripts; ``schema_version`` counts how many a database has applied."""

SCHEMA_VERSION: Final = len(MIGRATIONS)
MIGRATION_LOCK: Final = 0x6B6C_696E_6B00  # "klink": one advisory lock for all migrations

_COLUMN_TYPES: Final = {
    "seq": "bigint",
    "created_at": "float8",
    "updated_at": "float8",
    "priority": "bigint",
    "max_attempts": "bigint",
    "attempts": "bigint",
    "expires_at": "float8",
    "cycle": "bigint",
    "retry_at": "float8",
    "failed_cycles": "bigint",
    "failed_cycle": "bigint",
    "parked_until": "float8",
}


def _type(column: str) -> str:
    return _COLUMN_TYPES.get(column, "text")


COLUMNS: Final = ", ".join(COMMAND_COLUMNS)
INSERT_COLUMNS: Final = COMMAND_COLUMNS[1:]
INSERT_MANY: Final = (
    f"INSERT INTO commands ({', '.join(INSERT_COLUMNS)}) SELECT * FROM unnest("
    + ", ".join(f"${n + 1}::{_type(c)}[]" for n, c in enumerate(INSERT_COLUMNS))
    + ") RETURNING id, seq"
)
INSERT_ONE: Final = (
    f"WITH ins AS (INSERT INTO commands ({', '.join(INSERT_COLUMNS)}) SELECT "
    + ", ".join(f"${n + 2}::{_type(c)}" for n, c in enumerate(INSERT_COLUMNS))
    + " WHERE NOT EXISTS (SELECT 1 FROM commands WHERE id = $2) RETURNING seq, device) "
    "SELECT seq, pg_notify($1, device) FROM ins"
)
"""A submit alone: inserted unless its id exists (then no row, and no seq used up), and its
device's owner notified at commit, in one statement."""
INSERT_SUBMITS: Final = (
    f"WITH ins AS (INSERT INTO commands ({', '.join(INSERT_COLUMNS)}) SELECT * FROM unnest("
    + ", ".join(f"${n + 2}::{_type(c)}[]" for n, c in enumerate(INSERT_COLUMNS))
    + ") ON CONFLICT (id) DO NOTHING RETURNING id, seq, device), "
    "woke AS (SELECT count(pg_notify($1, d)) FROM (SELECT DISTINCT device AS d FROM ins) AS t) "
    "SELECT ins.id, ins.seq FROM ins, woke"
)
"""Submits only (a batch of lone inserts with distinct ids): each inserted unless its id
exists, and the owners of their devices notified at commit, in one statement that is its
own transaction: one round trip for the whole batch."""
UPDATE_COLUMNS: Final = COMMAND_COLUMNS[2:]
CAS_MANY: Final = (
    "UPDATE commands AS c SET "
    + ", ".join(f"{column} = v.{column}" for column in UPDATE_COLUMNS)
    + " FROM unnest($1::text[], $2::text[], "
    + ", ".join(f"${n + 3}::{_type(c)}[]" for n, c in enumerate(UPDATE_COLUMNS))
    + f") AS v(id, expect, {', '.join(UPDATE_COLUMNS)}) "
    "WHERE c.id = v.id AND c.state = v.expect RETURNING c.id"
)
SUPERSEDE: Final = (
    "UPDATE commands SET state = $5, updated_at = $4, error_code = $6, error_message = $7, "
    "retry_at = NULL WHERE device = $1 AND key = $2 AND state = 'queued' "
    "AND seq < (SELECT seq FROM commands WHERE id = $3) "
    f"RETURNING {COLUMNS}"
)
DEVICES_MANY: Final = (
    f"INSERT INTO devices ({', '.join(DEVICE_COLUMNS)}) SELECT * FROM unnest("
    + ", ".join(f"${n + 1}::{_type(c)}[]" for n, c in enumerate(DEVICE_COLUMNS))
    + ") ON CONFLICT (device) DO UPDATE SET "
    + ", ".join(f"{column} = excluded.{column}" for column in DEVICE_COLUMNS[1:])
)
SELECT: Final = f"SELECT {COLUMNS} FROM commands"
NOTIFY: Final = (
    "SELECT pg_notify($1, d) FROM unnest($2::text[]) WITH ORDINALITY AS t(d, n) ORDER BY n"
)
CURRENT_FENCES: Final = (
    "SELECT l.device, l.node, l.epoch FROM leases AS l "
    "JOIN unnest($1::text[], $2::text[], $3::bigint[]) AS f(device, node, epoch) "
    "ON l.device = f.device AND l.node = f.node AND l.epoch = f.epoch "
    "WHERE l.expires_at > clock_timestamp() FOR SHARE OF l"
)
STATUS_UPSERT: Final = (
    "INSERT INTO device_status (device, node, status, updated_at) "
    "SELECT d, $1, s, clock_timestamp() FROM unnest($2::text[], $3::text[]) AS t(d, s) "
    "ON CONFLICT (device) DO UPDATE SET node = excluded.node, status = excluded.status, "
    "updated_at = excluded.updated_at"
)
HEARTBEAT: Final = (
    "WITH me AS (INSERT INTO nodes (node, seen_at) VALUES ($1, clock_timestamp()) "
    "ON CONFLICT (node) DO UPDATE SET seen_at = excluded.seen_at, stopping = false) "
    "SELECT node FROM nodes WHERE NOT stopping "
    "AND seen_at > clock_timestamp() - make_interval(secs => $2) "
    "UNION SELECT $1"
)
ACQUIRE: Final = (
    "INSERT INTO leases (device, node, epoch, expires_at) "
    "SELECT d, $1, 1, clock_timestamp() + make_interval(secs => $3) FROM unnest($2::text[]) AS d "
    "ON CONFLICT (device) DO UPDATE SET node = excluded.node, epoch = leases.epoch + 1, "
    "expires_at = excluded.expires_at "
    "WHERE leases.node IS NULL OR leases.expires_at <= clock_timestamp() "
    "RETURNING device, epoch"
)
RENEW: Final = (
    "UPDATE leases AS l SET expires_at = clock_timestamp() + make_interval(secs => $4) "
    "FROM unnest($2::text[], $3::bigint[]) AS h(device, epoch) "
    "WHERE l.device = h.device AND l.epoch = h.epoch AND l.node = $1 "
    "AND l.expires_at > clock_timestamp() RETURNING l.device"
)
RELEASE: Final = (
    "UPDATE leases AS l SET node = NULL, expires_at = clock_timestamp() "
    "FROM unnest($2::text[], $3::bigint[]) AS h(device, epoch) "
    "WHERE l.device = h.device AND l.epoch = h.epoch AND l.node = $1"
)
SENDING: Final = CommandState.SENDING.value
