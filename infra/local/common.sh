# Shared settings for the local infrastructure scripts. Sourced, not run.
# shellcheck shell=bash
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# Apache Kafka, fetched from Maven Central by setup.sh (infra/kafka/pom.xml
# pins the version). Installed once per machine, outside any clone, and
# reused by every clone.
KAFKA_VERSION="$(sed -n 's#.*<kafka.version>\(.*\)</kafka.version>.*#\1#p' "$REPO_ROOT/infra/kafka/pom.xml")"
KAFKA_ROOT="${KAFKA_ROOT:-/opt/kafka-${KAFKA_VERSION}}"
KAFKA_LIBS="$KAFKA_ROOT/libs"
# Apache Cassandra (`make cassandra-up`, the history sink's HISTORY_STORE=cassandra),
# fetched the same way (infra/cassandra/pom.xml pins the version).
CASSANDRA_VERSION="$(sed -n 's#.*<cassandra.version>\(.*\)</cassandra.version>.*#\1#p' "$REPO_ROOT/infra/cassandra/pom.xml")"
CASSANDRA_ROOT="${CASSANDRA_ROOT:-/opt/cassandra-${CASSANDRA_VERSION}}"
CASSANDRA_LIBS="$CASSANDRA_ROOT/libs"
STATE_DIR="${STATE_DIR:-$REPO_ROOT/.state}"
BROKER_HOST="${BROKER_HOST:-127.0.0.1}"
BROKER_PORT="${BROKER_PORT:-9092}"
CONTROLLER_PORT="${CONTROLLER_PORT:-9093}"
# Heap of the single node; the cluster's three nodes get less each.
KAFKA_HEAP="${KAFKA_HEAP:-1g}"
# The 3-node cluster (cluster.sh): node i listens on CLUSTER_BASE_PORT+i for
# clients and CLUSTER_BASE_PORT+100+i for the controller quorum.
CLUSTER_BASE_PORT="${CLUSTER_BASE_PORT:-29090}"
CLUSTER_DIR="${CLUSTER_DIR:-$STATE_DIR/cluster}"
PG_HOST="${PG_HOST:-127.0.0.1}"
PG_PORT="${PG_PORT:-5432}"
REDIS_HOST="${REDIS_HOST:-127.0.0.1}"
REDIS_PORT="${REDIS_PORT:-6379}"
CASSANDRA_HOST="${CASSANDRA_HOST:-127.0.0.1}"
CASSANDRA_PORT="${CASSANDRA_PORT:-9042}"

say() { printf '==> %s\n' "$*"; }
fail() { printf 'error: %s\n' "$*" >&2; exit 1; }

# True when something accepts TCP connections on host:port.
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# wait_for NAME SECONDS COMMAND...: retries COMMAND until it succeeds.
wait_for() {
  local name=$1 seconds=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then fail "$name did not become ready within ${seconds}s"; fi
    sleep 0.2
  done
}

cassandra_installed() { [[ -f "$CASSANDRA_LIBS/cassandra-all-${CASSANDRA_VERSION}.jar" ]]; }

kafka_installed() { [[ -f "$KAFKA_LIBS/kafka_2.13-${KAFKA_VERSION}.jar" ]]; }

# kafka_jvm_opts HEAP LOGS_DIR: sets KAFKA_JVM_OPTS, the JVM flags of a
# Kafka process on the installed jars (logs to LOGS_DIR/server.log).
kafka_jvm_opts() {
  KAFKA_JVM_OPTS=(-Xms128m "-Xmx$1" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExitOnOutOfMemoryError
    -Djava.awt.headless=true "-Dkafka.logs.dir=$2"
    "-Dlog4j2.configurationFile=$REPO_ROOT/infra/kafka/log4j2.xml" -cp "$KAFKA_LIBS/*")
}

# kafka_configure DIR NODE_ID CLIENT_PORT CONTROLLER_PORT VOTERS REPLICATION MIN_ISR
# Writes DIR/server.properties for one combined broker+controller node,
# sized for a 2-core machine: few network and I/O threads, no initial
# rebalance delay (a lone consumer starts at once), a small offsets topic.
kafka_configure() {
  local dir=$1 id=$2 port=$3 cport=$4 voters=$5 rf=$6 isr=$7
  mkdir -p "$dir/data" "$dir/logs"
  cat >"$dir/server.properties" <<PROPS
# Written by infra/local (common.sh kafka_configure); rewritten on every start.
process.roles=broker,controller
node.id=$id
controller.quorum.voters=$voters
listeners=PLAINTEXT://$BROKER_HOST:$port,CONTROLLER://$BROKER_HOST:$cport
advertised.listeners=PLAINTEXT://$BROKER_HOST:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$dir/data
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
background.threads=4
num.partitions=4
default.replication.factor=$rf
min.insync.replicas=$isr
offsets.topic.replication.factor=$rf
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$isr
# The services create their topics through the admin API, as on a managed
# cluster; a typo in a topic name must not create a topic.
auto.create.topics.enable=false
group.initial.rebalance.delay.ms=0
# A consumer that dies (kill -9) gives its partitions up after this long,
# under either group protocol (classic: the client asks for 6 s).
group.consumer.min.session.timeout.ms=6000
group.consumer.session.timeout.ms=6000
group.consumer.heartbeat.interval.ms=1000
group.consumer.min.heartbeat.interval.ms=500
# A crashed node is fenced by the controllers (and leaves every ISR) after
# 6 s instead of 9, so partitions it led move sooner and acks=all produce
# requests stop waiting for it.
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=6000
replica.lag.time.max.ms=10000
log.retention.hours=168
log.segment.bytes=268435456
PROPS
}

# kafka_start DIR HEAP: formats DIR's storage on first use, starts the node in
# the background (pid in DIR/kafka.pid, logs in DIR/logs), and returns at once.
kafka_start() {
  local dir=$1 heap=$2
  kafka_installed || fail "Apache Kafka ${KAFKA_VERSION} is not installed in $KAFKA_ROOT: run 'make setup'"
  if [[ ! -f "$dir/data/meta.properties" ]]; then
    [[ -f "$dir/cluster.id" ]] || head -c 16 /dev/urandom | base64 | tr '+/' '-_' | cut -c1-22 >"$dir/cluster.id"
    kafka_jvm_opts 256m "$dir/logs"
    java "${KAFKA_JVM_OPTS[@]}" kafka.tools.StorageTool format \
      -t "$(cat "$dir/cluster.id")" -c "$dir/server.properties" >>"$dir/logs/format.log" 2>&1 \
      || fail "formatting the Kafka storage in $dir failed: see $dir/logs/format.log"
  fi
  # Where this start's log lines begin, for kafka_wait_started.
  stat -c %s "$dir/logs/server.log" 2>/dev/null >"$dir/log.offset" || echo 0 >"$dir/log.offset"
  # The subshell execs into the JVM with every descriptor redirected, so
  # nothing keeps the caller's terminal or pipe open.
  kafka_jvm_opts "$heap" "$dir/logs"
  (exec setsid java "${KAFKA_JVM_OPTS[@]}" kafka.Kafka "$dir/server.properties") \
    >>"$dir/logs/stdout.log" 2>&1 </dev/null &
  echo $! >"$dir/kafka.pid"
}

# kafka_wait_started DIR PORT SECONDS: waits until the node logged that it
# serves and accepts connections; fails early if the JVM died.
kafka_wait_started() {
  local dir=$1 port=$2 seconds=$3
  local deadline=$((SECONDS + seconds)) pid offset
  pid="$(cat "$dir/kafka.pid")"
  offset="$(cat "$dir/log.offset" 2>/dev/null || echo 0)"
  until port_open "$BROKER_HOST" "$port" \
      && tail -c +"$((offset + 1))" "$dir/logs/server.log" 2>/dev/null | grep -q 'Kafka Server started'; do
    kill -0 "$pid" 2>/dev/null || fail "the Kafka node in $dir exited during start-up: see $dir/logs/server.log and $dir/logs/stdout.log"
    ((SECONDS < deadline)) || fail "the Kafka node in $dir did not serve within ${seconds}s: see $dir/logs/server.log"
    sleep 0.2
  done
}

# kafka_stop DIR [SIGNAL]: TERM asks for a controlled shutdown (leadership
# moves away, logs are flushed); KILL is a crash.
kafka_stop() {
  local dir=$1 signal=${2:-TERM}
  [[ -f "$dir/kafka.pid" ]] || return 0
  local pid; pid="$(cat "$dir/kafka.pid")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "-$signal" "$pid" 2>/dev/null || true
    for _ in $(seq 1 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      say "Kafka in $dir did not stop within 60 s; killing it"
      kill -9 "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  fi
  rm -f "$dir/kafka.pid"
}

kafka_running() { [[ -f "$1/kafka.pid" ]] && kill -0 "$(cat "$1/kafka.pid")" 2>/dev/null; }
