#!/usr/bin/env bash
# Local services for im-ingest, without Docker: Apache Kafka (KRaft, from Maven Central
# jars), MariaDB and Redis (Debian packages), on loopback only.
#
#   scripts/stack.sh up     [kafka|mariadb|redis ...]   install what is missing, start, wait until ready
#   scripts/stack.sh down   [kafka|mariadb|redis ...]   stop what this script started
#   scripts/stack.sh status [kafka|mariadb|redis ...]   show each service, its port, whether it answers
#
# With --secure (e.g. `scripts/stack.sh up --secure`), the same commands act on a second,
# secured set beside the plain one: Kafka SSL with client certificates and SASL_SSL
# (PLAIN, SCRAM-SHA-256/512), MariaDB with TLS required and a least-privilege user, Redis
# over TLS with an ACL user; certificates and passwords are generated on the first `up`
# under STACK_DIR/secure (see scripts/stack-secure.sh and README "Security").
#
# Idempotent: a service already answering on its port is reused (and said so); one this
# script manages that has died is started again. State lives under STACK_DIR.
#
# Environment (all optional):
#   STACK_DIR              state, logs, jars           (default: <repo>/.stack)
#   KAFKA_PORT             broker listener             (default: 9092)
#   KAFKA_CONTROLLER_PORT  KRaft controller listener   (default: 9093)
#   KAFKA_HEAP             JVM heap for the broker     (default: 1g)
#   MARIADB_PORT           MariaDB                     (default: 3306)
#   REDIS_PORT             Redis                       (default: 6379)
#   STACK_WAIT_SECONDS     readiness bound per service (default: 120)
#   SECURE_KAFKA_SSL_PORT, SECURE_KAFKA_SASL_PORT, SECURE_KAFKA_CONTROLLER_PORT,
#   SECURE_MARIADB_PORT, SECURE_REDIS_PORT   --secure ports (9192, 9193, 9194, 3307, 6380)
#   SECURE_KAFKA_HEAP      JVM heap of the secure broker (default: 512m)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STACK_DIR=${STACK_DIR:-$ROOT/.stack}
KAFKA_PORT=${KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-9093}
KAFKA_HEAP=${KAFKA_HEAP:-1g}
MARIADB_PORT=${MARIADB_PORT:-3306}
REDIS_PORT=${REDIS_PORT:-6379}
STACK_WAIT_SECONDS=${STACK_WAIT_SECONDS:-120}
SECURE_KAFKA_HEAP=${SECURE_KAFKA_HEAP:-512m}
HOST=127.0.0.1
ALL_SERVICES=(kafka mariadb redis)
# Set by --secure: act on the secured services (scripts/stack-secure.sh).
SECURE=false
# shellcheck source=scripts/stack-secure.sh
. "$ROOT/scripts/stack-secure.sh"

# Where a service's state lives: STACK_DIR/<svc>, or STACK_DIR/secure/<svc>.
label() { if $SECURE; then echo "$1 (secure)"; else echo "$1"; fi; }
state_dir() { if $SECURE; then echo "$SECURE_DIR/$1"; else echo "$STACK_DIR/$1"; fi; }

say() { printf '%s\n' "$*"; }
die() { printf 'stack: %s\n' "$*" >&2; exit 1; }

usage() {
  sed -n '2,30p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# ---------------------------------------------------------------- helpers

port_of() {
  if $SECURE; then secure_port_of "$1"; return; fi
  case $1 in
    kafka) echo "$KAFKA_PORT" ;;
    mariadb) echo "$MARIADB_PORT" ;;
    redis) echo "$REDIS_PORT" ;;
  esac
}

pid_file() { echo "$(state_dir "$1")/pid"; }

# The pid of the process this script started for a service, if it is still alive.
managed_pid() {
  local file pid
  file=$(pid_file "$1")
  [ -f "$file" ] || return 1
  pid=$(cat "$file")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  # A killed service whose new parent has not reaped it yet is a zombie: dead.
  case $(ps -o stat= -p "$pid" 2>/dev/null) in Z*|"") return 1 ;; esac
  echo "$pid"
}

log_file() {
  case $1 in
    kafka) echo "$(state_dir kafka)/server.log" ;;
    mariadb) echo "$(state_dir mariadb)/error.log" ;;
    redis) echo "$(state_dir redis)/redis.log" ;;
  esac
}

show_log_tail() {
  local svc=$1 file
  for file in "$(log_file "$svc")" "$(state_dir "$svc")/stdout.log"; do
    if [ -s "$file" ]; then
      printf -- '--- last lines of %s ---\n' "$file" >&2
      tail -n 30 "$file" >&2
    fi
  done
}

# Readiness means a real answer over TCP, not an open port.
answers() {
  if $SECURE; then secure_answers "$1" >/dev/null 2>&1; return; fi
  case $1 in
    kafka) python3 "$ROOT/scripts/kafka/kafka_ready.py" "$HOST" "$KAFKA_PORT" 2>/dev/null ;;
    mariadb) mariadb --no-defaults --protocol=TCP -h "$HOST" -P "$MARIADB_PORT" -u root \
               --connect-timeout=2 -e 'SELECT 1' >/dev/null 2>&1 ;;
    redis) [ "$(redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] ;;
  esac
}

why_not() {
  if $SECURE; then secure_answers "$1" || true; return; fi
  case $1 in
    kafka) python3 "$ROOT/scripts/kafka/kafka_ready.py" "$HOST" "$KAFKA_PORT" 2>&1 || true ;;
    mariadb) mariadb --no-defaults --protocol=TCP -h "$HOST" -P "$MARIADB_PORT" -u root \
               --connect-timeout=2 -e 'SELECT 1' 2>&1 >/dev/null || true ;;
    redis) redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>&1 || true ;;
  esac
}

wait_ready() {
  local svc=$1 pid=$2 deadline=$((SECONDS + STACK_WAIT_SECONDS))
  while ! answers "$svc"; do
    if ! managed_pid "$svc" >/dev/null; then
      printf 'stack: %s (pid %s) exited during start-up\n' "$svc" "$pid" >&2
      show_log_tail "$svc"
      exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      printf 'stack: %s did not answer on %s:%s within %ss: %s\n' \
        "$svc" "$HOST" "$(port_of "$svc")" "$STACK_WAIT_SECONDS" "$(why_not "$svc")" >&2
      show_log_tail "$svc"
      exit 1
    fi
    sleep 0.5
  done
}

# Starts a command detached from this shell (it outlives the script) and records its pid.
spawn() {
  local svc=$1; shift
  mkdir -p "$(state_dir "$svc")"
  # 9>&-: the service must not inherit (and so hold forever) this script's lock.
  setsid nohup "$@" >"$(state_dir "$svc")/stdout.log" 2>&1 </dev/null 9>&- &
  echo $! >"$(pid_file "$svc")"
}

apt_install() {
  command -v apt-get >/dev/null || die "apt-get not found: install $* by hand"
  say "installing $* (apt)"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq >/dev/null || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null \
    || die "apt-get install $* failed"
}

run_user() { id -un; }

# ---------------------------------------------------------------- kafka

KAFKA_LIB=$STACK_DIR/kafka/lib

install_kafka() {
  command -v java >/dev/null || die "java not found: Kafka needs Java 17+"
  local stamp="$KAFKA_LIB/.pom-sha"
  local want
  want=$(sha256sum "$ROOT/scripts/kafka/pom.xml" | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  command -v mvn >/dev/null || die "mvn not found: it fetches the Kafka jars from Maven Central"
  say "fetching Kafka jars from Maven Central (once)"
  rm -rf "$KAFKA_LIB"
  mkdir -p "$KAFKA_LIB"
  if ! mvn -q -B -f "$ROOT/scripts/kafka/pom.xml" \
      -Dmaven.repo.local="$STACK_DIR/m2" \
      dependency:copy-dependencies -DincludeScope=runtime \
      -DoutputDirectory="$KAFKA_LIB" >"$STACK_DIR/kafka/mvn.log" 2>&1; then
    tail -n 30 "$STACK_DIR/kafka/mvn.log" >&2
    die "fetching the Kafka jars failed (log above)"
  fi
  echo "$want" >"$stamp"
}

write_kafka_config() {
  local dir=$STACK_DIR/kafka
  cat >"$dir/server.properties" <<EOF
# Written by scripts/stack.sh: single-node KRaft (broker + controller), loopback only.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$dir/data
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
EOF
}

start_kafka() {
  install_kafka
  write_kafka_config
  format_and_start_kafka kafka "$STACK_DIR/kafka" "$KAFKA_HEAP"
}

# Formats the log directory under $2 on first use (arguments after the heap size go to
# StorageTool format, e.g. SCRAM users) and starts the broker of $2/server.properties.
# $1 names it in errors.
format_and_start_kafka() {
  local label=$1 dir=$2 heap=$3
  shift 3
  local java_opts=(-Xms"$heap" -Xmx"$heap"
    -Dlog4j2.configurationFile="$ROOT/scripts/kafka/log4j2.properties"
    -Dkafka.logs.dir="$dir")
  if [ ! -f "$dir/data/meta.properties" ]; then
    local cluster_id
    cluster_id=$(java -cp "$KAFKA_LIB/*" "${java_opts[@]}" kafka.tools.StorageTool random-uuid) \
      || die "$label: could not generate a cluster id"
    java -cp "$KAFKA_LIB/*" "${java_opts[@]}" kafka.tools.StorageTool format \
      -t "$cluster_id" -c "$dir/server.properties" --ignore-formatted "$@" >"$dir/format.log" 2>&1 \
      || { cat "$dir/format.log" >&2; die "$label: formatting the log directory failed"; }
  fi
  spawn kafka java -cp "$KAFKA_LIB/*" "${java_opts[@]}" kafka.Kafka "$dir/server.properties"
}

# ---------------------------------------------------------------- mariadb

start_mariadb() {
  local dir=$STACK_DIR/mariadb
  command -v mariadbd >/dev/null || apt_install mariadb-server mariadb-client
  mkdir -p "$dir"
  if [ ! -d "$dir/data/mysql" ]; then
    # Debian's root uses unix_socket auth; "normal" gives a passwordless root over TCP.
    mariadb-install-db --no-defaults --datadir="$dir/data" --user="$(run_user)" \
      --auth-root-authentication-method=normal --skip-test-db >"$dir/install.log" 2>&1 \
      || { tail -n 30 "$dir/install.log" >&2; die "mariadb: mariadb-install-db failed"; }
  fi
  spawn mariadb mariadbd --no-defaults --datadir="$dir/data" --user="$(run_user)" \
    --bind-address="$HOST" --port="$MARIADB_PORT" --socket="$dir/mariadbd.sock" \
    --pid-file="$dir/mariadbd.pid" --log-error="$dir/error.log" \
    --character-set-server=utf8mb4 --collation-server=utf8mb4_unicode_ci \
    --max-connections=1000 --innodb-buffer-pool-size=256M \
    --innodb-flush-log-at-trx-commit=2
}

# ---------------------------------------------------------------- redis

start_redis() {
  local dir=$STACK_DIR/redis
  command -v redis-server >/dev/null || apt_install redis-server
  mkdir -p "$dir"
  spawn redis redis-server --bind "$HOST" --port "$REDIS_PORT" --dir "$dir" \
    --save '' --appendonly no --daemonize no --logfile "$dir/redis.log"
}

# ---------------------------------------------------------------- client tools

ensure_clients() {
  local missing=()
  command -v python3 >/dev/null || die "python3 not found: it checks Kafka readiness"
  command -v mariadb >/dev/null || missing+=(mariadb-client)
  command -v redis-cli >/dev/null || missing+=(redis-tools)
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
}

# ---------------------------------------------------------------- commands

up_one() {
  local svc=$1 port pid
  port=$(port_of "$svc")
  if answers "$svc"; then
    if pid=$(managed_pid "$svc"); then
      # A first `up` stopped after the server answered may have left its users uncreated.
      if $SECURE && [ "$svc" = mariadb ]; then secure_mariadb_users; fi
      say "$(label "$svc"): already running on $HOST:$port (managed, pid $pid)"
    else
      say "$(label "$svc"): already answering on $HOST:$port, reusing it (not managed by this script)"
    fi
    return 0
  fi
  if pid=$(managed_pid "$svc"); then
    say "$(label "$svc"): managed process $pid is not answering yet, waiting"
  else
    if [ -f "$(pid_file "$svc")" ]; then
      say "$(label "$svc"): managed process died, starting it again"
      rm -f "$(pid_file "$svc")"
    fi
    if $SECURE; then "start_secure_$svc"; else "start_$svc"; fi
    pid=$(managed_pid "$svc") || { show_log_tail "$svc"; die "$svc: exited at once"; }
  fi
  wait_ready "$svc" "$pid"
  if $SECURE && [ "$svc" = mariadb ]; then secure_mariadb_users; fi
  say "$(label "$svc"): ready on $HOST:$port (managed, pid $pid)"
}

down_one() {
  local svc=$1 pid
  if ! pid=$(managed_pid "$svc"); then
    rm -f "$(pid_file "$svc")"
    say "$(label "$svc"): not started by this script, left alone"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 30))
  while managed_pid "$svc" >/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      say "$(label "$svc"): pid $pid ignored SIGTERM for 30s, killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    sleep 0.2
  done
  rm -f "$(pid_file "$svc")"
  say "$(label "$svc"): stopped"
}

status_one() {
  local svc=$1 port pid state owner
  port=$(port_of "$svc")
  if answers "$svc"; then state=answering; else state="not answering"; fi
  if pid=$(managed_pid "$svc"); then owner="managed, pid $pid"; else owner="not managed"; fi
  printf '%-17s %s:%-10s %s (%s)\n' "$(label "$svc")" "$HOST" "$port" "$state" "$owner"
}

main() {
  local cmd=${1:-}
  [ -n "$cmd" ] || { usage; exit 2; }
  shift
  local services=() arg
  for arg in "$@"; do
    if [ "$arg" = --secure ]; then SECURE=true; else services+=("$arg"); fi
  done
  [ ${#services[@]} -gt 0 ] || services=("${ALL_SERVICES[@]}")
  local svc
  for svc in "${services[@]}"; do
    case $svc in kafka|mariadb|redis) ;; *) die "unknown service '$svc' (kafka, mariadb, redis)" ;; esac
  done
  mkdir -p "$STACK_DIR"
  # One stack.sh at a time per state directory: parallel callers wait for each other.
  exec 9>"$STACK_DIR/.lock"
  flock 9
  case $cmd in
    up) ensure_clients; if $SECURE; then ensure_certificates; fi; for svc in "${services[@]}"; do up_one "$svc"; done ;;
    down) for svc in "${services[@]}"; do down_one "$svc"; done ;;
    status) ensure_clients; for svc in "${services[@]}"; do status_one "$svc"; done ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

main "$@"
