#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what is missing, brings the local stack
# up if needed (scripts/stack.sh, plain and --secure), checks formatting, lints (with and without the
# `failpoints` feature), validates docker-compose.yml, then runs every unit and
# integration test against the real services — built with `failpoints`, so the crash
# tests can abort the worker at its fault points. Extra arguments go to `cargo test`
# (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-deps.sh
scripts/stack.sh up
scripts/stack.sh up --secure

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
cargo clippy --locked --all-targets --features failpoints -- -D warnings
echo "== docker-compose.yml"
docker-compose -f docker-compose.yml config -q
echo "== cargo test"
cargo test --locked --features failpoints --lib --tests "$@"
