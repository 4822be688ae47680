#!/usr/bin/env bash
# The main job: generate a small Llama-2-shaped checkpoint (random weights, the real Llama 2
# tokenizer), start a coordinator with two local worker processes sharding it by tensor
# parallelism, and stream one chat completion through the OpenAI-compatible API.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
.venv/bin/python python/make_checkpoint.py --preset tiny --out models/tiny-llama2 \
  --tokenizer models/llama2-tokenizer
echo "[demo] building" >&2
cargo build --quiet --bins

log="$(mktemp -t caravan-demo.XXXXXX)"
target/debug/caravan-coordinator --model models/tiny-llama2 --tp 2 --local-workers \
  --host 127.0.0.1 --port 0 "$@" >"$log" &
coordinator=$!
trap 'kill $coordinator 2>/dev/null; wait $coordinator 2>/dev/null; rm -f "$log"' EXIT

echo "[demo] starting a coordinator and 2 workers" >&2
url=""
for _ in $(seq 600); do
  url="$(sed -n 's/^ready: serving .* on \(http:[^ ]*\)$/\1/p' "$log")"
  [ -n "$url" ] && break
  kill -0 $coordinator 2>/dev/null || { echo "[demo] the coordinator exited" >&2; exit 1; }
  sleep 0.2
done
[ -n "$url" ] || { echo "[demo] the coordinator was not ready within 120 s" >&2; exit 1; }
echo "[demo] serving on $url" >&2
.venv/bin/python python/stream_chat.py --url "$url"
