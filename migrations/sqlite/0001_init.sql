-- Rooms, members, users and message history for the embedded (SQLite) store.
-- Times are milliseconds since the Unix epoch (UTC).
-- Migrations are never edited once landed: add a new file instead.

CREATE TABLE rooms (
    id         TEXT PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('global', 'public', 'private', 'direct')),
    name       TEXT NOT NULL,
    owner_id   TEXT,
    created_at INTEGER NOT NULL,
    -- The newest seq handed out in this room; bumped in the same transaction
    -- as the insert of the message that takes it, so seqs never have gaps.
    last_seq   INTEGER NOT NULL DEFAULT 0
);

-- Members of private and direct rooms (and the creator of public ones).
CREATE TABLE room_members (
    room_id  TEXT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    user_id  TEXT NOT NULL,
    added_at INTEGER NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
-- "Which rooms is this user in?" (room listing).
CREATE INDEX room_members_by_user ON room_members (user_id);

-- The last display name seen for each user (member lists).
CREATE TABLE users (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE TABLE messages (
    room_id    TEXT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    seq        INTEGER NOT NULL,
    id         TEXT NOT NULL UNIQUE,
    user_id    TEXT NOT NULL,
    -- The sender's display name when the message was sent.
    user_name  TEXT NOT NULL,
    -- Emptied when the message is deleted (tombstone).
    body       TEXT NOT NULL,
    client_id  TEXT,
    created_at INTEGER NOT NULL,
    deleted_at INTEGER,
    -- History pages and resume read by (room_id, seq): the primary key is the index.
    PRIMARY KEY (room_id, seq)
) WITHOUT ROWID;

-- Idempotent sends: one message per (room, user, client_id).
CREATE UNIQUE INDEX messages_idempotency
    ON messages (room_id, user_id, client_id)
    WHERE client_id IS NOT NULL;

INSERT INTO rooms (id, kind, name, owner_id, created_at)
VALUES ('global', 'global', 'Global', NULL, CAST(strftime('%s', 'now') AS INTEGER) * 1000);
