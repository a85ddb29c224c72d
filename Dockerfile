# OneStep serving image: NVIDIA Triton (every backend) + the OneStep HTTP image API, no torch.
#
#   make demo                                   # writes runs/demo/model_repository
#   docker build -t onestep-serve:0.1.0 .
#   docker run --rm --shm-size=1g -p 8000:8080 -e ONESTEP_API_KEY=change-me onestep-serve:0.1.0
#
# Ports: the HTTP API listens on 8080 in the container (publish it as 8000 on the host). `onestep serve`
# starts Triton on loopback inside the container on free ports, so Triton itself is not reachable from
# outside; to run plain Triton on its standard ports 8000/8001/8002 use
# `--entrypoint tritonserver ... --model-repository=/models` (see deploy/README.md).
# Another repository: build with --build-arg MODEL_REPOSITORY=path/in/context, or mount one at /models.
FROM nvcr.io/nvidia/tritonserver:25.01-py3

ARG MODEL_REPOSITORY=runs/demo/model_repository

LABEL org.opencontainers.image.title="onestep-serve" \
      org.opencontainers.image.description="One-step image generators behind NVIDIA Triton with an HTTP image API" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

# The image's Python is the distribution's (PEP 668): the serving stack goes into /usr/local with pip,
# next to the python backend that imports it.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# The serving dependencies only (pyproject's `serve` extra minus the local-Triton wheel and matplotlib);
# --ignore-installed leaves the distribution's own Python packages untouched.
RUN python3 -m pip install --no-cache-dir --ignore-installed \
        "numpy==1.26.4" \
        "pillow==13.0.0" \
        "safetensors==0.8.0" \
        "tqdm==4.70.1" \
        "onnxruntime==1.32.0" \
        "tritonclient[grpc,http]==2.73.0" \
        "fastapi==0.165.0" \
        "uvicorn==0.54.0" \
        "prometheus-client==0.26.0"

WORKDIR /opt/onestep
COPY pyproject.toml README.md ./
COPY onestep/ onestep/
COPY serving/ serving/
COPY exporters/ exporters/
COPY benchmarks/*.py benchmarks/
RUN python3 -m pip install --no-cache-dir --no-deps . \
    && onestep serve --help > /dev/null \
    && python3 -I -c "import sys, serving.api, serving.triton_model; sys.exit('torch' in sys.modules)" \
    && groupadd --system --gid 10001 onestep \
    && useradd --no-log-init --system --create-home --uid 10001 --gid onestep onestep

COPY ${MODEL_REPOSITORY} /models

USER 10001:10001
WORKDIR /home/onestep
EXPOSE 8080

# health: /readyz (Triton and models ready; 503 while draining). If Triton dies the process exits non-zero, so
# the restart policy (or an orchestrator's /healthz liveness probe) brings the service back.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:8080/readyz', headers={'X-API-Key': os.environ.get('ONESTEP_API_KEY', '')}), timeout=4)"]
STOPSIGNAL SIGTERM

# The API binds 0.0.0.0 in the container, so it refuses to start without an API key: set ONESTEP_API_KEY (or
# mount a file and set ONESTEP_API_KEY_FILE), or pass --insecure after the image name. Extra `onestep serve`
# flags go after the image name, e.g. `docker run ... onestep-serve:0.1.0 --max-images 16`. SIGTERM (docker
# stop): /readyz turns 503, requests in flight finish, then Triton stops.
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "onestep", "serve", "--repo", "/models", "--host", "0.0.0.0", "--port", "8080"]
CMD []
