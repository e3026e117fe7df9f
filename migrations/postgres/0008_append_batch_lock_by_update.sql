-- A batch wrote each of its rooms' rows twice: a row lock (SELECT … FOR
-- UPDATE, which writes the lock into the row and a WAL record) and then
-- the update of last_seq. Now the update is the lock: one UPDATE advances
-- every room of the batch by its message count and returns where each
-- room's new seqs start. With one message per room, as a batch of many
-- connections' sends usually is, that takes about a tenth off PostgreSQL's
-- CPU per message (docs/benchmarks.md, twenty-first VM).
--
-- Rooms are still locked in one order, so two batches sharing rooms wait
-- for each other instead of deadlocking: the UPDATE visits the rooms in
-- the order of its sorted input (byte order, as rooms.id compares), or in
-- index order, which is the same. Only a sequential scan of rooms could
-- visit them otherwise, and the function turns those off itself, so the
-- order holds whatever the session (the store's sessions turn them off
-- too, but behind a transaction-mode pooler a session's settings may not
-- follow its statements).
--
-- The UPDATE's row lock (FOR NO KEY UPDATE, weaker than the FOR UPDATE
-- taken before) still makes appends to a room take turns, but no longer
-- waits for a membership being added to the room, which locks only the
-- room's key.
--
-- The update now runs inside the block that a retry of a committed send
-- undoes (unique_violation): undone with the inserts, it releases the
-- rooms; the retry path locks them again, in the same order, before 0004's
-- statement, unchanged, reads and advances them.
CREATE OR REPLACE FUNCTION chat_append_batch(
    in_rooms      TEXT[],
    in_ids        TEXT[],
    in_users      TEXT[],
    in_user_names TEXT[],
    in_bodies     TEXT[],
    in_clients    TEXT[],
    in_created    BIGINT[]
)
RETURNS TABLE (
    ord        BIGINT,
    duplicate  BOOLEAN,
    room_id    TEXT,
    seq        BIGINT,
    id         TEXT,
    user_id    TEXT,
    user_name  TEXT,
    body       TEXT,
    client_id  TEXT,
    created_at BIGINT,
    deleted_at BIGINT
)
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    new_ords BIGINT[];
    new_seqs BIGINT[];
BEGIN
    BEGIN
        WITH input AS (
            SELECT *
            FROM unnest(in_rooms, in_ids, in_users, in_user_names, in_bodies, in_clients, in_created)
                 WITH ORDINALITY AS t(room_id, id, user_id, user_name, body, client_id, created_at, ord)
        ),
        counts AS (
            SELECT i.room_id COLLATE "C" AS room_id, count(*) AS n
            FROM input i
            GROUP BY 1
            ORDER BY 1
        ),
        -- Unknown rooms update nothing: their messages get no seq below.
        advanced AS (
            UPDATE rooms r
            SET last_seq = r.last_seq + c.n
            FROM counts c
            WHERE r.id = c.room_id
            RETURNING r.id, r.last_seq - c.n AS first_seq
        ),
        fresh AS (
            SELECT i.*, a.first_seq + row_number() OVER (PARTITION BY i.room_id ORDER BY i.ord) AS seq
            FROM input i
            JOIN advanced a ON a.id = i.room_id
        ),
        inserted AS (
            INSERT INTO messages (room_id, seq, id, user_id, user_name, body, client_id, created_at)
            SELECT f.room_id, f.seq, f.id, f.user_id, f.user_name, f.body, f.client_id, f.created_at
            FROM fresh f
        )
        SELECT coalesce(array_agg(f.ord), '{}'), coalesce(array_agg(f.seq), '{}')
        INTO new_ords, new_seqs
        FROM fresh f;
    EXCEPTION WHEN unique_violation THEN
        -- Left NULL: a retry of a committed send is in the batch.
        NULL;
    END;
    IF new_ords IS NOT NULL THEN
        RETURN QUERY
        SELECT n.ord, false, NULL::TEXT, n.seq, NULL::TEXT, NULL::TEXT, NULL::TEXT, NULL::TEXT,
               NULL::TEXT, NULL::BIGINT, NULL::BIGINT
        FROM unnest(new_ords, new_seqs) AS n(ord, seq);
        RETURN;
    END IF;
    -- The rooms' last_seq read below is current once their locks are held.
    PERFORM 1
    FROM (SELECT rooms.id FROM rooms WHERE rooms.id = ANY (in_rooms)
          ORDER BY rooms.id FOR NO KEY UPDATE) l;
    -- 0004's path, unchanged: look each message up, insert only the new.
    RETURN QUERY
    WITH input AS (
        SELECT *
        FROM unnest(in_rooms, in_ids, in_users, in_user_names, in_bodies, in_clients, in_created)
             WITH ORDINALITY AS t(room_id, id, user_id, user_name, body, client_id, created_at, ord)
    ),
    committed AS (
        SELECT i.ord, m.room_id, m.seq, m.id, m.user_id, m.user_name, m.body, m.client_id,
               m.created_at, m.deleted_at
        FROM input i
        CROSS JOIN LATERAL (
            SELECT *
            FROM messages
            WHERE messages.room_id = i.room_id
              AND messages.user_id = i.user_id
              AND messages.client_id = i.client_id
            LIMIT 1
        ) m
    ),
    fresh AS (
        SELECT i.*, r.last_seq + row_number() OVER (PARTITION BY i.room_id ORDER BY i.ord) AS seq
        FROM input i
        JOIN rooms r ON r.id = i.room_id
        WHERE NOT EXISTS (SELECT 1 FROM committed c WHERE c.ord = i.ord)
    ),
    inserted AS (
        INSERT INTO messages (room_id, seq, id, user_id, user_name, body, client_id, created_at)
        SELECT f.room_id, f.seq, f.id, f.user_id, f.user_name, f.body, f.client_id, f.created_at
        FROM fresh f
    ),
    advanced AS (
        UPDATE rooms r
        SET last_seq = top.seq
        FROM (SELECT f.room_id, max(f.seq) AS seq FROM fresh f GROUP BY f.room_id) AS top
        WHERE r.id = top.room_id
    )
    SELECT f.ord, false, NULL::TEXT, f.seq, NULL::TEXT, NULL::TEXT, NULL::TEXT, NULL::TEXT,
           NULL::TEXT, NULL::BIGINT, NULL::BIGINT
    FROM fresh f
    UNION ALL
    SELECT c.ord, true, c.room_id, c.seq, c.id, c.user_id, c.user_name, c.body, c.client_id,
           c.created_at, c.deleted_at
    FROM committed c;
END
$$;
