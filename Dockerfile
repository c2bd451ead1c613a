# Images for docker-compose.yml, on Flower's official images of the pinned version.
#
#   superlink  flwr/superlink + a state directory owned by the image's user, so
#              that a fresh named volume mounted there is writable
#   superexec  flwr/superexec + this project (fedsoup, strategies, simulations)
#              and its dependencies, CPU torch included: it runs the ServerApp
#              (FedSoup) and the ClientApps. Nothing is installed at run time.
#
# The SuperNodes use flwr/supernode unchanged (they never import App code).
#
# Builds alike with BuildKit, the classic builder (DOCKER_BUILDKIT=0, docker-compose
# v1), podman/buildah and kaniko: they disagree on who owns a directory that WORKDIR
# or COPY creates (BuildKit: the current USER; the others: root), so every directory
# the image's user writes in is made first by a RUN as that user, inside /app, which
# Flower's images give to it. No `# syntax=` line: the builder's own Dockerfile
# frontend suffices, and an offline BuildKit could not pull another one.
ARG FLWR_VERSION=1.42.0

FROM flwr/superlink:${FLWR_VERSION} AS superlink
# Flower's images run as the unprivileged user `app` (uid 49999) in /app.
RUN mkdir -p /app/state
ENV FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0

FROM flwr/superexec:${FLWR_VERSION} AS superexec
ARG FLWR_VERSION
# The CPU wheel index: PyPI's Linux torch wheels pull gigabytes of CUDA libraries.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, in its own layer: it is by far the largest and changes least.
RUN python -m pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# `pip install .` writes its build metadata next to the sources: /app/src must belong
# to `app`, and a WORKDIR that creates it would not under every builder.
RUN mkdir -p /app/src /app/checkpoints /app/outputs
WORKDIR /app/src
COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app fedsoup ./fedsoup
COPY --chown=app:app strategies ./strategies
COPY --chown=app:app simulations ./simulations
# Pin flwr to the image's own version so that pip never swaps the runtime.
RUN python -m pip install ".[all]" "flwr==${FLWR_VERSION}" \
    && python -c "import fedsoup, strategies, simulations.server_app, simulations.client_app"

# /app/checkpoints and /app/outputs (made above, by `app`) are the mount points of
# the compose volumes: a fresh named volume inherits their owner, so it is writable.
WORKDIR /app
ENTRYPOINT ["flower-superexec"]
