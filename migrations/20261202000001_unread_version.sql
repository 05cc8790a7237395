-- Unread counters (issue 13). The truth is in `session`: `read_up_to` is the read
-- watermark (the newest receipt's), `expired_up_to` the one expiry implies (just before
-- the newest message that followed a silence longer than unread.expire_after_days),
-- `unread_count` the messages sent after both, and `unread_version` increases with every
-- change, so that a copy kept elsewhere (Redis) can apply changes in any order and keep
-- the newest.

ALTER TABLE session
    ADD COLUMN expired_up_to  BIGINT          NULL AFTER read_up_to,
    ADD COLUMN unread_version BIGINT UNSIGNED NOT NULL DEFAULT 0 AFTER unread_count;

-- Earlier releases wrote no receipts and kept no count: every stored message is unread.
-- (Stop the earlier release's workers before this one starts: they would go on
-- inserting messages without counting them.)
UPDATE session s
SET s.unread_count = (SELECT COUNT(*) FROM message m
                      WHERE m.session_id = s.id
                        AND (s.read_up_to IS NULL OR m.sent_at > s.read_up_to)),
    s.unread_version = 1,
    s.updated_at = s.updated_at;

-- Agents whose Redis copy may be behind MySQL (their changes could not reach Redis):
-- rebuilt when Redis answers again, by this worker or another one after a restart.
-- `token` is new (random) with every note, so a rebuild removes only the note it read.
CREATE TABLE IF NOT EXISTS unread_reconcile (
    tenant_id  VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    platform   VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    agent_id   VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    token      BIGINT UNSIGNED NOT NULL,
    noted_at   DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (tenant_id, platform, agent_id),
    KEY ix_unread_reconcile_noted (noted_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;
