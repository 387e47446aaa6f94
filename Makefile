# The two commands a newcomer needs: `make demo` and `make test`.
# Everything else is here for operators and contributors.

SHELL := /bin/bash
# The connection defaults are written once, in platform/src/settings.rs.
setting = $(shell sed -n 's/^pub const $(1): &str = "\(.*\)";$$/\1/p' platform/src/settings.rs)
export DATABASE_URL ?= $(call setting,DATABASE_URL)
export REDIS_URL ?= $(call setting,REDIS_URL)
export KAFKA_BROKERS ?= $(call setting,KAFKA_BROKERS)
export CARGO_TERM_COLOR ?= never

.PHONY: setup up down cluster-up cluster-down ha-up ha-down sasl-up sasl-down shard-up shard-down cassandra-up cassandra-down build unit sqlx test lint fmt demo bench bench-scale chaos clean-state

setup: ## install what this machine lacks (Postgres, Redis, a JDK, Apache Kafka and Apache Cassandra from Maven Central)
	infra/local/setup.sh

up: setup ## start Postgres, Redis and a single-node Kafka broker (reusing running ones)
	infra/local/up.sh

down: ## stop what `make up` started
	infra/local/down.sh

cluster-up: setup ## start the 3-node Kafka cluster (RF 3, min.insync.replicas 2) beside the single node
	infra/local/cluster.sh up

cluster-down: ## stop the 3-node cluster
	infra/local/cluster.sh down

ha-up: setup ## Postgres under Patroni (3 members, synchronous, etcd, HAProxy): writes on 127.0.0.1:5440, reads on 5439
	infra/local/ha.sh up

ha-down: ## stop what `make ha-up` started (state kept in .state/ha)
	infra/local/ha.sh down

sasl-up: setup ## a Kafka node with SASL/PLAIN and ACLs (infra/kafka/acls.tsv for prefix coupons) on 127.0.0.1:19094
	infra/local/sasl.sh up

sasl-down: ## stop what `make sasl-up` started (state kept in .state/sasl)
	infra/local/sasl.sh down

shard-up: setup ## two more Postgres servers, the shards of README "Sharding", on 127.0.0.1:5451 and 5452 (state in .state/shard)
	infra/local/shard.sh up

shard-down: ## stop what `make shard-up` started
	infra/local/shard.sh down

cassandra-up: setup ## one Apache Cassandra node (the history store with HISTORY_STORE=cassandra) on 127.0.0.1:9042 (state in .state/cassandra)
	infra/local/cassandra.sh up

cassandra-down: ## stop what `make cassandra-up` started (data kept)
	infra/local/cassandra.sh down

build:
	cargo build --release --bin couponctl

sqlx: ## regenerate .sqlx/ (the compile-checked queries' offline data) against a fresh migrated database
	infra/local/sqlx-prepare.sh

lint: ## formatting and clippy, warnings are errors
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

unit: ## the unit and property tests of every crate: no service needed
	cargo test --workspace --lib --bins
	cargo test -p coupon-schemas --tests

test: up cassandra-up ## every test, against the real services (Cassandra for the history's tests; the Java storefront example, the console in Debian's chromium last)
	cargo build --bin couponctl
	tests/broker_restart.sh
	cargo test --workspace --no-fail-fast
	tests/contract/run.sh
	tests/java/run.sh
	tests/console/run.sh

demo: up build ## a coupon release, a burst of users, purchases and expirations
	target/release/couponctl demo

chaos: up ## the long fault-injection run; prints a table (CHAOS_USERS, CHAOS_RATE, CHAOS_SUSTAINED)
	cargo test --test chaos -- --long

.PHONY: fuzz
fuzz: up ## the storefront contract with a random seed and more examples (CONTRACT_EXAMPLES, CONTRACT_MAX_TIME)
	CONTRACT_SEED=random CONTRACT_EXAMPLES=$${CONTRACT_EXAMPLES:-100} CONTRACT_MAX_TIME=$${CONTRACT_MAX_TIME:-600} tests/contract/run.sh

bench: up shard-up cassandra-up build ## the benchmarks (BENCH_QUICK=1 for a short run); then the history stores' write and read rates
	BENCH_SHARD_URLS=$${BENCH_SHARD_URLS:-$$(infra/local/shard.sh urls)} target/release/couponctl bench
	cargo test --release --test it -- --ignored --nocapture --test-threads=1 history_bench:: rebuild_bench:: retention_bench::

bench-scale: up build ## the flash sale alone at 100,000, 1,000,000 and 3,000,000 users (BENCH_SCALE to choose), a coupon for one in a hundred, each in a fresh database
	BENCH_SCALE=$${BENCH_SCALE:-100000,1000000,3000000} target/release/couponctl bench

clean-state: down cluster-down ha-down sasl-down shard-down cassandra-down
	rm -rf .state

.PHONY: print-settings
print-settings: ## the connection settings make passes on (defaults from platform/src/settings.rs)
	@echo "DATABASE_URL=$$DATABASE_URL REDIS_URL=$$REDIS_URL KAFKA_BROKERS=$$KAFKA_BROKERS"
