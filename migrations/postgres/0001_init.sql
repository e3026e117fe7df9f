-- Rooms, members, users and message history for the cluster (PostgreSQL) store.
-- Times are milliseconds since the Unix epoch (UTC), as in the SQLite schema.
-- Migrations are never edited once landed: add a new file instead.

CREATE TABLE rooms (
    id         TEXT PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('global', 'public', 'private', 'direct')),
    name       TEXT NOT NULL,
    owner_id   TEXT,
    created_at BIGINT NOT NULL,
    -- The newest seq handed out in this room. Appending a message takes this
    -- row's lock (UPDATE … RETURNING) and inserts in the same transaction, so
    -- concurrent writers on any pod get consecutive seqs with no gaps.
    last_seq   BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE room_members (
    room_id  TEXT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    user_id  TEXT NOT NULL,
    added_at BIGINT NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX room_members_by_user ON room_members (user_id);

CREATE TABLE users (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE messages (
    room_id    TEXT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    seq        BIGINT NOT NULL,
    id         TEXT NOT NULL UNIQUE,
    user_id    TEXT NOT NULL,
    user_name  TEXT NOT NULL,
    body       TEXT NOT NULL,
    client_id  TEXT,
    created_at BIGINT NOT NULL,
    deleted_at BIGINT,
    -- Cursor pagination and resume are range scans on this key (never OFFSET).
    PRIMARY KEY (room_id, seq)
);

CREATE UNIQUE INDEX messages_idempotency
    ON messages (room_id, user_id, client_id)
    WHERE client_id IS NOT NULL;

INSERT INTO rooms (id, kind, name, owner_id, created_at)
VALUES ('global', 'global', 'Global', NULL, (EXTRACT(EPOCH FROM now()) * 1000)::BIGINT);
