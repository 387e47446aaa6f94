#!/usr/bin/env bash
# One Apache Cassandra node, the store of the history sink with
# HISTORY_STORE=cassandra, on the jars setup.sh fetched from Maven Central:
#
#   cassandra.sh up      starts the node unless one already answers CQL on
#                        CASSANDRA_HOST:CASSANDRA_PORT (127.0.0.1:9042), and
#                        waits until it serves CQL; `make cassandra-up`.
#   cassandra.sh down    stops it (TERM: memtables are flushed; KILL after
#                        60 s); its data is kept; `make cassandra-down`.
#   cassandra.sh status  whether it runs and answers CQL, its memory, and
#                        nodetool's view of the ring; exits 1 when not serving.
#
# Everything it writes (cassandra.yaml, data, commitlog, saved caches, hints,
# logs) is in CASSANDRA_DIR, .state/cassandra by default. Sized for a 2-core
# machine: a 1 GiB heap, small memtables, one compactor. JMX listens on
# loopback only (CASSANDRA_JMX_PORT, 7199), for nodetool.
#
# Another node elsewhere (a test's, or a second member of a cluster): set
# CASSANDRA_DIR, CASSANDRA_PORT, CASSANDRA_STORAGE_PORT and CASSANDRA_JMX_PORT
# (or CASSANDRA_HOST, e.g. 127.0.0.2, with the default ports); it forms a
# cluster of its own unless CASSANDRA_SEEDS names a node of another
# (host:storage_port, comma-separated).
source "$(dirname "$0")/common.sh"

CASSANDRA_DIR="${CASSANDRA_DIR:-$STATE_DIR/cassandra}"
CASSANDRA_STORAGE_PORT="${CASSANDRA_STORAGE_PORT:-7000}"
CASSANDRA_JMX_PORT="${CASSANDRA_JMX_PORT:-7199}"
CASSANDRA_SEEDS="${CASSANDRA_SEEDS:-$CASSANDRA_HOST:$CASSANDRA_STORAGE_PORT}"
# Saved in the node's system tables on its first start: a node refuses to
# start with another name.
CASSANDRA_CLUSTER="${CASSANDRA_CLUSTER:-coupons}"
# The data centre a keyspace's NetworkTopologyStrategy and LOCAL_QUORUM name.
CASSANDRA_DC="${CASSANDRA_DC:-datacenter1}"
CASSANDRA_RACK="${CASSANDRA_RACK:-rack1}"
CASSANDRA_HEAP="${CASSANDRA_HEAP:-1g}"
# How the commit log reaches the disk before a write is acknowledged:
# `batch` (the default here) acknowledges a write once the commit log holding
# it is fsynced, the writes that arrive during one fsync sharing the next;
# `group` does the same in windows of CASSANDRA_COMMITLOG_WINDOW (10 ms);
# `periodic` (Cassandra's own default) acknowledges at once and fsyncs every
# 10 s. With `periodic`, a node killed (even `kill -9` of the process: a
# commit log section is replayed only once its sync marker is written) loses
# the writes of its last seconds that it had acknowledged. The history sink
# stores its offsets once Cassandra acknowledged, so on a single node
# (replication factor 1) only `batch` or `group` keeps every row; with 3
# replicas at LOCAL_QUORUM, `periodic` loses a row only if two replicas crash
# within 10 s.
CASSANDRA_COMMITLOG_SYNC="${CASSANDRA_COMMITLOG_SYNC:-batch}"
CASSANDRA_COMMITLOG_WINDOW="${CASSANDRA_COMMITLOG_WINDOW:-10ms}"
# Writes applied at once. A write waits for its commit log fsync (batch or
# group) in one of these threads, so they bound how many writes share an
# fsync: idle waiting, not CPU (16, as for periodic, halved the history's
# rows per second).
CASSANDRA_CONCURRENT_WRITES="${CASSANDRA_CONCURRENT_WRITES:-128}"
# Clients authenticate (`password`: PasswordAuthenticator; the superuser
# `cassandra`/`cassandra` exists a few seconds after the first start, to be
# replaced by an operator's role) or not (`none`, the default here).
CASSANDRA_AUTH="${CASSANDRA_AUTH:-none}"
# TLS for clients when set: a PKCS12 keystore with the node's key and
# certificate, and its password. Clients may still connect in plaintext on the
# same port (`optional: true`), which is how `up` sees the node serve CQL; a
# production node sets `optional: false`.
CASSANDRA_TLS_KEYSTORE="${CASSANDRA_TLS_KEYSTORE:-}"
CASSANDRA_TLS_KEYSTORE_PASSWORD="${CASSANDRA_TLS_KEYSTORE_PASSWORD:-}"
# The heap it starts with (at most CASSANDRA_HEAP); it grows up to CASSANDRA_HEAP.
CASSANDRA_HEAP_INITIAL="${CASSANDRA_HEAP_INITIAL:-512m}"
# A node with much to replay from its commit log (a crash, not `down`) takes
# longer: CASSANDRA_START_TIMEOUT seconds, 180 by default.
start_timeout="${CASSANDRA_START_TIMEOUT:-180}"
dir="$CASSANDRA_DIR"
pid_file="$dir/cassandra.pid"
log="$dir/logs/system.log"

# The module flags of Cassandra's conf/jvm17-server.options (cassandra-5.0),
# which its clients' options (nodetool) repeat: Cassandra reaches into JDK
# internals (direct buffers, jamm's object sizes, JMX).
JPMS_OPTS=(
  -Djdk.attach.allowAttachSelf=true
  --add-exports java.base/jdk.internal.misc=ALL-UNNAMED
  --add-exports java.base/jdk.internal.ref=ALL-UNNAMED
  --add-exports java.base/sun.nio.ch=ALL-UNNAMED
  --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
  --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
  --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
  --add-exports java.sql/java.sql=ALL-UNNAMED
  --add-exports java.base/java.lang.ref=ALL-UNNAMED
  --add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
  --add-exports jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
  --add-exports jdk.attach/sun.tools.attach=ALL-UNNAMED
  --add-opens java.base/java.lang.module=ALL-UNNAMED
  --add-opens java.base/jdk.internal.loader=ALL-UNNAMED
  --add-opens java.base/jdk.internal.ref=ALL-UNNAMED
  --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
  --add-opens java.base/jdk.internal.math=ALL-UNNAMED
  --add-opens java.base/jdk.internal.module=ALL-UNNAMED
  --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED
  --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
  --add-opens java.base/sun.nio.ch=ALL-UNNAMED
  --add-opens java.base/java.io=ALL-UNNAMED
  --add-opens java.base/java.nio=ALL-UNNAMED
  --add-opens java.base/java.util.concurrent=ALL-UNNAMED
  --add-opens java.base/java.util=ALL-UNNAMED
  --add-opens java.base/java.util.concurrent.atomic=ALL-UNNAMED
  --add-opens java.base/java.lang=ALL-UNNAMED
  --add-opens java.base/java.math=ALL-UNNAMED
  --add-opens java.base/java.lang.reflect=ALL-UNNAMED
  --add-opens java.base/java.net=ALL-UNNAMED
  --add-opens jdk.compiler/com.sun.tools.javac=ALL-UNNAMED
)

# cql_answers HOST PORT: true when a CQL server answers an OPTIONS request
# (native protocol v4: version 4, no flags, stream 0, opcode 5, no body) with
# SUPPORTED (version 0x84, stream 0, opcode 6): the node serves CQL, not just
# a socket.
cql_answers() {
  timeout 5 bash -c '
    exec 3<>"/dev/tcp/$1/$2" || exit 1
    printf "\x04\x00\x00\x00\x05\x00\x00\x00\x00" >&3
    [[ "$(head -c 5 <&3 | od -An -tx1 | tr -d " \n")" == 8400000006 ]]' _ "$1" "$2" 2>/dev/null
}

running() { [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; }

# rss_mib PID: the process's resident memory in MiB.
rss_mib() { echo $(($(ps -o rss= -p "$1" 2>/dev/null || echo 0) / 1024)); }

# Writes the node's cassandra.yaml and cassandra-rackdc.properties; rewritten
# on every start.
configure() {
  [[ "$CASSANDRA_AUTH" == none || "$CASSANDRA_AUTH" == password ]] ||
    fail "CASSANDRA_AUTH must be none or password, not '$CASSANDRA_AUTH'"
  [[ -z "$CASSANDRA_TLS_KEYSTORE" || -r "$CASSANDRA_TLS_KEYSTORE" ]] ||
    fail "CASSANDRA_TLS_KEYSTORE: cannot read $CASSANDRA_TLS_KEYSTORE"
  mkdir -p "$dir"/{data,commitlog,saved_caches,hints,cdc_raw,logs,triggers}
  cat >"$dir/cassandra.yaml" <<YAML
# Written by infra/local/cassandra.sh; rewritten on every start.
cluster_name: $CASSANDRA_CLUSTER
# 16 tokens per node, placed for a replication factor of 3 (Cassandra's
# recommendation since 4.0), so that nodes added later share the ring evenly.
num_tokens: 16
allocate_tokens_for_local_replication_factor: 3
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
# A new cluster: no compatibility with 4.x sstables or messaging needed.
storage_compatibility_mode: NONE
endpoint_snitch: GossipingPropertyFileSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "$CASSANDRA_SEEDS"
listen_address: $CASSANDRA_HOST
rpc_address: $CASSANDRA_HOST
storage_port: $CASSANDRA_STORAGE_PORT
native_transport_port: $CASSANDRA_PORT
start_native_transport: true
data_file_directories:
  - $dir/data
commitlog_directory: $dir/commitlog
saved_caches_directory: $dir/saved_caches
hints_directory: $dir/hints
cdc_raw_directory: $dir/cdc_raw
commitlog_sync: $CASSANDRA_COMMITLOG_SYNC
$(case "$CASSANDRA_COMMITLOG_SYNC" in
    periodic) echo "commitlog_sync_period: 10000ms" ;;
    group) echo "commitlog_sync_group_window: $CASSANDRA_COMMITLOG_WINDOW" ;;
  esac)
commitlog_total_space: 512MiB
disk_failure_policy: stop
commit_failure_policy: stop
# Sized for a 2-core machine shared with the services and the compiler.
concurrent_reads: 8
concurrent_writes: $CASSANDRA_CONCURRENT_WRITES
concurrent_counter_writes: 8
concurrent_materialized_view_writes: 8
concurrent_compactors: 1
compaction_throughput: 32MiB/s
memtable_allocation_type: heap_buffers
memtable_heap_space: 64MiB
memtable_flush_writers: 1
key_cache_size: 16MiB
native_transport_max_threads: 32
# Tests create and drop keyspaces: a snapshot of each dropped table would pile
# up in the data directory.
auto_snapshot: false
$(case "$CASSANDRA_AUTH" in
    password) echo "authenticator: PasswordAuthenticator" ;;
    *) echo "authenticator: AllowAllAuthenticator" ;;
  esac)
$(if [[ -n "$CASSANDRA_TLS_KEYSTORE" ]]; then
    printf 'client_encryption_options:\n  enabled: true\n  optional: true\n  keystore: %s\n  keystore_password: "%s"\n  store_type: PKCS12\n  require_client_auth: false\n' \
      "$CASSANDRA_TLS_KEYSTORE" "$CASSANDRA_TLS_KEYSTORE_PASSWORD"
  fi)
YAML
  printf '# Written by infra/local/cassandra.sh\ndc=%s\nrack=%s\nprefer_local=true\n' \
    "$CASSANDRA_DC" "$CASSANDRA_RACK" >"$dir/cassandra-rackdc.properties"
}

# Sets JVM_OPTS: the flags of Cassandra's conf/jvm-server.options and
# conf/jvm17-server.options (cassandra-5.0) that matter here, sized down.
jvm_opts() {
  local jamm
  jamm="$(ls "$CASSANDRA_LIBS"/jamm-*.jar 2>/dev/null | head -n 1)"
  [[ -n "$jamm" ]] || fail "no jamm jar in $CASSANDRA_LIBS: run 'make setup'"
  JVM_OPTS=(
    # jvm-server.options (without -XX:+AlwaysPreTouch: the heap is not
    # touched up front on a shared machine).
    -ea -da:net.openhft... -XX:+UseThreadPriorities -Xss256k -XX:+UseTLAB -XX:+ResizeTLAB
    -XX:+PerfDisableSharedMem -Djava.net.preferIPv4Stack=true
    -XX:+HeapDumpOnOutOfMemoryError "-XX:HeapDumpPath=$dir" -XX:+ExitOnOutOfMemoryError
    "-Xms$CASSANDRA_HEAP_INITIAL" "-Xmx$CASSANDRA_HEAP"
    # jvm17-server.options: G1
    -XX:+UseG1GC -XX:+ParallelRefProcEnabled -XX:MaxTenuringThreshold=1
    -XX:G1RSetUpdatingPauseTimePercent=5 -XX:MaxGCPauseMillis=300 -XX:InitiatingHeapOccupancyPercent=70
    "-Xlog:gc=info:file=$dir/logs/gc.log:time,uptime,level:filecount=3,filesize=10m"
    "${JPMS_OPTS[@]}"
    # jvm17-server.options: Netty
    -Dio.netty.tryReflectionSetAccessible=true -Dio.netty.allocator.useCacheForAllThreads=true
    -Dio.netty.allocator.maxOrder=11
    # cassandra-env.sh: the object sizes memtables are accounted by.
    "-javaagent:$jamm"
    # The Chronicle libraries (audit and full query logs) would report usage.
    -Dchronicle.analytics.disable=true
    # JMX on loopback only, for nodetool.
    "-Dcassandra.jmx.local.port=$CASSANDRA_JMX_PORT" -Dcom.sun.management.jmxremote.authenticate=false
    "-Dcassandra.config=file://$dir/cassandra.yaml"
    "-Dcassandra-rackdc.properties=file://$dir/cassandra-rackdc.properties"
    "-Dcassandra.storagedir=$dir" "-Dcassandra.logdir=$dir/logs" "-Dcassandra.triggers_dir=$dir/triggers"
    "-Dlogback.configurationFile=$REPO_ROOT/infra/cassandra/logback.xml"
    -cp "$CASSANDRA_LIBS/*"
  )
}

start() {
  cassandra_installed || fail "Apache Cassandra ${CASSANDRA_VERSION} is not installed in $CASSANDRA_ROOT: run 'make setup'"
  configure
  jvm_opts
  local extra=(-Dcassandra-foreground=yes)
  # A node that is its own only seed has no one to gossip with: it skips the
  # wait for gossip to settle (several seconds at each start).
  if [[ "$CASSANDRA_SEEDS" == "$CASSANDRA_HOST:$CASSANDRA_STORAGE_PORT" ]]; then
    extra+=(-Dcassandra.skip_wait_for_gossip_to_settle=0)
    # Its first start (no system tables yet) would wait RING_DELAY, 30 s, for
    # a schema from peers before choosing its tokens.
    [[ -d "$dir/data/system" ]] || extra+=(-Dcassandra.ring_delay_ms=1000)
  fi
  # Where this start's log lines begin, for wait_started.
  stat -c %s "$log" 2>/dev/null >"$dir/log.offset" || echo 0 >"$dir/log.offset"
  # The subshell execs into the JVM with every descriptor redirected, so
  # nothing keeps the caller's terminal or pipe open; stdout.log gets only
  # what the JVM itself prints (the log goes to logs/system.log).
  (export MALLOC_ARENA_MAX=4; exec setsid java "${JVM_OPTS[@]}" "${extra[@]}" org.apache.cassandra.service.CassandraDaemon) \
    >>"$dir/logs/stdout.log" 2>&1 </dev/null &
  echo $! >"$pid_file"
}

# Prints the last lines of the log (and of stdout.log, where the JVM reports
# what it could not log), then fails with MESSAGE.
fail_with_log() {
  { echo "--- last lines of $log"; tail -n 25 "$log" 2>/dev/null
    echo "--- last lines of $dir/logs/stdout.log"; tail -n 10 "$dir/logs/stdout.log" 2>/dev/null; } >&2
  fail "$1"
}

# wait_started SECONDS: until the node logged that its start-up is complete
# and answers CQL; fails early if the JVM died.
wait_started() {
  local deadline=$((SECONDS + $1)) pid offset
  pid="$(cat "$pid_file")"
  offset="$(cat "$dir/log.offset" 2>/dev/null || echo 0)"
  until tail -c +"$((offset + 1))" "$log" 2>/dev/null | grep -q 'Startup complete' \
      && cql_answers "$CASSANDRA_HOST" "$CASSANDRA_PORT"; do
    kill -0 "$pid" 2>/dev/null || fail_with_log "the Cassandra node in $dir exited during start-up"
    ((SECONDS < deadline)) || fail_with_log "the Cassandra node in $dir did not serve CQL on ${CASSANDRA_HOST}:${CASSANDRA_PORT} within ${1}s (still running as pid $pid; 'cassandra.sh down' stops it)"
    sleep 0.5
  done
}

stop() {
  running || { rm -f "$pid_file"; return 1; }
  local pid; pid="$(cat "$pid_file")"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    say "cassandra: the node in $dir did not stop within 60 s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$pid_file"
}

nodetool() {
  java -Xmx128m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 "${JPMS_OPTS[@]}" \
    "-Dlogback.configurationFile=$REPO_ROOT/infra/cassandra/logback.xml" \
    "-Dcassandra.logdir=$dir/logs" -Dcassandra.logfile=nodetool.log "-Duser.home=$dir" \
    -cp "$CASSANDRA_LIBS/*" org.apache.cassandra.tools.NodeTool -h 127.0.0.1 -p "$CASSANDRA_JMX_PORT" "$@"
}

case "${1:-}" in
  up)
    mkdir -p "$dir"
    if cql_answers "$CASSANDRA_HOST" "$CASSANDRA_PORT"; then
      say "cassandra: reusing ${CASSANDRA_HOST}:${CASSANDRA_PORT}"
    elif running; then
      # A start that timed out left its node starting: wait for it rather
      # than start a second one on the same data directory.
      say "cassandra: a node is still starting (pid $(cat "$pid_file")); waiting for it"
      wait_started "$start_timeout"
      say "cassandra: serving on ${CASSANDRA_HOST}:${CASSANDRA_PORT}; log at $log"
    else
      port_open "$CASSANDRA_HOST" "$CASSANDRA_PORT" \
        && fail "something on ${CASSANDRA_HOST}:${CASSANDRA_PORT} accepts connections but does not answer CQL"
      say "cassandra: starting Apache Cassandra ${CASSANDRA_VERSION} on ${CASSANDRA_HOST}:${CASSANDRA_PORT} (storage port ${CASSANDRA_STORAGE_PORT}, heap ${CASSANDRA_HEAP})"
      started=$SECONDS
      start
      wait_started "$start_timeout"
      say "cassandra: serving CQL after $((SECONDS - started))s ($(rss_mib "$(cat "$pid_file")") MiB resident); data in $dir/data, log at $log"
    fi
    ;;
  down)
    if stop; then say "cassandra: stopped the node in $dir (data kept)"
    elif port_open "$CASSANDRA_HOST" "$CASSANDRA_PORT"; then
      say "cassandra: no node of $dir runs, but something serves ${CASSANDRA_HOST}:${CASSANDRA_PORT}: left alone"
    fi
    ;;
  status)
    if running; then
      pid="$(cat "$pid_file")"
      say "cassandra: pid $pid, $(rss_mib "$pid") MiB resident, data $(du -sh "$dir/data" 2>/dev/null | cut -f1) in $dir"
    else
      say "cassandra: no node of $dir runs"
    fi
    if cql_answers "$CASSANDRA_HOST" "$CASSANDRA_PORT"; then
      say "cassandra: ${CASSANDRA_HOST}:${CASSANDRA_PORT} answers CQL"
      if running; then nodetool status || true; fi
    else
      say "cassandra: ${CASSANDRA_HOST}:${CASSANDRA_PORT} does not answer CQL"
      exit 1
    fi
    ;;
  *) fail "usage: cassandra.sh up | down | status" ;;
esac
