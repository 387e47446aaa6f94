# The two commands a newcomer needs: `make demo` and `make test`.
# Everything else is here for operators and contributors.

SHELL := /bin/bash
export DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/coupons
export REDIS_URL ?= redis://127.0.0.1:6379
export KAFKA_BROKERS ?= 127.0.0.1:9092
export CARGO_TERM_COLOR ?= never

.PHONY: setup up down cluster-up cluster-down build test lint fmt demo bench chaos clean-state

setup: ## install what this machine lacks (Postgres, Redis, a JDK, Apache Kafka from Maven Central)
	infra/local/setup.sh

up: setup ## start Postgres, Redis and a single-node Kafka broker (reusing running ones)
	infra/local/up.sh

down: ## stop what `make up` started
	infra/local/down.sh

cluster-up: setup ## start the 3-node Kafka cluster (RF 3, min.insync.replicas 2) beside the single node
	infra/local/cluster.sh up

cluster-down: ## stop the 3-node cluster
	infra/local/cluster.sh down

build:
	cargo build --release --bin couponctl

lint: ## formatting and clippy, warnings are errors
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

test: up ## every test, against the real services (the console in Debian's chromium last)
	cargo build --bin couponctl
	tests/broker_restart.sh
	cargo test --workspace --no-fail-fast
	tests/contract/run.sh
	tests/console/run.sh

demo: up build ## a coupon release, a burst of users, purchases and expirations
	target/release/couponctl demo

chaos: up ## the long fault-injection run; prints a table (CHAOS_USERS, CHAOS_RATE, CHAOS_SUSTAINED)
	cargo test --test chaos -- --long

.PHONY: fuzz
fuzz: up ## the storefront contract with a random seed and more examples (CONTRACT_EXAMPLES, CONTRACT_MAX_TIME)
	CONTRACT_SEED=random CONTRACT_EXAMPLES=$${CONTRACT_EXAMPLES:-100} CONTRACT_MAX_TIME=$${CONTRACT_MAX_TIME:-600} tests/contract/run.sh

bench: up build ## the benchmarks (BENCH_QUICK=1 for a short run)
	target/release/couponctl bench

clean-state: down cluster-down
	rm -rf .state
