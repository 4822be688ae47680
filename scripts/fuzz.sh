#!/usr/bin/env bash
# Runs each `cargo fuzz` target for a bounded time and stops at the first crash.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET (default 60)] [TARGET ...]
#
# Targets: request, chat_template, detokenize, step_plan (fuzz/fuzz_targets). Needs a nightly
# toolchain and cargo-fuzz, which this installs. A crash leaves its input in
# fuzz/artifacts/<target>/; once fixed, copy it into fuzz/regressions/<target>/ so the stable
# test suite replays it for good. What the fuzzer learns stays in fuzz/corpus/ (not committed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
seconds=60
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then
  seconds="$1"
  shift
fi
[ "$seconds" -gt 0 ] || { echo "SECONDS_PER_TARGET must be positive" >&2; exit 2; }
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(request chat_template detokenize step_plan)

bash scripts/setup.sh
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# (setup.sh also builds models/llama2-tokenizer, which the detokenize target reads.)
export LD_LIBRARY_PATH="$root/.venv/libtorch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

cd fuzz
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target"
  echo "[fuzz] $target for ${seconds}s" >&2
  # No sanitizer: the code is safe Rust, so what we hunt is panics (debug assertions and
  # overflow checks are on) and broken invariants; it also keeps libtorch out of ASan's way.
  log="corpus/$target.log"
  extra=()
  [ -f "$target.dict" ] && extra=(-dict="$target.dict")
  # Detokenization decodes a window per token: short streams keep it at thousands of runs/s.
  max_len=4096
  [ "$target" = detokenize ] && max_len=256
  status=0
  cargo +nightly fuzz run --sanitizer none "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$seconds" -max_len="$max_len" -print_final_stats=1 ${extra[@]+"${extra[@]}"} >"$log" 2>&1 || status=$?
  # libFuzzer's chatter stays in the log; these lines say what ran and what it found.
  grep -E '^(stat::number_of_executed_units|stat::new_units_added)|panicked|Failing input|Test unit written|SUMMARY' "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 40 "$log" >&2
    echo "[fuzz] $target crashed: the input is in fuzz/artifacts/$target/ (log: fuzz/$log)" >&2
    exit 1
  fi
done
echo "[fuzz] no crash in ${#targets[@]} targets (${seconds}s each)" >&2
