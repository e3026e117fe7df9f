-- The foreign key from messages to rooms repeated, for every inserted
-- message, work the append already does once per room and batch: the
-- append locks each room's row (SELECT … FOR UPDATE) in the same
-- transaction and refuses an unknown room before inserting anything. The
-- key's trigger added an index lookup and a FOR KEY SHARE lock per message,
-- about a fifth of PostgreSQL's time under a heavy ingest.
-- The service never deletes rooms; whoever deletes one by hand deletes its
-- messages in the same transaction (DELETE FROM messages WHERE room_id = …).
ALTER TABLE messages DROP CONSTRAINT messages_room_id_fkey;
