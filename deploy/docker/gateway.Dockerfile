# syntax=docker/dockerfile:1
# The gateway: gRPC ImageService + CostService on 50051, the HTTP facade on 8080.
# Only requirements/base.txt and requirements/moderation.txt (the prompt classifier): this image
# carries no torch.
#
#   docker build -f deploy/docker/gateway.Dockerfile -t imagegen/gateway:dev .
#
# Build context: the repository root (see deploy/docker/dockerignore).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: the virtual environment and the generated gRPC code ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY requirements/ requirements/
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m venv /opt/venv \
 && /opt/venv/bin/pip install -c requirements/constraints.txt -r requirements/base.txt \
      -r requirements/moderation.txt
# protoc runs from its own throw-away environment (grpcio-tools at the version dev.txt pins), so
# nothing of it reaches the runtime image.
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m venv /opt/protoc \
 && /opt/protoc/bin/pip install "$(grep -E '^grpcio-tools==' requirements/dev.txt)"
COPY protos/ protos/
RUN mkdir gen \
 && /opt/protoc/bin/python -m grpc_tools.protoc -I protos \
      --python_out=gen --grpc_python_out=gen protos/imagegen/v1/*.proto \
 && touch gen/imagegen/__init__.py gen/imagegen/v1/__init__.py
# `imagegen.v1` (gen/) and `services` (/app) importable from anywhere, as `make proto` does.
RUN printf '%s\n%s\n' /app/gen /app \
      > "$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/imagegen.pth"

# ---- runtime ----
FROM ${PYTHON_IMAGE} AS runtime
ARG UID=10001
RUN groupadd --system --gid ${UID} imagegen \
 && useradd --system --uid ${UID} --gid imagegen --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin imagegen \
 && mkdir -p /data && chown ${UID}:${UID} /data
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    DATA_DIR=/data \
    LISTEN_ADDR=0.0.0.0:50051 \
    HTTP_HOST=0.0.0.0 \
    HTTP_PORT=8080
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY --from=build /src/gen gen/
COPY services/ services/
COPY deploy/models/ deploy/models/
COPY deploy/safety/ deploy/safety/
COPY deploy/healthcheck.py deploy/healthcheck.py
RUN python -m compileall -q gen services deploy/healthcheck.py
USER ${UID}:${UID}
EXPOSE 50051 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "/app/deploy/healthcheck.py"]
CMD ["python", "-m", "services.gateway"]
