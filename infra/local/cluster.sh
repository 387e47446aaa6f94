#!/usr/bin/env bash
# A 3-node Apache Kafka cluster (KRaft, each node broker and controller) on
# this machine, for the fault-injection tests: replication factor 3,
# min.insync.replicas=2, so any one node may die without losing an
# acknowledged record or stopping producers with acks=all.
#
#   cluster.sh up          start the three nodes (formatting on first use)
#   cluster.sh down        controlled shutdown of every node
#   cluster.sh kill N      kill -9 node N (a crash)
#   cluster.sh stop N      controlled shutdown of node N
#   cluster.sh start N     start node N again and wait until it serves
#   cluster.sh brokers     print the bootstrap list (for KAFKA_BROKERS)
#   cluster.sh status      which nodes run
#
# Node i serves clients on CLUSTER_BASE_PORT+i (29091..29093 by default) and
# the quorum on CLUSTER_BASE_PORT+100+i; data and logs in .state/cluster/nI.
source "$(dirname "$0")/common.sh"

NODES=(1 2 3)
CLUSTER_HEAP="${CLUSTER_HEAP:-512m}"
node_dir() { echo "$CLUSTER_DIR/n$1"; }
node_port() { echo $((CLUSTER_BASE_PORT + $1)); }
voters() {
  local list=() i
  for i in "${NODES[@]}"; do list+=("$i@${BROKER_HOST}:$((CLUSTER_BASE_PORT + 100 + i))"); done
  (IFS=,; echo "${list[*]}")
}
brokers() {
  local list=() i
  for i in "${NODES[@]}"; do list+=("${BROKER_HOST}:$(node_port "$i")"); done
  (IFS=,; echo "${list[*]}")
}
check_node() { [[ "${1:-}" =~ ^[123]$ ]] || fail "usage: $0 kill|stop|start N (N is 1, 2 or 3)"; }

start_node() {
  local i=$1 dir; dir="$(node_dir "$i")"
  if kafka_running "$dir"; then return 0; fi
  mkdir -p "$dir"
  kafka_configure "$dir" "$i" "$(node_port "$i")" "$((CLUSTER_BASE_PORT + 100 + i))" "$(voters)" 3 2
  # Every node of a cluster is formatted with the same cluster id.
  [[ -f "$CLUSTER_DIR/cluster.id" ]] || head -c 16 /dev/urandom | base64 | tr '+/' '-_' | cut -c1-22 >"$CLUSTER_DIR/cluster.id"
  cp "$CLUSTER_DIR/cluster.id" "$dir/cluster.id"
  kafka_start "$dir" "$CLUSTER_HEAP"
}

case "${1:-}" in
  up)
    mkdir -p "$CLUSTER_DIR"
    started=$SECONDS
    # All three at once: the controllers need a quorum before any serves.
    for i in "${NODES[@]}"; do start_node "$i"; done
    for i in "${NODES[@]}"; do kafka_wait_started "$(node_dir "$i")" "$(node_port "$i")" 180; done
    say "cluster: 3 nodes serving after $((SECONDS - started))s; KAFKA_BROKERS=$(brokers)"
    ;;
  down)
    for i in "${NODES[@]}"; do kafka_stop "$(node_dir "$i")" TERM; done
    say "cluster: down (state kept in $CLUSTER_DIR)"
    ;;
  kill)
    check_node "${2:-}"
    kafka_stop "$(node_dir "$2")" KILL
    say "cluster: node $2 killed"
    ;;
  stop)
    check_node "${2:-}"
    kafka_stop "$(node_dir "$2")" TERM
    say "cluster: node $2 stopped"
    ;;
  start)
    check_node "${2:-}"
    started=$SECONDS
    start_node "$2"
    kafka_wait_started "$(node_dir "$2")" "$(node_port "$2")" 180
    say "cluster: node $2 serving after $((SECONDS - started))s"
    ;;
  brokers)
    brokers
    ;;
  status)
    for i in "${NODES[@]}"; do
      if kafka_running "$(node_dir "$i")"; then echo "node $i: running on ${BROKER_HOST}:$(node_port "$i")"
      else echo "node $i: stopped"; fi
    done
    ;;
  *)
    fail "usage: $0 up|down|kill N|stop N|start N|brokers|status"
    ;;
esac
