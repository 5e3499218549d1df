# The fat-mlflow image: the package, its `fat-mlflow` CLI and MLflow on Python 3.11.
#
#   docker build -t fat-mlflow .                                   # CPU torch
#   docker build -t fat-mlflow --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# kubernetes/MLproject names this image as its docker_env: `mlflow run ./kubernetes
# --backend kubernetes --build-image ...` adds that folder on top of it, pushes the result to
# the repository-uri of kubernetes/kubernetes_config.json and runs it as a Job
# (docs/kubernetes.md).
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# torch first, from the wheel index the build asks for: the CPU wheels by default, a CUDA
# index (pytorch.org lists them) for GPU nodes; the CUDA wheels bring their own CUDA
# libraries, so the nodes need only the NVIDIA driver and device plugin.
# The lock pins torch==X without a local label, so the CPU or CUDA build of that version fits.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /opt/fat-mlflow
COPY constraints.txt ./
RUN pip install --index-url "${TORCH_INDEX_URL}" "$(grep '^torch==' constraints.txt)"

# The other dependencies from pyproject.toml alone, at the lock's versions, so that a code
# change reuses this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY README.md ./
COPY fat_mlflow ./fat_mlflow
COPY kubernetes/run-entry-point /usr/local/bin/run-entry-point
RUN pip install --no-deps . \
    && chmod 755 /usr/local/bin/run-entry-point \
    && fat-mlflow --version

CMD ["fat-mlflow", "--help"]
