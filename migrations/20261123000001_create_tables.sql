-- Applications are written synchronously (creation is rare); chats and messages are
-- written only by workers, as idempotent upserts keyed by their public numbers.
--
-- Chats and messages have no surrogate id: their primary key is the public address.
-- * The clustered index is then the list order: a page of a chat's messages is one
--   range scan, with no secondary index to maintain on the hot insert path.
-- * A message is keyed by (application_id, chat_number, number), not by a chat row id,
--   so a worker can persist it without waiting for its chat's row to exist.
-- `version` is the queue position at which the row's current content was accepted;
-- upserts keep the highest, so updates apply in acceptance order.

CREATE TABLE applications (
    id          BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    token       VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    name        VARCHAR(255) NOT NULL,
    chats_count BIGINT UNSIGNED NOT NULL DEFAULT 0,
    created_at  DATETIME(6) NOT NULL,
    updated_at  DATETIME(6) NOT NULL,
    PRIMARY KEY (id),
    UNIQUE KEY applications_token (token)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE chats (
    application_id BIGINT UNSIGNED NOT NULL,
    number         BIGINT UNSIGNED NOT NULL,
    title          VARCHAR(255) NULL,
    messages_count BIGINT UNSIGNED NOT NULL DEFAULT 0,
    version        BIGINT UNSIGNED NOT NULL,
    created_at     DATETIME(6) NOT NULL,
    updated_at     DATETIME(6) NOT NULL,
    PRIMARY KEY (application_id, number),
    CONSTRAINT chats_application FOREIGN KEY (application_id) REFERENCES applications (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

CREATE TABLE messages (
    application_id BIGINT UNSIGNED NOT NULL,
    chat_number    BIGINT UNSIGNED NOT NULL,
    number         BIGINT UNSIGNED NOT NULL,
    body           TEXT NOT NULL,
    version        BIGINT UNSIGNED NOT NULL,
    created_at     DATETIME(6) NOT NULL,
    updated_at     DATETIME(6) NOT NULL,
    PRIMARY KEY (application_id, chat_number, number),
    CONSTRAINT messages_application FOREIGN KEY (application_id) REFERENCES applications (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
