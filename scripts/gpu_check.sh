#!/usr/bin/env bash
# The whole device check in one command: Caravan's binaries against transformers on the same
# device (golden logits, the OpenAI API served by a coordinator and a worker, decode speed against
# transformers and the bandwidth bound), one summary table printed and written to
# OUTDIR/gpu_check.md. Exit status 1 when a check fails.
#
#   scripts/gpu_check.sh OUTDIR [--device cuda|cpu] [--size 7b|small]
#
# On a GPU machine (PyTorch 2.11 with CUDA; no Rust toolchain, no network): release binaries
# built elsewhere with `cargo build --release --features cuda` and stripped, in CARAVAN_BIN_DIR
# (default target/release), and the Llama 2 tokenizer folder in CARAVAN_TOKENIZER_DIR (default
# models/llama2-tokenizer). Python: CARAVAN_PYTHON, else .venv/bin/python, else python3; it needs
# torch, transformers, safetensors and openai. CI runs it with `--device cpu --size small`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ $# -ge 1 ] || { sed -n '2,13p' "$0" >&2; exit 2; }
out="$1"; shift
bin_dir="${CARAVAN_BIN_DIR:-$root/target/release}"
tokenizer="${CARAVAN_TOKENIZER_DIR:-$root/models/llama2-tokenizer}"
python="${CARAVAN_PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
for b in caravan-generate caravan-coordinator caravan-worker; do
  [ -x "$bin_dir/$b" ] || { echo "gpu_check: $bin_dir/$b missing (set CARAVAN_BIN_DIR)" >&2; exit 2; }
done
[ -f "$tokenizer/tokenizer.json" ] || { echo "gpu_check: no tokenizer.json in $tokenizer" >&2; exit 2; }
# The binaries find libtorch through an rpath into the venv they were built against; on another
# machine, through this Python's torch.
torch_lib="$("$python" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
exec "$python" "$root/python/gpu_check.py" "$out" --bin-dir "$bin_dir" --tokenizer "$tokenizer" "$@"
