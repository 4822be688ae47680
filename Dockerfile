# syntax=docker/dockerfile:1
#
# The Caravan image: caravan-coordinator, caravan-worker, caravanctl and caravan-generate, with
# libtorch from the torch 2.11.0 wheel (the version tch 0.24 binds). One image serves every
# role; the Helm chart in deploy/caravan picks the binary.
#
#   docker build -t caravan:dev .                                   # CPU
#   docker build --build-arg VARIANT=cuda -t caravan:dev-cuda .     # GPU (CUDA 13, NCCL)
#
# VARIANT=cpu takes torch's CPU-only wheel from https://download.pytorch.org/whl/cpu.
# TORCH_INDEX_URL, when set, replaces the variant's package index (e.g. a PyPI-only mirror:
# --build-arg TORCH_INDEX_URL=https://pypi.org/simple). PyPI has no CPU-only torch wheel, so a
# VARIANT=cpu image built that way carries the CUDA wheel and its nvidia-* libraries too
# (about 4.6 GB installed).
# VARIANT=cuda takes PyPI's default torch wheel, built for CUDA 13, which brings the CUDA runtime
# libraries and NCCL as nvidia-* wheels (about 5 GB installed), and builds the worker with the `cuda`
# feature (NCCL communicator, libtorch_cuda linked). The host needs only the NVIDIA driver; the
# NVIDIA container toolkit (e.g. through the GPU Operator) mounts it into the container.

ARG VARIANT=cpu
ARG TORCH_VERSION=2.11.0

# --- build ---------------------------------------------------------------------------------------
FROM rust:1-bookworm AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG VARIANT
ARG TORCH_VERSION
# Package index for torch; empty means the variant's own (see the top of this file).
ARG TORCH_INDEX_URL=""
# Parallel rustc jobs; empty means one per CPU (.cargo/config.toml's `jobs = 2` suits the
# project's small development machines, not an image build).
ARG BUILD_JOBS=""

# protoc compiles proto/ (the gRPC contract) and etcd-client's protos; libprotobuf-dev holds the
# well-known types they import (google/protobuf/*.proto), only a Recommends of protobuf-compiler.
# python3-venv holds the torch wheel, i.e. libtorch.
# Debian stable's versions are not pinned: they only change for security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      protobuf-compiler libprotobuf-dev python3-venv \
 && rm -rf /var/lib/apt/lists/*

# libtorch from the torch wheel, as scripts/setup.sh does: a virtualenv, and a stable link
# /opt/venv/libtorch to the wheel's torch/ folder (its include/ and lib/ are what tch builds
# against). The runtime stage copies the same folder to the same path.
RUN set -eux; \
    case "$VARIANT" in \
      cpu)  index_url="https://download.pytorch.org/whl/cpu" ;; \
      cuda) index_url="" ;; \
      *)    echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 1 ;; \
    esac; \
    index_url="${TORCH_INDEX_URL:-$index_url}"; \
    python3 -m venv /opt/venv; \
    /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
      ${index_url:+--index-url "$index_url"} "torch==${TORCH_VERSION}"; \
    torch_dir="$(/opt/venv/bin/python -c 'import os, torch; print(os.path.dirname(torch.__file__))')"; \
    ln -s "$torch_dir" /opt/venv/libtorch; \
    test -f /opt/venv/libtorch/lib/libtorch_cpu.so
# Overrides .cargo/config.toml's LIBTORCH (.venv/libtorch, relative to a development checkout);
# tch bakes $LIBTORCH/lib into the binaries as their rpath, valid in the runtime stage too.
ENV LIBTORCH=/opt/venv/libtorch \
    LIBTORCH_CXX11_ABI=1

WORKDIR /src
COPY . .
# The cargo registry and target/ live in cache mounts (kept between builds by BuildKit), so the
# binaries are copied out within the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    set -eux; \
    features=""; \
    if [ "$VARIANT" = cuda ]; then features="caravan-worker/cuda"; fi; \
    cargo build --release --locked --bins -j "${BUILD_JOBS:-$(nproc)}" ${features:+--features "$features"}; \
    mkdir -p /out; \
    for bin in caravan-coordinator caravan-worker caravan-generate caravanctl; do \
      cp "target/release/$bin" /out/; \
    done

# --- runtime -------------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG VARIANT

# python3 makes the copied virtualenv usable for inspection (e.g. torch.cuda.is_available());
# tini runs as PID 1, forwarding signals to the Caravan process and reaping children.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 tini \
 && rm -rf /var/lib/apt/lists/*

# The same wheel at the same path as in the build stage, so the binaries' rpath resolves.
COPY --from=build /opt/venv /opt/venv
# NCCL from the nvidia-nccl wheel (VARIANT=cuda): cudarc loads it at run time by names such as
# libnccl.so, while the wheel ships only libnccl.so.2; /opt/venv/nccl offers both names.
RUN set -eux; \
    mkdir -p /opt/venv/nccl; \
    nccl="$(find /opt/venv/lib -path '*/nvidia/nccl/lib/libnccl.so.2' -print -quit)"; \
    if [ -n "$nccl" ]; then \
      ln -s "$nccl" /opt/venv/nccl/libnccl.so.2; \
      ln -s "$nccl" /opt/venv/nccl/libnccl.so; \
    elif [ "$VARIANT" = cuda ]; then \
      echo "no libnccl.so.2 in the CUDA torch wheel's dependencies" >&2; exit 1; \
    fi
# The rpath baked into the binaries already points at /opt/venv/libtorch/lib; the loader path
# below also covers tools that lack it and the dlopen of NCCL.
ENV PATH=/opt/venv/bin:$PATH \
    LD_LIBRARY_PATH=/opt/venv/libtorch/lib:/opt/venv/nccl \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HOME=/tmp

COPY --from=build /out/ /usr/local/bin/
# Every binary starts (libtorch and all its libraries resolve) before the image is accepted;
# only libcuda, the driver the container toolkit mounts at run time, may be missing here.
RUN set -eux; \
    for bin in caravan-coordinator caravan-worker caravan-generate caravanctl; do \
      if ldd "/usr/local/bin/$bin" | grep 'not found' | grep -v 'libcuda\.so'; then exit 1; fi; \
      "$bin" --help >/dev/null; \
    done

RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin caravan
USER 10001:10001
WORKDIR /tmp

# HTTP API, coordinator registration gRPC, worker gRPC, worker TCP ring.
EXPOSE 8000 50051 50052 50053
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["caravan-coordinator", "--help"]
