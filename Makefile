# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
EFFNET := $(VENV)/bin/effnet
REPO   ?= models
MODELS ?= default
HOST   ?= 127.0.0.1
PORT   ?= 8000

.DEFAULT_GOAL := help
.PHONY: help lint test-fast install system-deps perf-analyzer models serve test test-workers test-deploy bench bench-smoke bench-precision bench-soak bench-reliability bench-scaling bench-quiet bench-timeline bench-memory bench-gpu mutation clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[build,lite-weights,test,bench]'
	touch $@

help: ## this list
	@echo "effnet-serve: two commands do everything on a fresh machine: make serve, make test"
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-z-]*:.*## / {printf "  make %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: $(VENV)/.installed ## the venv in .venv with every extra (build, tests, benchmarks)

models: install ## build MODELS (default: b0..b7 and lite0..2) into REPO (default: models/)
	$(EFFNET) build --models $(MODELS) --weights auto --repo $(REPO)

# Serve while building: the first models (b0 and lite0 of the default set, else the first one named) are built,
# the server starts on them, and the rest build behind it into the same repository; the server polls it and
# serves each one as it lands (/health/ready lists those still building; the build's log: .cache/build.log).
comma := ,
FIRST_MODELS ?= $(if $(filter default,$(MODELS)),b0$(comma)lite0,$(firstword $(subst $(comma), ,$(MODELS))))
serve: install ## build the first models, serve on HOST:PORT (127.0.0.1:8000), build the rest behind it
	$(EFFNET) build --models $(FIRST_MODELS) --weights auto --repo $(REPO)
	@mkdir -p .cache; echo "building the rest of $(MODELS) behind the server: .cache/build.log"
	@nice -n 10 $(EFFNET) build --models $(MODELS) --weights auto --repo $(REPO) --quiet > .cache/build.log 2>&1 & \
	builder=$$!; trap 'kill $$builder 2>/dev/null' EXIT INT TERM; \
	EFFNET_MODEL_CONTROL=$${EFFNET_MODEL_CONTROL:-poll} EFFNET_REPOSITORY=$(REPO) $(EFFNET) serve --host $(HOST) --port $(PORT)

# Debian packages the tests use: a real Prometheus server for the metrics/dashboard tests, libb64 for
# Triton's perf_analyzer, and Chromium for the browser tests of / and /docs (tests/ui). Installed only when
# missing and when we may (root); otherwise those tests say why they skip (and fail under CI=true).
SYSTEM_PACKAGES ?= prometheus libb64-0d chromium
system-deps: ## the Debian packages the tests use (Prometheus, libb64, Chromium), when root
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "system-deps: missing$$missing (run 'sudo make system-deps'); tests that need them will skip"; fi

# Triton's perf_analyzer ships only in the tritonclient 2.41.1 wheel, whose Python side needs protobuf<5 (which
# the project's onnx cannot live with): the wheel goes into a folder of its own, without dependencies; the
# binary needs no Python, only libb64 (above) and libcudart from nvidia-cuda-runtime-cu12, even on a CPU.
PERF_ANALYZER_DIR := .cache/perf-analyzer
PERF_ANALYZER := $(PERF_ANALYZER_DIR)/bin/perf_analyzer
$(PERF_ANALYZER): $(VENV)/.installed
	$(PY) -m pip install --quiet --no-deps --target $(PERF_ANALYZER_DIR) tritonclient==2.41.1 nvidia-cuda-runtime-cu12==12.9.79
	touch $@

perf-analyzer: $(PERF_ANALYZER)

# The service split as EFFNET_WORKERS=2 splits it (two front ends on one port over the engine, through the link
# and shared memory; tests/serving/serving_helpers.py): `make test` reruns these there, `make test-workers`
# every test that starts a server (about 7 minutes more).
WORKER_TESTS ?= tests/serving/test_serve_api.py tests/family/test_model_control.py tests/family/test_grpc.py \
	tests/serving/test_serve_uploads_limit.py tests/serving/test_serve_memory_release.py \
	tests/family/test_reload_under_load.py tests/reliability/test_rel_shutdown.py
SERVER_TESTS ?= tests/serving tests/family tests/reliability tests/eval tests/deploy/test_kserve.py

test: install system-deps $(PERF_ANALYZER) lint ## lint, every test, then the worker-split reruns (~10 min)
	$(PY) -m pytest
	EFFNET_TEST_WORKERS=2 $(PY) -m pytest -q -p no:cacheprovider $(WORKER_TESTS)

# The quick loop while changing code: lint, then the tests that need no live server process, the Prometheus
# server, the reference models or Docker; stops at the first failure.
FAST_IGNORE ?= --ignore=tests/reliability --ignore=tests/eval --ignore=tests/deploy --ignore=tests/bench \
	--ignore=tests/family --ignore=tests/build_step/test_reference_parity.py
test-fast: install lint ## lint + the quick tests (no reliability, family, eval, deploy), stop at the first failure
	$(PY) -m pytest -x -q $(FAST_IGNORE) -k "not mutants"

lint: install ## import layers (import-linter), ruff (errors and likely bugs, not style), mypy on app/
	cd $(CURDIR) && $(VENV)/bin/lint-imports --no-cache --no-logo
	$(VENV)/bin/ruff check app build benchmarks tests
	$(VENV)/bin/mypy

test-workers: install system-deps $(PERF_ANALYZER) ## every test that starts a server, split into 2 workers
	EFFNET_TEST_WORKERS=2 $(PY) -m pytest $(SERVER_TESTS)

# Builds the Docker image on a local debootstrap base, runs it and the compose stack (needs root).
test-deploy: install ## the Docker image and the compose stack (root, dockerd)
	bash deploy/ci/test-docker.sh

bench: install system-deps $(PERF_ANALYZER) ## the main benchmark -> docs/benchmarks.md
	$(PY) -m benchmarks.run

# Every bench-* target appends its results as typed records to docs/benchmarks.jsonl and renders docs/benchmarks.md
# from the latest run of each (benchmarks/report.py); `python -m benchmarks.report` renders it again.

# fp16/int8 copies of Lite0 vs fp32 (size, speed, agreement).
bench-precision: install
	$(PY) -m benchmarks.precision

# RSS over a 10-minute burst with b0..b7 loaded (needs the models make bench builds).
bench-soak: install
	$(PY) -m benchmarks.memory --soak

# The reliability tests' scenarios timed (goodput under a retry storm, p99 against queue drains, /health/live
# under floods, the memory burst's peak): the speeds tests/reliability no longer gates on. About 3 minutes.
bench-reliability: install
	$(PY) -m benchmarks.reliability

# Worker processes: 1 and N (= cores) workers x {tiny, b0, b4} x {HTTP JPEGs, gRPC tensors}, beside LitServe
# (1 and 2 workers) and the same work without a server, in alternating blocks; about 8 minutes.
bench-scaling: install system-deps $(PERF_ANALYZER) ## workers 1 and N against the peers
	$(PY) -m benchmarks.scaling

# Latency when the service is quiet (1 and 4 clients, b0 and lite0, HTTP JPEGs and gRPC tensors) against the same
# work without a server and LitServe, spinning on and off; about 10 minutes (4 rounds of 3 s windows per contender).
bench-quiet: install system-deps $(PERF_ANALYZER) ## latency at 1 and 4 clients against no server
	$(PY) -m benchmarks.quiet

# One b0 request's time hop by hop (spans over real OTLP, beside the client's clock), 2 workers and one process;
# about 2 minutes; LABEL names its block of docs/timeline.md (before, after).
LABEL ?= current
bench-timeline: install ## one request hop by hop -> docs/timeline.md (LABEL=...)
	$(PY) -m benchmarks.timeline --label $(LABEL)

# b0..b7 with default settings: the memory (PSS) of every process of the service summed, at ready, through a burst
# on each model and after it, for N workers and one process; about 6 minutes.
bench-memory: install ## b0..b7 memory (PSS of every process) at default settings
	$(PY) -m benchmarks.memory

# B0/B4/B7 on a GPU in one table: raw ORT CUDA (and TensorRT), the service over gRPC tensors and HTTP JPEGs, 1 and N
# workers; <= 8 min; no `install`: pip brings what is missing (EFFNET_GPU_WHEELS=DIR first). --cpu-smoke: on a CPU.
# Its records go to a temp dir's benchmarks.jsonl (BENCH_GPU_ARGS=--out docs: into docs/benchmarks.jsonl).
bench-gpu: ## B0/B4/B7 on a GPU host, one self-contained script
	$(if $(wildcard $(PY)),$(PY),python3) -m benchmarks.gpu $(BENCH_GPU_ARGS)

# A fast pass over the whole benchmark with tiny models; writes to a temp dir, never to docs/.
bench-smoke: install system-deps $(PERF_ANALYZER)
	$(PY) -m benchmarks.run --quick --out $$(mktemp -d)

# mutmut on the modules a silent bug costs most in, each against its own tests; writes docs/testing.md.
# Not part of `make test`: about half an hour on 2 cores (tests/mutation/run.py MODULE runs one).
mutation: install ## mutation scores of the batcher, data plane, ... -> docs/testing.md
	$(VENV)/bin/python -m pip install --quiet -e '.[mutation]'
	$(PY) tests/mutation/run.py

clean: ## remove the venv and pytest cache
	rm -rf $(VENV) .pytest_cache
