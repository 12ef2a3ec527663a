-- A subscriber resuming live delivery asks for the messages of one chat changed since a
-- version: this index answers it with a range scan instead of reading the whole chat.
CREATE INDEX messages_by_version ON messages (application_id, chat_number, version);
