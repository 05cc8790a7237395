#!/usr/bin/env bash
# Runs im-ingest against the local stack: installs what is missing, brings Kafka,
# MariaDB and Redis up if needed (scripts/stack.sh), starts the worker (`im-ingest run`),
# pushes a demo burst of duplicated messages, prints what was stored, and keeps the
# worker running until Ctrl-C.
#
#   scripts/run.sh            worker + demo burst
#   scripts/run.sh ARGS...    the im-ingest command line instead (e.g. --help, migrate)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-deps.sh
scripts/stack.sh up
cargo build --locked --quiet --bin im-ingest --example push
if [ $# -gt 0 ]; then
  exec target/debug/im-ingest "$@"
fi

target/debug/im-ingest run &
worker=$!
trap 'kill -TERM $worker 2>/dev/null; wait $worker' EXIT INT TERM

run_id="demo-$(date +%s)"
messages=200
target/debug/examples/push --run-id "$run_id" --messages "$messages" --customers 5 --copies 2

sql() {
  mariadb --no-defaults --protocol=TCP -h 127.0.0.1 -P "${MARIADB_PORT:-3306}" -u root \
    -N -B im_ingest -e "$1" 2>/dev/null || echo 0
}
stored=0
for _ in $(seq 1 120); do
  stored=$(sql "SELECT COUNT(*) FROM message WHERE external_message_id LIKE '$run_id-%'")
  [ "$stored" -ge "$messages" ] && break
  sleep 0.5
done
customers=$(sql "SELECT COUNT(*) FROM customer WHERE external_user_id LIKE '$run_id-%'")
sessions=$(sql "SELECT COUNT(*) FROM session s JOIN customer c ON c.id = s.customer_id WHERE c.external_user_id LIKE '$run_id-%'")
echo "demo $run_id: pushed $((messages * 2)) records ($messages messages, each twice, 5 customers)"
echo "stored: $customers customers, $sessions sessions, $stored messages (expected 5, 5, $messages)"
echo "worker still running (pid $worker); Ctrl-C stops it"
wait $worker
