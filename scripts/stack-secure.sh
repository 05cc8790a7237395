# Sourced by scripts/stack.sh for `--secure`: the same three services, secured, beside
# the plain ones (own ports, own state under $STACK_DIR/secure). Nothing here listens
# beyond loopback. Certificates and passwords are generated on the first `up` and kept:
#
#   secure/tls/ca.pem                 the CA that signed every certificate below
#   secure/tls/server.pem, server.key the servers' certificate (localhost, 127.0.0.1)
#   secure/tls/client.pem, client.key a client certificate (CN=im-ingest) for Kafka mTLS
#   secure/secrets/<name>             one password per file (mode 0600)
#
# Kafka:   SSL on SECURE_KAFKA_SSL_PORT (client certificate required) and SASL_SSL on
#          SECURE_KAFKA_SASL_PORT (PLAIN user im_plain; SCRAM-SHA-256/512 user im_scram,
#          created at format time); no plaintext listener for clients. The standard
#          authorizer: ACLs apply to a resource that has some (kafka-tools' AclCommand is
#          in the jars); CN=im-ingest, the broker and the controller listener are super.
# MariaDB: TLS required (require_secure_transport); users im_admin (all rights on im_%
#          databases: migrations) and im_worker (SELECT, INSERT, UPDATE, DELETE only).
# Redis:   TLS only; the default user is off, ACL user im may run only what im-ingest
#          sends, on keys im:*.

SECURE_KAFKA_SSL_PORT=${SECURE_KAFKA_SSL_PORT:-9192}
SECURE_KAFKA_SASL_PORT=${SECURE_KAFKA_SASL_PORT:-9193}
SECURE_KAFKA_CONTROLLER_PORT=${SECURE_KAFKA_CONTROLLER_PORT:-9194}
SECURE_MARIADB_PORT=${SECURE_MARIADB_PORT:-3307}
SECURE_REDIS_PORT=${SECURE_REDIS_PORT:-6380}

SECURE_DIR=$STACK_DIR/secure
TLS_DIR=$SECURE_DIR/tls
SECRETS_DIR=$SECURE_DIR/secrets

# What the ACL user `im` may run: the lock and unread commands, the scripts that run
# them, and the connection set-up the client sends (see README "Security"). Redis 7.2+
# also gets CLIENT SETINFO from the client, which ignores a refusal.
REDIS_ACL_COMMANDS="+ping +hello +auth +client|setname +select \
+get +set +pttl +del +pexpire +eval +evalsha +script|load +script|exists \
+hget +hgetall +hset +hdel +hexists +hincrby"

# Prints a secret, creating it (random, 0600) on first use.
secret() {
  local file=$SECRETS_DIR/$1
  if [ ! -s "$file" ]; then
    mkdir -p "$SECRETS_DIR"
    (umask 077 && openssl rand -hex 16 >"$file")
  fi
  cat "$file"
}

# CA, server and client certificates, made once (again if any file is missing or they
# no longer verify, e.g. expired).
ensure_certificates() {
  local file complete=true
  for file in ca.pem ca.key server.pem server.key server-keystore.pem client.pem client.key; do
    [ -s "$TLS_DIR/$file" ] || complete=false
  done
  if $complete && openssl verify -CAfile "$TLS_DIR/ca.pem" "$TLS_DIR/server.pem" \
      "$TLS_DIR/client.pem" >/dev/null 2>&1 \
    && openssl x509 -checkend 86400 -noout -in "$TLS_DIR/server.pem" >/dev/null; then
    return 0
  fi
  command -v openssl >/dev/null || die "openssl not found: it makes the secure stack's certificates"
  rm -rf "$TLS_DIR"
  mkdir -p "$TLS_DIR"
  # Each step checked by hand: `set -e` does not apply inside a `( … ) || …` list.
  (
    cd "$TLS_DIR" || exit 1
    umask 077
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -keyout ca.key -out ca.pem \
      -subj "/CN=im-ingest local CA" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" || exit 1
    issue() { # name subject alt-names
      openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" || return 1
      printf 'basicConstraints=CA:FALSE\n%s' "$3" >"$1.ext" || return 1
      openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
        -days 825 -out "$1.pem" -extfile "$1.ext" || return 1
      rm -f "$1.csr" "$1.ext"
    }
    issue server "/CN=localhost" "subjectAltName=DNS:localhost,IP:127.0.0.1" || exit 1
    issue client "/CN=im-ingest" "" || exit 1
    # Kafka reads its key and certificate from one PEM file.
    cat server.key server.pem >server-keystore.pem || exit 1
    chmod 0644 ca.pem server.pem client.pem
  ) >"$SECURE_DIR/openssl.log" 2>&1 || { cat "$SECURE_DIR/openssl.log" >&2; die "making certificates failed"; }
  say "certificates made under $TLS_DIR (secure services already running keep their old ones until restarted)"
}

secure_port_of() {
  case $1 in
    kafka) echo "$SECURE_KAFKA_SSL_PORT,$SECURE_KAFKA_SASL_PORT" ;;
    mariadb) echo "$SECURE_MARIADB_PORT" ;;
    redis) echo "$SECURE_REDIS_PORT" ;;
  esac
}

secure_answers() {
  case $1 in
    kafka) python3 "$ROOT/scripts/kafka/kafka_ready.py" "$HOST" "$SECURE_KAFKA_SSL_PORT" \
             --tls "$TLS_DIR/ca.pem" "$TLS_DIR/client.pem" "$TLS_DIR/client.key" 2>&1 ;;
    mariadb) mariadb --no-defaults --protocol=TCP -h "$HOST" -P "$SECURE_MARIADB_PORT" \
               -u root --ssl --ssl-ca="$TLS_DIR/ca.pem" --ssl-verify-server-cert \
               --connect-timeout=2 -e 'SELECT 1' 2>&1 >/dev/null ;;
    redis) local answer
           answer=$(REDISCLI_AUTH=$(secret redis_im) redis-cli --tls --cacert "$TLS_DIR/ca.pem" \
             -h "$HOST" -p "$SECURE_REDIS_PORT" --user im ping 2>&1)
           [ "$answer" = PONG ] || { echo "$answer"; return 1; } ;;
  esac
}

start_secure_kafka() {
  local dir=$SECURE_DIR/kafka
  install_kafka
  mkdir -p "$dir"
  (umask 077 && cat >"$dir/server.properties" <<EOF
# Written by scripts/stack.sh --secure: single-node KRaft, SSL (mTLS) and SASL_SSL only.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$SECURE_KAFKA_CONTROLLER_PORT
listeners=SSL://$HOST:$SECURE_KAFKA_SSL_PORT,SASL_SSL://$HOST:$SECURE_KAFKA_SASL_PORT,CONTROLLER://$HOST:$SECURE_KAFKA_CONTROLLER_PORT
advertised.listeners=SSL://$HOST:$SECURE_KAFKA_SSL_PORT,SASL_SSL://$HOST:$SECURE_KAFKA_SASL_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=SSL
listener.security.protocol.map=SSL:SSL,SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT
ssl.keystore.type=PEM
ssl.keystore.location=$TLS_DIR/server-keystore.pem
ssl.truststore.type=PEM
ssl.truststore.location=$TLS_DIR/ca.pem
listener.name.ssl.ssl.client.auth=required
listener.name.sasl_ssl.ssl.client.auth=none
sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512
# ACLs enforced where a resource has some (the tests give one principal exactly the
# README's list); a resource without any stays open, so each test needs none. The
# broker itself (its certificate, and the controller listener on loopback) and the
# mTLS test client, which adds the ACLs, are super users.
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=true
super.users=User:CN=localhost;User:CN=im-ingest;User:ANONYMOUS
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_im_plain="$(secret kafka_im_plain)";
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
log.dirs=$dir/data
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
EOF
  )
  # The SCRAM users go in at format time (the broker has no other store for them).
  local scram
  scram=$(secret kafka_im_scram)
  format_and_start_kafka "kafka (secure)" "$dir" "$SECURE_KAFKA_HEAP" \
    --add-scram "SCRAM-SHA-256=[name=im_scram,password=$scram]" \
    --add-scram "SCRAM-SHA-512=[name=im_scram,password=$scram]"
}

start_secure_mariadb() {
  local dir=$SECURE_DIR/mariadb
  command -v mariadbd >/dev/null || apt_install mariadb-server mariadb-client
  mkdir -p "$dir"
  if [ ! -d "$dir/data/mysql" ]; then
    mariadb-install-db --no-defaults --datadir="$dir/data" --user="$(run_user)" \
      --auth-root-authentication-method=normal --skip-test-db \
      >"$dir/install.log" 2>&1 \
      || { tail -n 30 "$dir/install.log" >&2; die "mariadb (secure): mariadb-install-db failed"; }
  fi
  spawn mariadb mariadbd --no-defaults --datadir="$dir/data" --user="$(run_user)" \
    --bind-address="$HOST" --port="$SECURE_MARIADB_PORT" --socket="$dir/mariadbd.sock" \
    --pid-file="$dir/mariadbd.pid" --log-error="$dir/error.log" \
    --character-set-server=utf8mb4 --collation-server=utf8mb4_unicode_ci \
    --max-connections=300 --innodb-buffer-pool-size=64M \
    --innodb-flush-log-at-trx-commit=2 \
    --ssl-ca="$TLS_DIR/ca.pem" --ssl-cert="$TLS_DIR/server.pem" --ssl-key="$TLS_DIR/server.key" \
    --require-secure-transport=ON
}

# The users, over the local socket (the only way in without TLS). Idempotent, and the
# passwords follow the secret files.
secure_mariadb_users() {
  mariadb --no-defaults -S "$SECURE_DIR/mariadb/mariadbd.sock" -u root <<EOF \
    || die "mariadb (secure): creating the users failed"
DROP USER IF EXISTS ''@'localhost', ''@'$(hostname)';
CREATE USER IF NOT EXISTS 'im_admin'@'127.0.0.1';
ALTER USER 'im_admin'@'127.0.0.1' IDENTIFIED BY '$(secret mariadb_im_admin)' REQUIRE SSL;
GRANT ALL PRIVILEGES ON \`im\\_%\`.* TO 'im_admin'@'127.0.0.1';
CREATE USER IF NOT EXISTS 'im_worker'@'127.0.0.1';
ALTER USER 'im_worker'@'127.0.0.1' IDENTIFIED BY '$(secret mariadb_im_worker)' REQUIRE SSL;
GRANT SELECT, INSERT, UPDATE, DELETE ON \`im\\_%\`.* TO 'im_worker'@'127.0.0.1';
EOF
}

start_secure_redis() {
  local dir=$SECURE_DIR/redis
  command -v redis-server >/dev/null || apt_install redis-server
  mkdir -p "$dir"
  (umask 077 && cat >"$dir/redis.conf" <<EOF
# Written by scripts/stack.sh --secure: TLS only, ACL user im.
bind $HOST
port 0
tls-port $SECURE_REDIS_PORT
tls-cert-file $TLS_DIR/server.pem
tls-key-file $TLS_DIR/server.key
tls-ca-cert-file $TLS_DIR/ca.pem
tls-auth-clients no
dir $dir
save ""
appendonly no
daemonize no
logfile $dir/redis.log
user default off
user im on >$(secret redis_im) ~im:* resetchannels -@all $REDIS_ACL_COMMANDS
EOF
  )
  spawn redis redis-server "$dir/redis.conf"
}
