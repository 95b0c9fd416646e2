# Every target uses the virtualenv at .venv, created and filled when missing.
PY      := .venv/bin/python
STACK   := scripts/stack
WITH_STACK := $(STACK) up >&2 && eval "$$($(STACK) env)" &&
# OUTBOX_STACK_CLUSTER=1: every scripts/stack call of the run goes to the cluster
WITH_CLUSTER := $(STACK) --cluster up >&2 && eval "$$($(STACK) --cluster env)" && OUTBOX_STACK_CLUSTER=1

.PHONY: test test-unit test-integration test-packaging lint typecheck docs demo bench chaos chaos-cluster-short stack-up stack-down clean

.venv/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

## unit + integration + packaging tests, on a real PostgreSQL and Kafka (started when
## needed); the packaging tests install the built wheel from PyPI's dependencies
test: .venv/.installed
	$(WITH_STACK) $(PY) -m pytest tests/unit tests/integration tests/packaging tests/chaos \
		-p no:cacheprovider --durations=15

## unit tests only: no services
test-unit: .venv/.installed
	$(PY) -m pytest tests/unit -p no:cacheprovider

## the sdist and the wheel built, checked and installed into clean virtualenvs: no
## services, but it needs PyPI
test-packaging: .venv/.installed
	$(PY) -m pytest tests/packaging -p no:cacheprovider

test-integration: .venv/.installed
	$(WITH_STACK) $(PY) -m pytest tests/integration -p no:cacheprovider

lint: .venv/.installed
	.venv/bin/ruff check outbox migrations tests benchmarks examples docs/hooks.py

typecheck: .venv/.installed
	.venv/bin/mypy

## the documentation site, built into site/; --strict: any warning fails it
docs: .venv/.installed
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict

## benchmarks: every figure beside its ceiling measured in the same run, one table and
## reports/ (bench.json, throughput.png, latency.png). BENCH="relay latency" picks some;
## BENCH_STORAGE=0 skips the 3 fill-and-drain cycles of 1,000,000 events
bench: .venv/.installed
	$(WITH_STACK) $(PY) -m benchmarks $(BENCH)

## the main job: the orders demo on the real stack, with faults, ending in a summary table
demo: .venv/.installed
	$(WITH_STACK) $(PY) -m examples.demo $(DEMO)

## the long chaos run: make chaos SEED=1 DURATION=600 [UNSAFE=ack|ordering|dedupe|shards|progress]
## [CLIENT=confluent] [EXACTLY_ONCE=1]; writes reports/chaos-seed<N>.json and, with
## matplotlib, reports/chaos-seed<N>-timeline.png (redraw: python -m tests.chaos.timeline FILE)
SEED ?= 1
DURATION ?= 600
CLIENT ?= kafka-python
## CLUSTER=1: on `scripts/stack --cluster` (three brokers, a primary and a synchronous
## standby), with broker-leader kills, rolling restarts, isolated brokers and failovers
CLUSTER_FLAG := $(if $(filter 1 true yes,$(CLUSTER)),--cluster)
chaos: .venv/.installed
	$(if $(CLUSTER_FLAG),$(WITH_CLUSTER),$(WITH_STACK)) OUTBOX_KAFKA_CLIENT=$(CLIENT) $(PY) -m tests.chaos.run --seed $(SEED) --duration $(DURATION) \
		--min-faults-per-10min 50 $(if $(UNSAFE),--unsafe $(UNSAFE)) \
		$(if $(filter 1 true yes,$(EXACTLY_ONCE)),--exactly-once) $(CLUSTER_FLAG)

## a two-minute chaos run on the cluster (not part of `make test`)
chaos-cluster-short: .venv/.installed
	$(WITH_CLUSTER) $(PY) -m tests.chaos.run --cluster --seed 1 --duration 120 \
		--min-faults-per-10min 50

stack-up:
	$(STACK) up

stack-down:
	$(STACK) down

clean:
	rm -rf .venv build dist site *.egg-info
