#!/usr/bin/env bash
# A one-node Kafka that authenticates every client (SASL/PLAIN) and
# authorizes every request (KRaft's StandardAuthorizer, nothing allowed
# that no ACL allows), next to the shared broker, never instead of it:
#
#   sasl.sh up [DIR] [PREFIX]   starts the node in DIR (default
#                               .state/sasl) unless it runs, then applies
#                               infra/kafka/acls.tsv for PREFIX (default
#                               coupons); `make sasl-up`.
#   sasl.sh acls PREFIX [DIR]   applies the ACL set for another prefix.
#   sasl.sh down [DIR]          stops the node (state kept); `make sasl-down`
#                               (SASL_STOP_SIGNAL=KILL: at once).
#
# Ports: SASL_KAFKA_PORT (clients, default 19094) and
# SASL_KAFKA_CONTROLLER_PORT (the controller quorum, default 19095).
# Every role of infra/kafka/acls.tsv is a user named after it with password
# <role>-secret; `broker` (broker-secret) is the node's own principal and the
# only super user (inter-broker and controller traffic, the ACL changes).
# tests/it/acl.rs starts its own node with this script.
#
# For the negative control, SASL_AUTHORIZER=off starts the node without an
# authorizer (everything allowed, no ACLs applied) and SASL_SKIP_ACLS=1
# applies no ACLs (everything but the super user's refused).
source "$(dirname "$0")/common.sh"

cmd=${1:?usage: sasl.sh up [DIR] [PREFIX] | acls PREFIX [DIR] | down [DIR]}
port="${SASL_KAFKA_PORT:-19094}"
cport="${SASL_KAFKA_CONTROLLER_PORT:-19095}"

# PLAIN's static user list (the JAAS config's user_<name>="<password>"):
# the broker, then every role the ACL table names.
jaas_users() {
  local users='user_broker="broker-secret"' role
  for role in $("$REPO_ROOT/infra/kafka/acls.sh" principals); do
    users+=" user_${role}=\"${role}-secret\""
  done
  printf '%s' "$users"
}

configure() {
  local dir=$1 login='org.apache.kafka.common.security.plain.PlainLoginModule required username="broker" password="broker-secret"'
  kafka_configure "$dir" 1 "$port" "$cport" "1@$BROKER_HOST:$cport" 1 1
  # Later keys win: SASL on the client listener and on the controller's,
  # the broker's own connections authenticated as `broker`.
  cat >>"$dir/server.properties" <<PROPS
listeners=SASL_PLAINTEXT://$BROKER_HOST:$port,CONTROLLER://$BROKER_HOST:$cport
advertised.listeners=SASL_PLAINTEXT://$BROKER_HOST:$port
listener.security.protocol.map=SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT
inter.broker.listener.name=SASL_PLAINTEXT
sasl.enabled.mechanisms=PLAIN
sasl.mechanism.inter.broker.protocol=PLAIN
sasl.mechanism.controller.protocol=PLAIN
listener.name.sasl_plaintext.plain.sasl.jaas.config=$login $(jaas_users);
listener.name.controller.plain.sasl.jaas.config=$login user_broker="broker-secret";
PROPS
  if [[ ${SASL_AUTHORIZER:-on} != off ]]; then
    cat >>"$dir/server.properties" <<PROPS
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
super.users=User:broker
allow.everyone.if.no.acl.found=false
PROPS
  fi
  cat >"$dir/admin.properties" <<PROPS
bootstrap.servers=$BROKER_HOST:$port
security.protocol=SASL_PLAINTEXT
sasl.mechanism=PLAIN
sasl.jaas.config=$login;
PROPS
}

apply_acls() {
  local prefix=$1 dir=$2
  if [[ -n ${SASL_SKIP_ACLS:-} || ${SASL_AUTHORIZER:-on} == off ]]; then
    say "SASL_SKIP_ACLS or SASL_AUTHORIZER=off: no ACLs applied for $prefix"
    return 0
  fi
  "$REPO_ROOT/infra/kafka/acls.sh" apply "$prefix" "$dir/admin.properties" \
    || fail "applying the ACLs for $prefix on $BROKER_HOST:$port failed"
}

case $cmd in
  up)
    dir="${2:-$STATE_DIR/sasl}"
    prefix="${3:-coupons}"
    if kafka_running "$dir"; then
      say "SASL Kafka in $dir already running"
    else
      port_open "$BROKER_HOST" "$port" && fail "port $port is taken (SASL_KAFKA_PORT)"
      configure "$dir"
      kafka_start "$dir" "${SASL_KAFKA_HEAP:-384m}"
      kafka_wait_started "$dir" "$port" 120
      say "SASL Kafka on $BROKER_HOST:$port (state in $dir)"
    fi
    apply_acls "$prefix" "$dir"
    ;;
  acls)
    prefix=${2:?usage: sasl.sh acls PREFIX [DIR]}
    dir="${3:-$STATE_DIR/sasl}"
    kafka_running "$dir" || fail "no SASL Kafka runs in $dir: sasl.sh up first"
    apply_acls "$prefix" "$dir"
    ;;
  down)
    dir="${2:-$STATE_DIR/sasl}"
    kafka_stop "$dir" "${SASL_STOP_SIGNAL:-TERM}"
    ;;
  *) fail "unknown command $cmd (up, acls or down)" ;;
esac
