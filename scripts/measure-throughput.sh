#!/usr/bin/env bash
# Throughput of `im-ingest run` on the local stack, against a baseline measured in the
# same run: MESSAGES distinct messages of CUSTOMERS customers, each pushed COPIES times
# with random keys, form a backlog on a fresh 6-partition topic; then
#   1. baseline: a plain consumer reads the backlog doing nothing (examples/drain.rs);
#   2. the worker (release build) consumes it into a fresh database; timed from start-up
#      to the moment every distinct message is stored.
# Prints both rates and their ratio. Bounded: it gives up after 10 minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MESSAGES=${MESSAGES:-10000}
CUSTOMERS=${CUSTOMERS:-500}
COPIES=${COPIES:-2}

scripts/install-deps.sh
scripts/stack.sh up >/dev/null
cargo build --locked --release --quiet --bin im-ingest --example push --example drain

run="tp$(date +%s)"
topic="$run.in"
records=$((MESSAGES * COPIES))
export IM_INGEST__KAFKA__INBOUND_TOPIC=$topic IM_INGEST__KAFKA__RETRY_TOPIC=$run.retry \
  IM_INGEST__KAFKA__DLQ_TOPIC=$run.dlq IM_INGEST__KAFKA__GROUP_ID=$run.group \
  IM_INGEST__DATABASE__URL="mysql://root@127.0.0.1:${MARIADB_PORT:-3306}/im_$run" \
  IM_INGEST__LOG__FILTER=warn
target/release/examples/push --topic "$topic" --create-partitions 6 --run-id "$run" \
  --messages "$MESSAGES" --customers "$CUSTOMERS" --copies "$COPIES"
target/release/im-ingest migrate

baseline=$(target/release/examples/drain --topic "$topic" --records "$records")
echo "$baseline"

sql() {
  mariadb --no-defaults --protocol=TCP -h 127.0.0.1 -P "${MARIADB_PORT:-3306}" -u root \
    -N -B "im_$run" -e "$1"
}
start=$(date +%s.%N)
target/release/im-ingest run &
worker=$!
trap 'kill -TERM $worker 2>/dev/null || true; wait $worker 2>/dev/null || true' EXIT
deadline=$(( $(date +%s) + 600 ))
while [ "$(sql 'SELECT COUNT(*) FROM message')" -lt "$MESSAGES" ]; do
  [ "$(date +%s)" -lt "$deadline" ] || { echo "gave up after 10 minutes" >&2; exit 1; }
  sleep 0.1
done
end=$(date +%s.%N)
counts=$(sql 'SELECT (SELECT COUNT(*) FROM customer), (SELECT COUNT(*) FROM session), (SELECT COUNT(*) FROM message)')
python3 - "$start" "$end" "$records" "$MESSAGES" "$baseline" "$counts" <<'PY'
import sys
start, end, records, messages = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
baseline = float(sys.argv[5].split(": ")[1].split()[0])
customers, sessions, stored = sys.argv[6].split()
rate = records / (end - start)
print(f"worker: {records} records ({messages} messages) in {end - start:.2f}s: "
      f"{rate:.0f} records/s, {messages / (end - start):.0f} distinct messages/s")
print(f"stored: {customers} customers, {sessions} sessions, {stored} messages")
print(f"ratio worker/baseline: {rate / baseline:.3f}")
PY
