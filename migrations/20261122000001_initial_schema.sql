-- Customers, sessions and messages of im-ingest (DESIGN.md, "Tables").
--
-- Every natural key has a UNIQUE index: that index, not the Redis lock, is what
-- guarantees that a customer, session or message exists once. Every string column of a
-- natural key uses utf8mb4_bin, so ids that differ only in case are different ids.
-- Times are epoch milliseconds (BIGINT), as the platforms send them: exact, and free
-- of the server's time zone.

CREATE TABLE IF NOT EXISTS customer (
    id                 BIGINT       NOT NULL AUTO_INCREMENT,
    tenant_id          VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    platform           VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    external_user_id   VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    nickname           VARCHAR(255) NULL,
    avatar             VARCHAR(2048) NULL,
    -- (profile_at, profile_message_id) of the message that last set nickname/avatar:
    -- newest wins, so the order in which messages are applied never matters.
    profile_at         BIGINT       NULL,
    profile_message_id VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NULL,
    created_at         DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    updated_at         DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    UNIQUE KEY uk_customer_natural (tenant_id, platform, external_user_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS session (
    id              BIGINT       NOT NULL AUTO_INCREMENT,
    tenant_id       VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    platform        VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    customer_id     BIGINT       NOT NULL,
    -- The to_user_id string exactly as received (our agent/account on the platform).
    agent_id        VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    last_message_at BIGINT       NULL,
    -- Read watermark: messages with sent_at <= read_up_to are read.
    read_up_to      BIGINT       NULL,
    unread_count    INT UNSIGNED NOT NULL DEFAULT 0,
    created_at      DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    updated_at      DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    UNIQUE KEY uk_session_natural (tenant_id, platform, customer_id, agent_id),
    KEY ix_session_agent (tenant_id, platform, agent_id),
    KEY ix_session_customer (customer_id),
    CONSTRAINT fk_session_customer FOREIGN KEY (customer_id) REFERENCES customer (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS message (
    id                  BIGINT       NOT NULL AUTO_INCREMENT,
    tenant_id           VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    platform            VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    external_message_id VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    session_id          BIGINT       NOT NULL,
    customer_id         BIGINT       NOT NULL,
    message_type        VARCHAR(64)  NOT NULL DEFAULT '',
    content             MEDIUMTEXT   NOT NULL,
    sent_at             BIGINT       NOT NULL,
    -- Provenance: the record whose processing inserted the row (for a record that came
    -- through a delay topic, its kafka_dlt-original-* coordinates).
    source_topic        VARCHAR(249) NOT NULL,
    source_partition    INT          NOT NULL,
    source_offset       BIGINT       NOT NULL,
    created_at          DATETIME(3)  NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id),
    UNIQUE KEY uk_message_natural (tenant_id, platform, external_message_id),
    KEY ix_message_session_sent (session_id, sent_at),
    KEY ix_message_customer (customer_id),
    CONSTRAINT fk_message_session FOREIGN KEY (session_id) REFERENCES session (id),
    CONSTRAINT fk_message_customer FOREIGN KEY (customer_id) REFERENCES customer (id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_unicode_ci;
