# syntax=docker/dockerfile:1
# anomaly-detector: the daemon in a slim image. Build and run: docs/install.md.
#
#   docker build -t anomaly-detector .
#   docker run -d --name anomaly-detector -p 127.0.0.1:9108:9108 \
#       -v ./my-config.toml:/etc/anomaly-detector/config.toml:ro \
#       -v anomaly-detector-state:/var/lib/anomaly-detector anomaly-detector
#
# Scoring needs no TensorFlow (numpy / ONNX Runtime), so by default the image holds only
# the run-time dependencies (deploy/docker/requirements-runtime.txt): ~210 MB of
# site-packages instead of ~1.7 GB. Learn-from-stream and `train` need TensorFlow: build
# with `--build-arg TRAINING=1` to add deploy/docker/requirements-train.txt.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with the package and its run-time dependencies -----
FROM ${PYTHON_IMAGE} AS build
ARG TRAINING=0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/anomaly-detector/venv
ENV PATH=/opt/anomaly-detector/venv/bin:$PATH
WORKDIR /src
# Dependencies first: this layer is reused until the requirement lists change.
COPY deploy/docker/requirements-runtime.txt deploy/docker/requirements-train.txt ./
RUN pip install -r requirements-runtime.txt \
    && if [ "$TRAINING" = "1" ]; then pip install -r requirements-train.txt; fi
COPY pyproject.toml README.md ./
COPY detector ./detector
# --no-deps: pyproject.toml lists the training stack too; the lists above decide.
RUN pip install --no-deps . \
    && pip uninstall -y pip setuptools

# ---- run: the venv, the shipped model, a default config; no compilers, no pip --------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="anomaly-detector" \
      org.opencontainers.image.description="Streaming anomaly detection for MQTT sensor data" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 anomaly-detector \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --no-log-init \
       --home-dir /var/lib/anomaly-detector --shell /usr/sbin/nologin anomaly-detector \
    && mkdir -p /etc/anomaly-detector /var/lib/anomaly-detector \
    && chown 10001:10001 /var/lib/anomaly-detector \
    && chmod 0750 /var/lib/anomaly-detector
COPY --from=build /opt/anomaly-detector/venv /opt/anomaly-detector/venv
COPY models /opt/anomaly-detector/models
COPY deploy/docker/config.toml /etc/anomaly-detector/config.toml
# ORT_DISABLE_TELEMETRY: ONNX Runtime's opt-out of its device id, event cache and usage
# upload. ANOMALY_DETECTOR_HEALTHZ: the HEALTHCHECK's URL ([metrics] port).
ENV PATH=/opt/anomaly-detector/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    ORT_DISABLE_TELEMETRY=1 \
    HOME=/var/lib/anomaly-detector \
    KERAS_HOME=/tmp/keras \
    MPLCONFIGDIR=/tmp/matplotlib \
    ANOMALY_DETECTOR_HEALTHZ=http://127.0.0.1:9108/healthz
WORKDIR /var/lib/anomaly-detector
# Config (config.toml, your model bundles) and state (checkpoints, learned models).
VOLUME ["/etc/anomaly-detector", "/var/lib/anomaly-detector"]
EXPOSE 9108
# Numeric, so that runAsNonRoot-style checks can verify it without /etc/passwd.
USER 10001:10001
# 200 while the scoring thread runs and the broker is connected, else 503 (urlopen
# raises on 503, and on a refused connection). Change ANOMALY_DETECTOR_HEALTHZ when you
# change [metrics] port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['ANOMALY_DETECTOR_HEALTHZ'], timeout=4)"]
# SIGTERM drains, checkpoints and disconnects within [worker] shutdown_timeout_s (10 s):
# give `docker stop` more than that (-t 30; compose: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["anomaly-detector"]
CMD ["run", "--config", "/etc/anomaly-detector/config.toml"]
