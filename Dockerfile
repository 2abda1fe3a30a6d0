# syntax=docker/dockerfile:1
# Production image: gunicorn + uvicorn workers serving ResNet18 with the ImageNet weights
# baked in, so the container starts without network access.
#   docker build -t resnet-service .                          # CPU PyTorch (default)
#   docker build --build-arg TORCH_VARIANT=cuda -t resnet-service:cuda .
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
COPY requirements.txt constraints.txt /tmp/
# The CPU wheels come from PyTorch's CPU index and are a tenth of the size of the default
# CUDA build, at the versions requirements.txt pins; it then finds torch and torchvision
# already satisfied, and constraints.txt brings every other package to the version the
# tests ran with.
RUN if [ "$TORCH_VARIANT" = "cpu" ]; then \
        grep -E '^torch(vision)?==' /tmp/requirements.txt > /tmp/torch.txt \
        && pip install --index-url https://download.pytorch.org/whl/cpu -r /tmp/torch.txt; \
    fi \
    && pip install -r /tmp/requirements.txt -c /tmp/constraints.txt
ENV TORCH_HOME=/opt/torch
RUN python -c "from torchvision.models import ResNet18_Weights as W; W.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=True, weights_only=True)"

FROM python:${PYTHON_VERSION}-slim
# /data holds the task database (DATA_DIR): the one place the service writes.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin app \
    && install -d -o 10001 -g 10001 /data
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/torch /opt/torch
WORKDIR /app
COPY main.py gunicorn_config.py imagenet_classes.txt ./
COPY batching/ batching/
COPY classification/ classification/
COPY service/ service/
ENV PATH=/opt/venv/bin:$PATH \
    TORCH_HOME=/opt/torch \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus-multiproc \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DATA_DIR=/data \
    PORT=5001
VOLUME ["/data"]
# Numeric, so Kubernetes can verify runAsNonRoot without reading /etc/passwd.
USER 10001:10001
EXPOSE 5001
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-m", "service.probe", "/healthz"]
CMD ["gunicorn", "main:app", "-c", "gunicorn_config.py"]
