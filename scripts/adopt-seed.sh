#!/usr/bin/env bash
# Seeds a database the way a team's naive writer leaves it, for measuring
# `im-ingest adopt` (BENCHMARKS.md, "Adopt"): the worker's tables without their unique
# keys, 100,000 users of whom every tenth is stored twice (each copy with a session),
# and 950,000 messages, each stored once per copy of its user (1,045,000 rows).
#
#   scripts/adopt-seed.sh DATABASE [MARIADB_PORT]
#
# Drops and recreates DATABASE on the local stack's MariaDB (root over TCP).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
db=${1:?usage: scripts/adopt-seed.sh DATABASE [MARIADB_PORT]}
port=${2:-3306}
sql() { mariadb --no-defaults --protocol=TCP -h 127.0.0.1 -P "$port" -u root "$@"; }
sql -e "DROP DATABASE IF EXISTS \`$db\`; CREATE DATABASE \`$db\` CHARACTER SET utf8mb4"
# The migrations, in order, with every UNIQUE KEY a plain KEY (as bench's naive writer has them).
cat migrations/*.sql | sed 's/UNIQUE KEY/KEY/' | sql "$db"
sql "$db" <<'SQL'
SET SESSION max_recursive_iterations = 2000000;
INSERT INTO customer (tenant_id, platform, external_user_id)
  WITH RECURSIVE seq(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM seq WHERE n < 109999)
  SELECT 't', '2', CONCAT('u', IF(n < 100000, n, (n - 100000) * 10)) FROM seq;
INSERT INTO session (tenant_id, platform, customer_id, agent_id, last_message_at)
  SELECT 't', '2', id, 'agent-7', 0 FROM customer;
INSERT INTO message (tenant_id, platform, external_message_id, session_id, customer_id,
                     message_type, content, sent_at, source_topic, source_partition, source_offset)
  WITH RECURSIVE seq(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM seq WHERE n < 949999)
  SELECT 't', '2', CONCAT('m', seq.n), s.id, c.id, 'TEXT', 'hello', 1000 + seq.n, 'seed', 0, seq.n
  FROM seq
  JOIN customer c ON c.tenant_id = 't' AND c.platform = '2'
                 AND c.external_user_id = CONCAT('u', seq.n MOD 100000)
  JOIN session s ON s.customer_id = c.id;
SELECT (SELECT COUNT(*) FROM customer) AS customers, (SELECT COUNT(*) FROM session) AS sessions,
       (SELECT COUNT(*) FROM message) AS messages;
SQL
