#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set-up, formatting and lint gates, unit tests and the
# end-to-end tests (real coordinator and worker processes, gRPC, the TCP ring, the openai client;
# golden outputs from transformers).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
echo "[test] generating fixtures with transformers" >&2
.venv/bin/python python/make_fixtures.py --out fixtures
echo "[test] cargo fmt --check" >&2
cargo fmt --all -- --check
echo "[test] cargo clippy -D warnings" >&2
cargo clippy --workspace --all-targets -- -D warnings
# The GPU path (NCCL, libtorch_cuda) must keep compiling on machines without a GPU.
cargo clippy -p caravan-worker --features cuda --all-targets -- -D warnings
echo "[test] cargo test" >&2
cargo test --workspace "$@"
echo "[test] Helm chart: lint, render, validate offline against Kubernetes schemas" >&2
bash scripts/check_chart.sh
echo "[test] Python: the tokenizer build, the HTTP API through the openai client, batching, etcd, failures" >&2
cargo build --workspace --bins
CARAVAN_TOKENIZER_DIR="$root/models/llama2-tokenizer" \
  .venv/bin/python -m pytest -q python/test_tokenizer.py tests/python
echo "[test] the device check on this CPU (scripts/gpu_check.sh --device cpu --size small)" >&2
CARAVAN_BIN_DIR="$root/target/debug" bash scripts/gpu_check.sh "$root/target/gpu-check" --device cpu --size small
