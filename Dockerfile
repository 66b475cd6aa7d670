# CPU image that runs the scheduled-retraining flow once by default.
#   docker build -t rlsc .
#   docker run -v rlsc-cache:/cache -v rlsc-outputs:/app/outputs rlsc
#   docker run ... rlsc python -m flows.retrain --serve --cron "0 3 * * 1"
# GPU: torch's CUDA wheels carry their own CUDA libraries, so only the index changes:
#   docker build --build-arg TORCH_INDEX=https://pypi.org/simple -t rlsc:cuda .  &&  docker run --gpus all ...
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    RLSC_CACHE=/cache \
    PREFECT_HOME=/app/outputs/.prefect \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=60 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true \
    DVC_NO_ANALYTICS=1

# git: lineage tags (commit) and DVC; gcc: builds the decode kernel (rlsc/kernels) on first use;
# Debian's stable packages, not pinned to a point release
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY rlsc ./rlsc
# torch comes from the chosen index (CPU or CUDA wheels) first, so the project's range pulls nothing more
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_INDEX}" "torch>=2.5,<2.14" \
    && pip install ".[pipeline]"
COPY flows ./flows
COPY params.yaml dvc.yaml ./

RUN useradd --create-home --uid 10001 rlsc && mkdir -p /cache /app/outputs && chown -R 10001 /cache /app
USER 10001
# the assembled model and the MLflow store (outputs/mlflow) outlive the container
VOLUME ["/cache", "/app/outputs"]
CMD ["python", "-m", "flows.retrain", "--config", "params.yaml"]
