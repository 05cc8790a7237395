-- Unread counters (issue 13): the truth is in `session` (read_up_to, unread_count), and
-- every change to a session's unread state increases its version, so that a copy kept
-- elsewhere (Redis) can apply changes in any order and keep the newest.

ALTER TABLE session
    ADD COLUMN unread_version BIGINT UNSIGNED NOT NULL DEFAULT 0 AFTER unread_count;

-- Agents whose Redis copy may be behind MySQL (written while Redis was unreachable):
-- reconciled when Redis answers again, by this worker or another one after a restart.
CREATE TABLE IF NOT EXISTS unread_reconcile (
    tenant_id  VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    platform   VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    agent_id   VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    noted_at   DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (tenant_id, platform, agent_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;
