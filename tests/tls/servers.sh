#!/usr/bin/env bash
# Throwaway TLS servers for the TLS test (tests/it/tls.rs), next to the shared
# ones, never instead of them:
#
#   servers.sh start DIR   certificates (a CA and a server certificate for
#                          127.0.0.1/localhost), then Postgres (ssl=on, plain
#                          connections refused), Redis (TLS port only) and a
#                          one-node Kafka with SASL_SSL (PLAIN) and SSL
#                          listeners, its keystore made with keytool.
#   servers.sh stop DIR    stops all three and removes nothing.
#
# Ports come from the environment: TLS_PG_PORT, TLS_REDIS_PORT,
# TLS_KAFKA_SASL_PORT, TLS_KAFKA_SSL_PORT, TLS_KAFKA_INTERNAL_PORT,
# TLS_KAFKA_CONTROLLER_PORT. The SASL user is coupon / coupon-secret.
source "$(dirname "$0")/../../infra/local/common.sh"

cmd=${1:?usage: servers.sh start|stop DIR}
dir=${2:?usage: servers.sh start|stop DIR}
pg_bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
pass=changeit

certificates() {
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=coupon test CA" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
    -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$dir/server.ext"
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 2 -extfile "$dir/server.ext" -out "$dir/server.crt" 2>/dev/null
  # Kafka: the key and chain in a JKS keystore, made with the JDK's keytool.
  openssl pkcs12 -export -in "$dir/server.crt" -inkey "$dir/server.key" -certfile "$dir/ca.crt" \
    -name kafka -passout "pass:$pass" -out "$dir/server.p12"
  keytool -importkeystore -noprompt -srckeystore "$dir/server.p12" -srcstoretype PKCS12 \
    -srcstorepass "$pass" -destkeystore "$dir/kafka.keystore.jks" -deststoretype JKS \
    -deststorepass "$pass" >/dev/null 2>&1
}

postgres_start() {
  local pg="$dir/pg"
  mkdir -p "$pg" "$dir/pgsock"
  cp "$dir/server.crt" "$dir/pg-server.crt"
  cp "$dir/server.key" "$dir/pg-server.key"
  chmod 600 "$dir/pg-server.key"
  if [[ $(id -u) == 0 ]]; then
    chown -R postgres "$pg" "$dir/pgsock" "$dir/pg-server.crt" "$dir/pg-server.key"
    chmod 755 "$dir"
    as_pg=(runuser -u postgres --)
  else
    as_pg=()
  fi
  "${as_pg[@]}" "$pg_bin/initdb" -D "$pg/data" -U postgres --auth=trust >"$dir/initdb.log" 2>&1
  cat >"$pg/data/pg_hba.conf" <<HBA
local   all all                trust
hostssl all all 127.0.0.1/32   trust
hostnossl all all 0.0.0.0/0    reject
HBA
  "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$pg/data" -l "$pg/postgres.log" -w -t 60 start \
    -o "-p $TLS_PG_PORT -c listen_addresses=127.0.0.1 -k $dir/pgsock -c ssl=on \
        -c ssl_cert_file=$dir/pg-server.crt -c ssl_key_file=$dir/pg-server.key \
        -c max_connections=60 -c shared_buffers=32MB -c fsync=off" >/dev/null
  "${as_pg[@]}" "$pg_bin/createdb" -h "$dir/pgsock" -p "$TLS_PG_PORT" -U postgres coupons
}

redis_start() {
  redis-server --port 0 --tls-port "$TLS_REDIS_PORT" --bind 127.0.0.1 \
    --tls-cert-file "$dir/server.crt" --tls-key-file "$dir/server.key" \
    --tls-ca-cert-file "$dir/ca.crt" --tls-auth-clients no \
    --save "" --appendonly no --dir "$dir" --logfile "$dir/redis.log" \
    --daemonize yes --pidfile "$dir/redis.pid"
  wait_for "TLS Redis" 30 port_open 127.0.0.1 "$TLS_REDIS_PORT"
}

kafka_start_tls() {
  local k="$dir/kafka"
  kafka_configure "$k" 1 "$TLS_KAFKA_INTERNAL_PORT" "$TLS_KAFKA_CONTROLLER_PORT" \
    "1@127.0.0.1:$TLS_KAFKA_CONTROLLER_PORT" 1 1
  # Later keys win: clients reach the node over SASL_SSL or SSL only.
  cat >>"$k/server.properties" <<PROPS
listeners=PLAINTEXT://127.0.0.1:$TLS_KAFKA_INTERNAL_PORT,CONTROLLER://127.0.0.1:$TLS_KAFKA_CONTROLLER_PORT,SASL_SSL://127.0.0.1:$TLS_KAFKA_SASL_PORT,SSL://127.0.0.1:$TLS_KAFKA_SSL_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$TLS_KAFKA_INTERNAL_PORT,SASL_SSL://127.0.0.1:$TLS_KAFKA_SASL_PORT,SSL://127.0.0.1:$TLS_KAFKA_SSL_PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL
sasl.enabled.mechanisms=PLAIN
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="coupon" password="coupon-secret" user_coupon="coupon-secret";
ssl.keystore.type=JKS
ssl.keystore.location=$dir/kafka.keystore.jks
ssl.keystore.password=$pass
ssl.key.password=$pass
PROPS
  kafka_start "$k" 384m
  kafka_wait_started "$k" "$TLS_KAFKA_SASL_PORT" 120
}

case $cmd in
  start)
    mkdir -p "$dir"
    certificates
    postgres_start
    redis_start
    kafka_start_tls
    ;;
  stop)
    kafka_stop "$dir/kafka" KILL || true
    if [[ -f "$dir/redis.pid" ]]; then kill "$(cat "$dir/redis.pid")" 2>/dev/null || true; fi
    if [[ -d "$dir/pg/data" ]]; then
      if [[ $(id -u) == 0 ]]; then
        runuser -u postgres -- "$pg_bin/pg_ctl" -D "$dir/pg/data" -m immediate stop >/dev/null 2>&1 || true
      else
        "$pg_bin/pg_ctl" -D "$dir/pg/data" -m immediate stop >/dev/null 2>&1 || true
      fi
    fi
    ;;
  *) fail "unknown command $cmd (start or stop)" ;;
esac
