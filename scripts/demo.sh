#!/usr/bin/env bash
# The main job: generate a small Llama-2-shaped checkpoint, then greedy-generate from it with the
# model sharded over two local worker processes joined by the TCP ring.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
.venv/bin/python python/make_checkpoint.py --preset tiny --out models/tiny-llama2
echo "[demo] building" >&2
cargo build --quiet --bin caravan-generate
# "Hello world" in the Llama 2 tokenizer, BOS first.
exec target/debug/caravan-generate --model models/tiny-llama2 --tp 2 \
  --prompt-ids 1,15043,3186 --max-new-tokens 32 "$@"
