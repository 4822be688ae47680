#!/usr/bin/env python3
"""Caravan's 8-bit and 4-bit weights (`--quantization int8|q4`) against its bf16 and llama.cpp's
Q8_0, Q4_0 and F16, measured in one run on the same machine and thread count (issue 24's goals).

Checkpoint: bench-150m (as bench/perf_bench.py, whose measurements this reuses), release binaries.

Measured:
  interleaved      single-stream engine decode (`caravan-generate`, no server) of Caravan bf16,
                   int8 and q4 and llama.cpp f16, q8_0 and q4_0 (llama-bench tg), in rounds of one
                   run per system; medians. The decode goals compare these.
  engine prefill   a 512-token prompt through `caravan-generate`, medians of three runs; llama.cpp:
                   llama-bench pp512.
  served           through the HTTP API (TP 1): single-stream decode, prefill 512 and the aggregate
                   of 32 concurrent streams, bf16 and int8.
Activations are bf16 in Caravan's rows (`--dtype bf16`); int8 and q4 quantize them per row to 8
bits for each product. llama.cpp's Q4_0 is made by llama-quantize from its F16 GGUF (its output
matrix in Q6_K, as llama.cpp does by default; Caravan's q4 keeps its LM head in int8).

Usage: bench/quant_bench.py [--threads 2] [--write-docs]
With --write-docs the table replaces the section between the quant_bench markers in
docs/BENCHMARKS.md. llama.cpp is built by bench/llama_cpp_peer.py (needs cmake); the machine should
be otherwise idle.
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp_peer  # noqa: E402
from perf_bench import (PREFILL_TOKENS, caravan, caravan_engine, fmt, interleaved_decode,  # noqa: E402
                        llama_cpp_peers, log, prepare, ratio, write_docs_section)

BEGIN, END = "<!-- quant_bench:begin -->", "<!-- quant_bench:end -->"
SYSTEMS = {"bf16": None, "int8": "int8", "q4": "q4"}  # row name: --quantization


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--write-docs", action="store_true", help="update docs/BENCHMARKS.md")
    args = ap.parse_args()
    model_dir, commit = prepare()
    ok, why = llama_cpp_peer.available()
    if not ok:
        sys.exit(f"llama.cpp cannot run here ({why}): this benchmark compares against it")
    makers = {t: (lambda t=t: llama_cpp_peer.convert(model_dir, t)) for t in ("f16", "q8_0")}
    makers["q4_0"] = lambda: llama_cpp_peer.quantize(model_dir, "q4_0")
    llama, ggufs = llama_cpp_peers(makers, args.threads)
    engine, served = {}, {}
    for name, quantization in SYSTEMS.items():
        log(f"caravan {name}: engine")
        engine[name] = caravan_engine(model_dir, 1, "bf16", args.threads, quantization)
        log(f"caravan {name}: served")
        served[name] = caravan(model_dir, 1, "bf16", args.threads, quantization)
    interleaved = interleaved_decode(model_dir, args.threads, ggufs,
                                     caravans=[(1, "bf16", q) for q in SYSTEMS.values()])
    med = {name: r["median"] for name, r in interleaved.items()}

    lines = [f"bench-150m, {args.threads} threads for every system, commit {commit}, {time.strftime('%Y-%m-%d')}. "
             "Command: `.venv/bin/python bench/quant_bench.py --write-docs`.", "",
             "| system | weights | engine decode tok/s (interleaved median) | engine prefill 512 tok/s "
             "| served decode tok/s | served prefill 512 tok/s | served 32 streams tok/s |",
             "|---|---|---|---|---|---|---|"]
    for name in SYSTEMS:
        e, s = engine[name], served[name]
        lines.append(f"| Caravan TP 1 | {name} | {fmt(med[f'caravan TP 1 {name}'])} | {fmt(e['prefill'], 0)} "
                     f"| {fmt(s['decode'])} | {fmt(s['prefill'], 0)} | {fmt(s['streams_32'])} |")
    for outtype, r in llama.items():
        lines.append(f"| llama.cpp | {outtype} | {fmt(med[f'llama.cpp {outtype}'])} | {llama_cpp_peer.prefill_cell(r)} "
                     "| - | - | - |")
    lines += ["", "Interleaved decode runs (tok/s): " + "; ".join(
        f"{name}: {', '.join(f'{v:.1f}' for v in r['runs'])}" for name, r in interleaved.items())]
    goals = [
        ("single-stream decode: int8 >= 1.1x llama.cpp Q8_0 (engine, interleaved)",
         ratio(med["caravan TP 1 int8"], med["llama.cpp q8_0"])),
        ("prefill 512: int8 >= llama.cpp Q8_0's pp512 (engine)",
         ratio(engine["int8"]["prefill"], llama["q8_0"]["prefill"])),
        ("32 streams: int8 >= 1.5x bf16 (served)", ratio(served["int8"]["streams_32"], served["bf16"]["streams_32"])),
        ("int8 decode against Caravan bf16 (engine, interleaved)",
         ratio(med["caravan TP 1 int8"], med["caravan TP 1 bf16"])),
        ("single-stream decode: q4 >= 1.1x llama.cpp Q4_0 (engine, interleaved)",
         ratio(med["caravan TP 1 q4"], med["llama.cpp q4_0"])),
        ("q4 decode against Caravan bf16 (engine, interleaved)",
         ratio(med["caravan TP 1 q4"], med["caravan TP 1 bf16"])),
        ("prefill 512: q4 against llama.cpp Q4_0's pp512 (engine)",
         ratio(engine["q4"]["prefill"], llama["q4_0"]["prefill"])),
    ]
    lines += ["", "| goal (issue 24) | measured |", "|---|---|"] + [f"| {g} | {m} |" for g, m in goals]
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        write_docs_section(table, BEGIN, END, "8-bit and 4-bit weights against llama.cpp Q8_0 and Q4_0 (issue 24)")


if __name__ == "__main__":
    main()
