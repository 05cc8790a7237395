#!/usr/bin/env bash
# Installs the Debian packages im-ingest's build, local stack and checks need, if any is
# missing (apt-get update runs only then). Kafka itself comes from Maven Central via
# scripts/stack.sh; Rust, Java 17 and Maven are expected on the machine.
set -euo pipefail

packages=(
  pkg-config libssl-dev           # rdkafka's bundled librdkafka with TLS/SASL
  openssl                         # certificates of the --secure stack
  mariadb-server mariadb-client   # local MySQL-compatible database
  redis-server redis-tools        # local Redis
  docker-compose                  # validates docker-compose.yml (no engine needed)
)

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing ${missing[*]} (apt)"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
  "${missing[@]}" >/dev/null
