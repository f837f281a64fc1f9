# The bank backbone. Quick start: `make run`, `make test` (see README.md).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PROFILE ?= debug
CARGO_PROFILE_FLAG := $(if $(filter release,$(PROFILE)),--release,)
TEST_THREADS ?= 4

# Ports of the local infrastructure (infra/local/services.sh). The services
# `make run` starts, the tests, `make bench` and `make chaos` follow them.
PG_PORT ?= 5432
NATS_PORT ?= 4222
REDIS_PORT ?= 6379
export PG_PORT NATS_PORT REDIS_PORT
export TEST_PG_ADMIN_URL ?= postgres://postgres@127.0.0.1:$(PG_PORT)/postgres?sslmode=disable
export TEST_REDIS_URL ?= redis://127.0.0.1:$(REDIS_PORT)

.PHONY: help services run stop down test lint fmt clippy build unit chaos chaos-short bench lint-infra clean-test-dbs logs

help:
	@echo "make run         bring up PostgreSQL/NATS/Redis if needed, start the three services, print how to use them"
	@echo "make test        the same bring-up, then lints and the whole test suite (what CI runs)"
	@echo "make stop        stop the three services started by make run"
	@echo "make down        stop the services and whatever infrastructure make started"
	@echo "make bench       load scenarios P1-P6 against a same-run baseline (release build)"
	@echo "make chaos       seeded fault campaign (CHAOS_SECS=300 by default; CHAOS_SEED to replay)"
	@echo "make lint-infra  validate Kubernetes manifests, compose file, dashboards and alert rules"

services:
	@infra/local/services.sh up

build:
	cargo build $(CARGO_PROFILE_FLAG) --bins

run: services build
	@PROFILE=$(PROFILE) infra/local/run.sh start

stop:
	@infra/local/run.sh stop

down: stop
	@infra/local/services.sh down

logs:
	@tail -n 50 -f .local/logs/*.log

fmt:
	cargo fmt --all -- --check

clippy:
	cargo clippy --workspace --all-targets -- -D warnings

clean-test-dbs:
	@infra/local/clean-test-dbs.sh

# The whole suite: bring-up (and the bring-up's own start-our-own path on
# alternate ports), formatting and lints, the tests against real services,
# infrastructure validation, and a short chaos run.
test: services
	@infra/local/services.sh test-programs
	infra/local/selftest.sh
	$(MAKE) --no-print-directory fmt clippy clean-test-dbs
	cargo build --bins
	cargo test --workspace --no-fail-fast -- --test-threads=$(TEST_THREADS)
	$(MAKE) --no-print-directory lint-infra chaos-short

lint-infra:
	@infra/lint/lint.sh

chaos: services clean-test-dbs
	cargo build --release --bins --package bank-tests --package core-bank --package transfer --package projector
	target/release/chaos --secs $${CHAOS_SECS:-300} $${CHAOS_SEED:+--seed $$CHAOS_SEED}

chaos-short:
	cargo build --bins --package bank-tests --package core-bank --package transfer --package projector
	target/debug/chaos --secs $${CHAOS_SECS:-60} $${CHAOS_SEED:+--seed $$CHAOS_SEED}

bench: services clean-test-dbs
	@infra/local/services.sh test-programs
	cargo build --release --bins --package bank-tests --package core-bank --package transfer --package projector
	target/release/bench $${BENCH_ARGS:-}
