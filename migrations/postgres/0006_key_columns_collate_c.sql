-- Identifiers are compared byte for byte. Under the database's default
-- collation (a libc locale such as en_US.UTF-8, or even C.UTF-8 before
-- PostgreSQL 17) every B-tree comparison of a text key copies both values
-- to NUL-terminated buffers and calls strcoll: that was about a sixth of
-- PostgreSQL's CPU in a 250-message append, on the three indexes each
-- message enters. With COLLATE "C" the comparison is a memcmp.
-- Identifiers are opaque (room, message and user ids are ASCII; a
-- client's idempotency key may be any text), and equality under a
-- deterministic collation was already byte equality, so no lookup changes
-- its answer; the only order that changes is the tie-break on ids in
-- listings, which becomes byte order, as SQLite's store already sorts.
-- Changing only a column's collation keeps its rows (no table rewrite);
-- the indexes on it are rebuilt, in this migration's transaction.
ALTER TABLE rooms ALTER COLUMN id TYPE TEXT COLLATE "C";
ALTER TABLE room_members
    ALTER COLUMN room_id TYPE TEXT COLLATE "C",
    ALTER COLUMN user_id TYPE TEXT COLLATE "C";
ALTER TABLE users ALTER COLUMN id TYPE TEXT COLLATE "C";
ALTER TABLE messages
    ALTER COLUMN room_id TYPE TEXT COLLATE "C",
    ALTER COLUMN id TYPE TEXT COLLATE "C",
    ALTER COLUMN user_id TYPE TEXT COLLATE "C",
    ALTER COLUMN client_id TYPE TEXT COLLATE "C";
