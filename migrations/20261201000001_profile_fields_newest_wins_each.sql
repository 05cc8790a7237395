-- Each profile field is newest-wins on its own (issue 12): one (time, message id) marker
-- per field instead of one for nickname and avatar together, so a message that carries
-- only a nickname and a later one that carries only an avatar give the same row in
-- either order. The old marker becomes each set field's marker (never older than the
-- message that set it: newer messages still win). The old columns stay, unused, for
-- one release: workers of the previous release still write them during a rolling
-- upgrade; a later migration drops them.

ALTER TABLE customer
    ADD COLUMN nickname_at         BIGINT      NULL AFTER avatar,
    ADD COLUMN nickname_message_id VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL AFTER nickname_at,
    ADD COLUMN avatar_at           BIGINT      NULL AFTER nickname_message_id,
    ADD COLUMN avatar_message_id   VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL AFTER avatar_at;

UPDATE customer
SET updated_at = updated_at,
    nickname_at = IF(nickname IS NULL, NULL, profile_at),
    nickname_message_id = IF(nickname IS NULL, NULL, profile_message_id),
    avatar_at = IF(avatar IS NULL, NULL, profile_at),
    avatar_message_id = IF(avatar IS NULL, NULL, profile_message_id)
WHERE profile_at IS NOT NULL;
