# syntax=docker/dockerfile:1
# The evaluator: EvaluatorService on 50054 (CLIP score with open_clip, LPIPS).
# requirements/base.txt + requirements/ml.txt, torch first from TORCH_INDEX. Scoring runs on the
# CPU, so the default CPU wheel is the one to use here (the argument exists for mirrors).
#
#     docker build -f deploy/docker/evaluator.Dockerfile -t imagegen/evaluator:dev .
#
# No weights are in the image and none are downloaded at run time: the open_clip folder
# (CLIP_DIR, default ${MODEL_DIR}/tiny-clip) and the optional LPIPS AlexNet backbone
# (LPIPS_BACKBONE) live on the mounted models volume.
# Build context: the repository root (see deploy/docker/dockerignore).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: the virtual environment and the generated gRPC code ----
FROM ${PYTHON_IMAGE} AS build
# Where torch and torchvision come from: the CPU wheels by default; a CUDA index for GPU images.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY requirements/ requirements/
# torch first, at the versions constraints.txt pins, from TORCH_INDEX; the rest is then installed
# under the same constraints, so no package can swap the torch build.
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m venv /opt/venv \
 && /opt/venv/bin/pip install --index-url "${TORCH_INDEX}" \
      $(grep -E '^(torch|torchvision)==' requirements/constraints.txt) \
 && /opt/venv/bin/pip install -c requirements/constraints.txt \
      -r requirements/base.txt -r requirements/ml.txt \
 && /opt/venv/bin/python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m venv /opt/protoc \
 && /opt/protoc/bin/pip install "$(grep -E '^grpcio-tools==' requirements/dev.txt)"
COPY protos/ protos/
RUN mkdir gen \
 && /opt/protoc/bin/python -m grpc_tools.protoc -I protos \
      --python_out=gen --grpc_python_out=gen protos/imagegen/v1/*.proto \
 && touch gen/imagegen/__init__.py gen/imagegen/v1/__init__.py
RUN printf '%s\n%s\n' /app/gen /app \
      > "$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/imagegen.pth"

# ---- runtime ----
FROM ${PYTHON_IMAGE} AS runtime
ARG UID=10001
# /models is created here, owned by the service user, like in the generator image.
RUN groupadd --system --gid ${UID} imagegen \
 && useradd --system --uid ${UID} --gid imagegen --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin imagegen \
 && mkdir -p /data /models && chown ${UID}:${UID} /data /models
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HF_HUB_DISABLE_PROGRESS_BARS=1 \
    HF_HOME=/tmp/huggingface \
    TORCH_HOME=/tmp/torch \
    XDG_CACHE_HOME=/tmp/cache \
    TRITON_CACHE_DIR=/tmp/triton \
    DATA_DIR=/data \
    MODEL_DIR=/models \
    LISTEN_ADDR=0.0.0.0:50054
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
COPY --from=build /src/gen gen/
COPY services/ services/
COPY deploy/models/ deploy/models/
COPY deploy/safety/ deploy/safety/
COPY deploy/healthcheck.py deploy/healthcheck.py
RUN python -m compileall -q gen services deploy/healthcheck.py
USER ${UID}:${UID}
EXPOSE 50054
# Health is NOT_SERVING until the scoring models are loaded.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/app/deploy/healthcheck.py"]
CMD ["python", "-m", "services.evaluator"]
