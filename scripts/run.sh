#!/usr/bin/env bash
# Runs im-ingest against the local stack: installs what is missing, brings Kafka,
# MariaDB and Redis up if needed (scripts/stack.sh), then runs the binary. Without
# arguments it applies the schema (`im-ingest migrate`); with arguments they are the
# im-ingest command line (e.g. `scripts/run.sh --help`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-deps.sh
scripts/stack.sh up
if [ $# -eq 0 ]; then
  set -- migrate
fi
cargo run --locked --quiet -- "$@"
