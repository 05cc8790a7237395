-- The naive writer's tables: the same columns as migrations/, without the unique keys
-- (their natural keys keep plain indexes, so lookups stay fast and only the missing
-- uniqueness differs).
CREATE TABLE customer (
    id                 BIGINT       NOT NULL AUTO_INCREMENT,
    tenant_id          VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    platform           VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    external_user_id   VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    nickname           VARCHAR(255) NULL,
    avatar             VARCHAR(2048) NULL,
    profile_at         BIGINT       NULL,
    profile_message_id VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    created_at         DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    updated_at         DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    KEY ix_customer_natural (tenant_id, platform, external_user_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;

CREATE TABLE session (
    id              BIGINT       NOT NULL AUTO_INCREMENT,
    tenant_id       VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    platform        VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    customer_id     BIGINT       NOT NULL,
    agent_id        VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    last_message_at BIGINT       NULL,
    read_up_to      BIGINT       NULL,
    unread_count    INT UNSIGNED NOT NULL DEFAULT 0,
    created_at      DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    updated_at      DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    KEY ix_session_natural (tenant_id, platform, customer_id, agent_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;

CREATE TABLE message (
    id                  BIGINT       NOT NULL AUTO_INCREMENT,
    tenant_id           VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    platform            VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    external_message_id VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    session_id          BIGINT       NOT NULL,
    customer_id         BIGINT       NOT NULL,
    message_type        VARCHAR(64)  NOT NULL DEFAULT '',
    content             MEDIUMTEXT   NOT NULL,
    sent_at             BIGINT       NOT NULL,
    source_topic        VARCHAR(249) NOT NULL,
    source_partition    INT          NOT NULL,
    source_offset       BIGINT       NOT NULL,
    created_at          DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    KEY ix_message_natural (tenant_id, platform, external_message_id),
    KEY ix_message_session_sent (session_id, sent_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;
