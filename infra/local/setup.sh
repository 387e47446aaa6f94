#!/usr/bin/env bash
# Installs what a fresh machine lacks: Postgres and Redis (Debian packages, if
# absent), Patroni, etcd and HAProxy for `make ha-up`, a JDK and Maven if absent, and the Apache Kafka broker with its
# runtime jars from Maven Central (pinned in infra/kafka/pom.xml), and Apache
# Cassandra for `make cassandra-up` the same way (infra/cassandra/pom.xml).
# Safe to run again: it skips what is already there.
source "$(dirname "$0")/common.sh"

need_apt=()
command -v pg_ctlcluster >/dev/null 2>&1 || need_apt+=(postgresql)
command -v psql >/dev/null 2>&1 || need_apt+=(postgresql-client)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
command -v make >/dev/null 2>&1 || need_apt+=(make)
command -v perl >/dev/null 2>&1 || need_apt+=(perl)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
command -v java >/dev/null 2>&1 || need_apt+=(openjdk-17-jre-headless)
# javac: the Java storefront example (examples/java-storefront) and the
# partitioner test's Murmur.java (tests/java) are compiled, and
# infra/kafka/Acls.java runs in the JDK's source-file mode.
command -v javac >/dev/null 2>&1 || need_apt+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null 2>&1 || need_apt+=(maven)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# rdkafka is built with TLS (`ssl`), linked against the system OpenSSL; sqlx and
# fred use it too (native-tls). keytool (the JDK's) makes the TLS test's keystore.
dpkg -s libssl-dev >/dev/null 2>&1 || need_apt+=(libssl-dev)
# The console's browser test (tests/console/run.sh) drives Debian's chromium
# with playwright-core (npm, needs node and npm); the monitoring rules are
# checked with promtool (Debian's prometheus package; the package's service is
# not started here).
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
# `make bench` drives /healthz with wrk too, to show its own generator is not the bound.
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
# `make ha-up` (infra/local/ha.sh): Postgres under Patroni with etcd as its
# configuration store and HAProxy in front. Debian's packages ship services
# that are not started here; ha.sh runs its own processes on its own ports.
command -v patroni >/dev/null 2>&1 || need_apt+=(patroni)
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v haproxy >/dev/null 2>&1 || need_apt+=(haproxy)
# Patroni's etcd client library: Debian's patroni depends on one of several
# configuration stores' clients; ha.sh uses etcd.
dpkg -s python3-etcd >/dev/null 2>&1 || need_apt+=(python3-etcd)
# ha.sh asks Patroni's REST API and etcd's health endpoint with curl and
# reads the answers with jq.
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v jq >/dev/null 2>&1 || need_apt+=(jq)
# `make bench` sends its open-loop rows with vegeta (wrk is closed loop),
# built from the Go module proxy; needs the Go toolchain.
VEGETA_VERSION=v12.13.0
if ! command -v vegeta >/dev/null 2>&1; then
  command -v go >/dev/null 2>&1 || need_apt+=(golang-go)
fi
if ((${#need_apt[@]})); then
  say "installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# fetch_jars NAME VERSION POM LIBS: the runtime jars POM lists, from Maven
# Central into LIBS (the broker's and Cassandra's: nothing is built). -B: no
# colours or progress bars in logs; the jars land in a staging folder first
# so an interrupted download never looks installed.
staging_dirs=()
trap 'rm -rf "${staging_dirs[@]}"' EXIT
fetch_jars() {
  local name=$1 version=$2 pom=$3 libs=$4
  say "fetching ${name} ${version} and its runtime jars from Maven Central into ${libs}"
  local started=$SECONDS staging
  staging="$(mktemp -d "$(dirname "$libs").staging.XXXXXX")"
  staging_dirs+=("$staging")
  if ! mvn -B -q -f "$REPO_ROOT/$pom" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$staging/libs" >"$staging/mvn.log" 2>&1; then
    tail -n 30 "$staging/mvn.log" >&2
    fail "Maven could not fetch ${name} ${version} (command: mvn -f ${pom} dependency:copy-dependencies -DincludeScope=runtime)"
  fi
  mkdir -p "$(dirname "$libs")"
  rm -rf "$libs"
  mv "$staging/libs" "$libs"
  say "${name} ${version}: $(ls "$libs" | wc -l) jars ($(du -sh "$libs" | cut -f1)) in $((SECONDS - started))s"
}

if ! command -v vegeta >/dev/null 2>&1; then
  say "building vegeta ${VEGETA_VERSION} from the Go module proxy into /usr/local/bin"
  # Only `make bench` needs it (it says so and leaves the open-loop rows
  # out without it): a proxy that does not answer must not stop the tests.
  GOBIN=/usr/local/bin GOFLAGS=-mod=mod go install "github.com/tsenart/vegeta/v12@${VEGETA_VERSION}" \
    || say "warning: could not build vegeta ${VEGETA_VERSION} (go install github.com/tsenart/vegeta/v12@${VEGETA_VERSION}); make bench will leave its open-loop rows out"
fi

if kafka_installed; then
  say "Apache Kafka ${KAFKA_VERSION} already installed in ${KAFKA_ROOT}"
else
  fetch_jars "Apache Kafka" "$KAFKA_VERSION" infra/kafka/pom.xml "$KAFKA_LIBS"
fi

# Apache Cassandra for `make cassandra-up` (infra/local/cassandra.sh): the
# cassandra-all jar and its runtime jars (logback among them), fetched like
# Kafka's into /opt/cassandra-<version>/libs, once per machine.
if cassandra_installed; then
  say "Apache Cassandra ${CASSANDRA_VERSION} already installed in ${CASSANDRA_ROOT}"
else
  fetch_jars "Apache Cassandra" "$CASSANDRA_VERSION" infra/cassandra/pom.xml "$CASSANDRA_LIBS"
fi

# The Java storefront example (tests/java/run.sh, in `make test`) builds with
# Maven: its plugins, the protoc executable and its jars are fetched into
# ~/.m2 once (a build, since protoc is resolved by the plugin, not declared),
# so `make test` downloads nothing. The stamp holds the pom's hash: a changed
# pom fetches again.
example_pom="$REPO_ROOT/examples/java-storefront/pom.xml"
example_stamp="$STATE_DIR/java-storefront.fetched"
example_hash="$(sha256sum "$example_pom" | cut -d' ' -f1)"
if [[ "$(cat "$example_stamp" 2>/dev/null)" == "$example_hash" ]]; then
  say "the Java storefront example's Maven artifacts already fetched"
else
  say "fetching the Java storefront example's Maven artifacts (kafka-clients, protobuf-java, protoc)"
  started=$SECONDS
  mkdir -p "$STATE_DIR"
  if ! mvn -B -q -f "$example_pom" dependency:go-offline compile dependency:build-classpath \
      -Dmdep.outputFile="$REPO_ROOT/examples/java-storefront/target/classpath.txt" \
      >"$STATE_DIR/java-storefront-fetch.log" 2>&1; then
    tail -n 30 "$STATE_DIR/java-storefront-fetch.log" >&2
    fail "Maven could not fetch the Java storefront example's artifacts (see $STATE_DIR/java-storefront-fetch.log)"
  fi
  echo "$example_hash" >"$example_stamp"
  say "the Java storefront example's Maven artifacts fetched in $((SECONDS - started))s"
fi
say "setup complete"
