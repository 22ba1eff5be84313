# CNEI developer entry points. `make run` and `make test` do all set-up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/*/*.proto)
PB_STAMP := services/pb/.generated
PA_INSTALL := $(firstword $(wildcard ../shared/tools/perf-analyzer/install.sh /work/shared/tools/perf-analyzer/install.sh))

.PHONY: run test protos install clean bench bench-scheduler bench-batching bench-delta perf-analyzer frontdoor frontdoor-deps

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

$(PB_STAMP): $(PROTOS) $(STAMP) scripts/gen-protos.sh
	PYTHON=$(BIN)/python scripts/gen-protos.sh

protos: $(PB_STAMP)

# The compiled gRPC front door of the coordinator (C++, Debian's gRPC). Without it the coordinator
# serves gRPC itself (CNEI_COORDINATOR_FRONT_DOOR=auto), so a failed install only warns.
FRONTDOOR_PKGS := libgrpc++-dev libssl-dev protobuf-compiler-grpc pkg-config g++ make

frontdoor-deps:
	@{ [ -f /usr/include/grpcpp/grpcpp.h ] && [ -f /usr/include/openssl/ssl.h ] && command -v grpc_cpp_plugin >/dev/null && command -v pkg-config >/dev/null; } || \
	  { export DEBIAN_FRONTEND=noninteractive; \
	    { apt-get install -y -q $(FRONTDOOR_PKGS) || { apt-get update -q && apt-get install -y -q $(FRONTDOOR_PKGS); }; } >/dev/null 2>&1; } || \
	  echo "gRPC C++ could not be installed; the coordinator will serve gRPC without its front door"

frontdoor: frontdoor-deps
	@$(MAKE) -s -C services/coordinator/frontdoor -j2 || \
	  echo "the front door did not build; the coordinator will serve gRPC without it"

run: $(PB_STAMP) frontdoor
	$(BIN)/cnei up

test: $(PB_STAMP) frontdoor
	@$(BIN)/perf_analyzer --version >/dev/null 2>&1 || \
	  { [ -n "$(PA_INSTALL)" ] && bash $(PA_INSTALL) $(abspath $(BIN)) >/dev/null 2>&1; } || \
	  echo "perf_analyzer could not be installed; its test will be skipped"
	@[ -x /usr/bin/chromium ] || { export DEBIAN_FRONTEND=noninteractive; \
	  { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } >/dev/null 2>&1; } || \
	  echo "chromium could not be installed; the status page browser test will be skipped"
	$(BIN)/python -m pytest -q tests

# `make bench` (not part of the tests): CNEI vs in-process ONNX Runtime vs MLServer; see bench/README.md.
# MLServer lives in its own virtualenv so it never touches the project's. BENCH_ARGS=--quick for a smoke run.
MLSERVER_VENV := .bench/mlserver-venv

$(MLSERVER_VENV)/.installed:
	$(PY) -m venv $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/pip install -q --upgrade pip
	$(MLSERVER_VENV)/bin/pip install -q mlserver==1.7.1 'uvloop<0.22' onnxruntime numpy
	touch $@

bench: $(PB_STAMP) frontdoor $(MLSERVER_VENV)/.installed
	@$(BIN)/perf_analyzer --version >/dev/null 2>&1 || $(MAKE) -s perf-analyzer
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# `make bench-scheduler`: placement policies (edgeai, round_robin, random, least_loaded) on an emulated
# heterogeneous cluster, about 6 minutes; BENCH_ARGS=--quick for a 2-minute run. See bench/README.md.
bench-scheduler: $(PB_STAMP)
	$(BIN)/python bench/scheduler.py $(BENCH_ARGS)

# `make bench-delta`: the bytes a new wide_mlp version costs as a delta against the one before
# (fine-tuned last layer, every weight moved, renamed graph), with the time to make and apply it.
bench-delta: $(PB_STAMP)
	$(BIN)/python bench/delta.py $(BENCH_ARGS)

# `make bench-batching`: p99 under open-loop Poisson load for each batching set-up (none, greedy,
# 500 µs and 2 ms queue delay), then MLServer with and without adaptive batching when `make bench`
# has made its virtualenv; about 7 minutes, BENCH_ARGS=--quick for 2. See bench/README.md.
bench-batching: $(PB_STAMP) frontdoor
	@$(BIN)/perf_analyzer --version >/dev/null 2>&1 || $(MAKE) -s perf-analyzer
	$(BIN)/python bench/batching.py $(BENCH_ARGS)

# The installer is not part of this repository: it is looked for beside the checkout
# (../shared/tools/perf-analyzer/install.sh).
perf-analyzer: $(STAMP)
	@[ -n "$(PA_INSTALL)" ] || { echo "make perf-analyzer: ../shared/tools/perf-analyzer/install.sh not found" \
	  "(it is not part of this repository); put Triton's perf_analyzer at $(BIN)/perf_analyzer yourself" >&2; exit 1; }
	bash $(PA_INSTALL) $(abspath $(BIN))

clean:
	rm -rf services/pb $(VENV) .cnei services/coordinator/frontdoor/build
