#!/usr/bin/env python3
"""Which 16-bit dtype Caravan should compute a float16 checkpoint in on CPUs (`--dtype auto`):
float16 and bfloat16 (and float32 for reference) measured with `caravan-generate` (the forward
pass alone, no server) in interleaved rounds of one run per dtype, so that whatever the machine
does meanwhile lands on every dtype alike. Medians of the rounds.

Model: SmolLM2-135M-Instruct (scripts/setup.sh), TP 1, all threads; a 32-token prompt then 64
generated tokens (decode), and a 256-token prompt (prefill).

Usage: bench/dtype_bench.py [--rounds 5] [--threads N] [--bin-dir target/release]
Prints a Markdown table for docs/BENCHMARKS.md.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_bench import REPO, log, prompts  # noqa: E402

MODEL_DIR = REPO / "models" / "smollm2-135m-instruct"
DTYPES = ("f16", "bf16", "f32")


def generate(binary, dtype, threads, prompt, new_tokens):
    """(prefill tok/s, decode tok/s) of one run."""
    out = subprocess.run([binary, "--model", MODEL_DIR, "--tp", "1", "--threads", str(threads), "--dtype", dtype,
                          "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(new_tokens)],
                         cwd=REPO, check=True, capture_output=True, text=True).stdout
    # "prefill: N tokens in X ms (Y tok/s); decode: N tokens in X ms (Y tok/s)"
    line = next(l for l in out.splitlines() if l.startswith("prefill:"))
    return [float(part.split("(")[1].split(" tok/s")[0]) for part in line.split(";")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--bin-dir", type=Path, default=REPO / "target" / "release")
    args = ap.parse_args()
    if not (MODEL_DIR / "config.json").is_file():
        sys.exit(f"{MODEL_DIR} is missing: run scripts/setup.sh first")
    binary = args.bin_dir / "caravan-generate"
    if not binary.is_file():
        log("building release binaries")
        subprocess.run(["cargo", "build", "--quiet", "--release", "--bins"], cwd=REPO, check=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    decode = {d: [] for d in DTYPES}
    prefill = {d: [] for d in DTYPES}
    for r in range(args.rounds):
        log(f"round {r + 1} of {args.rounds}")
        for dtype in DTYPES:
            decode[dtype].append(generate(binary, dtype, args.threads, prompts(1, 32, seed=40 + r)[0], 64)[1])
            prefill[dtype].append(generate(binary, dtype, args.threads, prompts(1, 256, seed=50 + r)[0], 1)[0])
    med = {d: (statistics.median(decode[d]), statistics.median(prefill[d])) for d in DTYPES}
    where = args.bin_dir.relative_to(REPO) if args.bin_dir.is_relative_to(REPO) else args.bin_dir
    lines = [f"SmolLM2-135M-Instruct, TP 1, {args.threads} threads, `caravan-generate` from `{where}`, "
             f"{args.rounds} interleaved rounds, commit {commit}, {time.strftime('%Y-%m-%d')}. "
             "Command: `.venv/bin/python bench/dtype_bench.py`.", "",
             "| dtype | decode tok/s (median) | runs | prefill 256 tok/s (median) |", "|---|---|---|---|"]
    for d in DTYPES:
        lines.append(f"| {d} | {med[d][0]:.1f} | {', '.join(f'{v:.1f}' for v in decode[d])} | {med[d][1]:.0f} |")
    lines += ["", f"bf16 / f16: decode {med['bf16'][0] / med['f16'][0]:.2f}x, "
                  f"prefill {med['bf16'][1] / med['f16'][1]:.2f}x."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
