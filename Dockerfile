# syntax=docker/dockerfile:1
# Images for docker-compose.yml, on Flower's official images of the pinned version.
#
#   superlink  flwr/superlink + a state directory owned by the image's user, so
#              that a fresh named volume mounted there is writable
#   superexec  flwr/superexec + this project (fedsoup, strategies, simulations)
#              and its dependencies, CPU torch included: it runs the ServerApp
#              (FedSoup) and the ClientApps. Nothing is installed at run time.
#
# The SuperNodes use flwr/supernode unchanged (they never import App code).
ARG FLWR_VERSION=1.41.0

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

WORKDIR /app/src
COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app fedsoup ./fedsoup
COPY --chown=app:app strategies ./strategies
COPY --chown=app:app simulations ./simulations
# Pin flwr to the image's own version so that pip never swaps the runtime.
RUN python -m pip install ".[all]" "flwr==${FLWR_VERSION}" \
    && python -c "import fedsoup, strategies, simulations.server_app, simulations.client_app"

WORKDIR /app
# Mount points for the compose volumes, created by `app` so that fresh named
# volumes inherit a writable owner.
RUN mkdir -p /app/checkpoints /app/outputs
ENTRYPOINT ["flower-superexec"]
