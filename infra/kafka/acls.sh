#!/usr/bin/env bash
# The ACL set of one deployment (infra/kafka/acls.tsv, its topic prefix a
# parameter) onto a Kafka cluster whose authorizer refuses what no ACL
# allows:
#
#   acls.sh apply PREFIX ADMIN_PROPERTIES [ROLE=PRINCIPAL ...]
#       creates every ACL through the admin API, in one JVM (Java's
#       single-file source mode on the installed kafka-clients jar);
#       ADMIN_PROPERTIES is the admin client's configuration (bootstrap
#       servers and the credentials of a principal allowed to alter ACLs).
#       Creating an ACL that exists changes nothing, so it can run again.
#   acls.sh print PREFIX [ROLE=PRINCIPAL ...]
#       the same set as kafka-acls.sh commands, for a cluster managed with
#       the stock tools ($BOOTSTRAP and $ADMIN_CONFIG left to the shell).
#   acls.sh principals
#       the roles the table names, one a line.
#
# A role's principal is User:<role> unless mapped, e.g.
# storefront=User:CN=storefront.shop.example for mTLS.
source "$(dirname "$0")/../local/common.sh"

table="$REPO_ROOT/infra/kafka/acls.tsv"
cmd=${1:?usage: acls.sh apply PREFIX ADMIN_PROPERTIES [ROLE=PRINCIPAL ...] | print PREFIX | principals}
shift

java_acls() {
  kafka_installed || fail "Apache Kafka ${KAFKA_VERSION} is not installed in $KAFKA_ROOT: run 'make setup'"
  # C1 only and a small heap: the tool runs for a second.
  java -Xmx128m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -cp "$KAFKA_LIBS/*" \
    "$REPO_ROOT/infra/kafka/Acls.java" "$@"
}

case $cmd in
  apply)
    prefix=${1:?usage: acls.sh apply PREFIX ADMIN_PROPERTIES}
    config=${2:?usage: acls.sh apply PREFIX ADMIN_PROPERTIES}
    shift 2
    java_acls apply "$table" "$prefix" "$config" "$@"
    ;;
  print)
    prefix=${1:?usage: acls.sh print PREFIX}
    shift
    java_acls print "$table" "$prefix" "$@"
    ;;
  principals)
    awk '!/^[[:space:]]*(#|$)/ {print $1}' "$table" | sort -u
    ;;
  *) fail "unknown command $cmd (apply, print or principals)" ;;
esac
