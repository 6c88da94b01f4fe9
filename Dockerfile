# embedpipe container images, one Python environment, two targets:
#
#   worker (the default: the last stage)  the Dataflow SDK container for GPU workers
#       (--sdk_container_image). Entry point: Beam's boot, which starts the SDK harness.
#   driver                                 runs `embedpipe nightly` as a Cloud Run job: it submits
#       the Dataflow job, waits for it, builds and validates the index and publishes LATEST.
#
#   docker build --target worker --build-arg BAKE_IMAGENET_WEIGHTS=1 -t REGION-docker.pkg.dev/P/REPO/embedpipe:TAG .
#   docker build --target driver --build-arg BAKE_IMAGENET_WEIGHTS=1 -t REGION-docker.pkg.dev/P/REPO/embedpipe-driver:TAG .
#   (or: gcloud builds submit --config infra/cloudbuild.yaml --substitutions=... ; see infra/README.md)
#
# Both targets share every layer below `driver`, so the second push costs almost nothing and the
# process that builds the pipeline graph has exactly the packages the workers run.
#
# Why not a Flex Template launcher image: a Flex Template's launcher must exit as soon as the
# graph is built (no wait_until_finish, 10-minute limit), but `embedpipe nightly` must wait for
# the Dataflow job before it may build the index, validate and publish. docs/DATAFLOW.md explains.
#
# Versions: the Beam tag below must equal apache-beam in requirements.txt and the Python minor
# must be the same in both FROM lines and allowed by setup.py; tests/test_infra.py checks it.
#
# Batch containers have no service to probe: Dataflow and Cloud Run watch the process itself.
#checkov:skip=CKV_DOCKER_2:batch job containers (Dataflow SDK harness, Cloud Run job) expose no endpoint to probe; the platform restarts or fails the process itself

# Beam's boot binary (and nothing else) comes from the SDK image of the same Beam release.
FROM apache/beam_python3.11_sdk:2.77.0 AS beam_sdk

FROM python:3.11.14-slim-bookworm AS runtime

# pipefail: any failing command of a pipe fails the build, not only the last one.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT: Beam's boot would otherwise create a fresh virtualenv
# per worker at start-up; everything is installed globally here and nothing is staged.
# KERAS_HOME: where `--weights imagenet` looks for resnet50_..._notop.h5 (see BAKE_IMAGENET_WEIGHTS);
# Keras ignores it (and downloads into /tmp) when the running user cannot write there.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT=1 \
    KERAS_HOME=/opt/keras

# The user the driver runs as (workers stay root: see the worker stage).
RUN groupadd --system --gid 10001 embedpipe \
    && useradd --system --uid 10001 --gid embedpipe --create-home --home-dir /home/embedpipe embedpipe \
    && mkdir -p /opt/keras/models \
    && chown -R embedpipe:embedpipe /opt/keras

WORKDIR /opt/embedpipe

# CUDA and cuDNN come as pip wheels (what `tensorflow[and-cuda]` installs), pinned in
# infra/requirements-gpu.txt to CUDA 12.5.1 / cuDNN 9.3, the versions TensorFlow 2.21.0 is built
# against. That keeps the base a plain Debian Python image (Python pinned by its tag, no
# deadsnakes or source build on top of nvidia/cuda) and the CUDA version in one reviewed file.
# The NVIDIA driver is not in the image: Dataflow installs it on the VM (install-nvidia-driver)
# and mounts it into the container. nvImageCodec and nvJPEG (infra/requirements-gpu-decode.txt) decode
# JPEGs on the GPU (--decode auto picks them where a GPU is visible). Dependencies first: this layer
# survives code changes.
COPY requirements.txt infra/requirements-gpu.txt infra/requirements-gpu-decode.txt ./
RUN pip install --no-cache-dir -r requirements.txt -r requirements-gpu.txt -r requirements-gpu-decode.txt

COPY setup.py ./
COPY pipeline ./pipeline
# --no-deps: the pinned set above is the whole environment; pip check proves it is consistent.
RUN pip install --no-cache-dir --no-deps . \
    && pip check \
    && embedpipe --version

# Bake the ImageNet weights in so that no worker downloads them (thousands of VMs fetching the same
# 94 MB file at start-up, from a host that may be unreachable without public IPs). Keras itself
# downloads and md5-checks the file; the second check guards against a changed Keras default.
ARG BAKE_IMAGENET_WEIGHTS=0
RUN if [ "$BAKE_IMAGENET_WEIGHTS" = "1" ]; then \
        python -c "import keras; keras.applications.ResNet50(include_top=False, weights='imagenet', pooling='avg')" \
        && echo "4d473c1dd8becc155b73f8504c6f6626  /opt/keras/models/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" \
           | md5sum -c - \
        && chown -R embedpipe:embedpipe /opt/keras; \
    fi


FROM runtime AS driver
# Numeric, so that a runtime enforcing runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
ENTRYPOINT ["embedpipe"]
CMD ["--help"]


FROM runtime AS worker
COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam
# No USER here on purpose: Dataflow mounts its host directories (/var/opt/google: logs, staged
# artifacts, the semi-persistent dir) owned by root and expects the SDK harness to write them,
# so a worker container runs as root. It holds no credentials of its own (the VM's service
# account) and runs only this image's code. The driver target runs as `embedpipe`.
ENTRYPOINT ["/opt/apache/beam/boot"]
