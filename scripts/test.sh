#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set-up, formatting and lint gates, unit tests and the
# end-to-end tests (real worker processes over the TCP ring, golden outputs from transformers).
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
