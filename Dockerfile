# OneStep serving images: NVIDIA Triton (every backend) + the OneStep HTTP image API, no torch.
# One Dockerfile, two images, chosen with the VARIANT build argument:
#   cpu (default): the python-backend models run on the CPU build of onnxruntime;
#   gpu:           they run on onnxruntime-gpu (CUDA 12 build, for the CUDA 12 of the base image).
# Exactly one of the two onnxruntime packages is installed (they overwrite each other's files); the build
# fails if the other one is present.
#
#   make demo                                                    # writes runs/demo/model_repository
#   docker build -t onestep-serve:0.1.0 .                        # CPU image
#   docker build --build-arg VARIANT=gpu -t onestep-serve:0.1.0-gpu .
#   docker run --rm --shm-size=1g -p 8000:8080 -e ONESTEP_API_KEY=change-me onestep-serve:0.1.0
#   docker run --rm --gpus all --shm-size=1g -p 8000:8080 -e ONESTEP_API_KEY=change-me onestep-serve:0.1.0-gpu
#
# Ports: the HTTP API listens on 8080 in the container (publish it as 8000 on the host). `onestep serve`
# starts Triton on loopback inside the container on free ports, so Triton itself is not reachable from
# outside; to run plain Triton on its standard ports 8000/8001/8002 use
# `--entrypoint tritonserver ... --model-repository=/models` (see deploy/README.md).
# Another repository: build with --build-arg MODEL_REPOSITORY=path/in/context, or mount one at /models.
FROM nvcr.io/nvidia/tritonserver:25.01-py3

ARG MODEL_REPOSITORY=runs/demo/model_repository
ARG VARIANT=cpu

LABEL org.opencontainers.image.title="onestep-serve" \
      org.opencontainers.image.description="One-step image generators behind NVIDIA Triton with an HTTP image API" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.onestep.variant="${VARIANT}"

# The image's Python is the distribution's (PEP 668): the serving stack goes into /usr/local with pip,
# next to the python backend that imports it.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# The serving dependencies only (pyproject's `serve` extra minus the local-Triton wheel and matplotlib, with
# the onnxruntime build of the variant: `serve` for cpu, `gpu` for gpu); --ignore-installed leaves the
# distribution's own Python packages untouched. onnxruntime-gpu 1.26.0 is the newest CUDA 12 build on PyPI
# (later ones need CUDA 13), matching CUDA 12.8 and cuDNN 9 of tritonserver 25.01.
RUN case "${VARIANT}" in \
        cpu) ort_pkg=onnxruntime ort_ver=1.32.0 ;; \
        gpu) ort_pkg=onnxruntime-gpu ort_ver=1.26.0 ;; \
        *) echo "VARIANT must be cpu or gpu, not '${VARIANT}'" >&2; exit 1 ;; \
    esac \
    && python3 -m pip install --no-cache-dir --ignore-installed \
        "numpy==1.26.4" \
        "pillow==13.0.0" \
        "safetensors==0.8.0" \
        "tqdm==4.70.1" \
        "${ort_pkg}==${ort_ver}" \
        "tritonclient[grpc,http]==2.73.0" \
        "fastapi==0.165.0" \
        "uvicorn==0.54.0" \
        "httptools==0.9.0" \
        "uvloop==0.23.0" \
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
    && python3 -I -c "import importlib.metadata as md, os, sys, onnxruntime as ort; \
have = {(d.metadata['Name'] or '').lower().replace('_', '-') for d in md.distributions()} & {'onnxruntime', 'onnxruntime-gpu'}; \
want = {'cpu': {'onnxruntime'}, 'gpu': {'onnxruntime-gpu'}}[os.environ['VARIANT']]; \
cuda = 'CUDAExecutionProvider' in ort.get_available_providers(); \
sys.exit(0 if have == want and cuda == (want == {'onnxruntime-gpu'}) else \
f'onnxruntime packages {sorted(have)}, CUDA provider {cuda}: expected {sorted(want)} only')" \
    && groupadd --system --gid 10001 onestep \
    && useradd --no-log-init --system --create-home --uid 10001 --gid onestep onestep

COPY ${MODEL_REPOSITORY} /models

USER 10001:10001
WORKDIR /home/onestep
EXPOSE 8080

# health: /readyz (Triton and models ready; 503 while draining) with the key from ONESTEP_API_KEY_FILE or
# ONESTEP_API_KEY. If Triton dies the process exits non-zero, so the restart policy (or an orchestrator's
# /healthz liveness probe) brings the service back.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; f = os.environ.get('ONESTEP_API_KEY_FILE'); key = open(f).read().strip() if f else os.environ.get('ONESTEP_API_KEY', ''); u.urlopen(u.Request('http://127.0.0.1:8080/readyz', headers={'X-API-Key': key}), timeout=4)"]
STOPSIGNAL SIGTERM

# The API binds 0.0.0.0 in the container, so it refuses to start without an API key: set ONESTEP_API_KEY (or
# mount a file and set ONESTEP_API_KEY_FILE), or pass --insecure after the image name. Extra `onestep serve`
# flags go after the image name, e.g. `docker run ... onestep-serve:0.1.0 --max-images 16`. SIGTERM (docker
# stop): /readyz turns 503, requests in flight finish, then Triton stops.
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "onestep", "serve", "--repo", "/models", "--host", "0.0.0.0", "--port", "8080"]
CMD []
