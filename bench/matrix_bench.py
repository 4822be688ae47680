#!/usr/bin/env python3
"""Caravan's CPU loops (issue 34): its AVX2 loops against the widest ones this CPU has
(`--cpu-kernels avx2` against `on`), with transformers and llama.cpp measured in the same run.

Checkpoint: bench-150m (as bench/perf_bench.py), release build, the same thread count for every
system. For f32 and bf16, with each setting of Caravan's kernels:
  engine prefill 512   `caravan-generate` at TP 1: 512 / time to the first token, median of three
  engine decode        single-stream decode after a 32-token prompt, interleaved: rounds of one run
                       per system (Caravan's two settings and llama.cpp), medians
  8 / 32 streams       served through the HTTP API at TP 1, aggregate output tok/s
Peers: transformers (one forward of 512 tokens; `generate` at batch 8 and 32) and llama.cpp
(llama-bench pp512 and tg128, f32 and f16), as perf_bench measures them. A peer that cannot run
here is skipped with a message; nothing is estimated in its place.

The CPU's model name and its vector and matrix flags are recorded beside the figures, with the
kernel path each Caravan setting reports (`caravan-generate`'s "cpu kernels:" line).

Usage: .venv/bin/python bench/matrix_bench.py [--threads 2] [--skip-llama-cpp] [--write-docs]
With --write-docs the tables replace the section between the matrix_bench markers in
docs/BENCHMARKS.md. The machine should be otherwise idle.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp_peer  # noqa: E402
from perf_bench import (DECODE_TOKENS, PREFILL_TOKENS, SHORT_PROMPT, caravan,  # noqa: E402
                        caravan_engine_run, fmt, interleave, llama_cpp_decoders, llama_cpp_peers,
                        prepare, ratio, transformers_peer, write_docs_section)
from serving_bench import REPO, log, prompts  # noqa: E402

SETTINGS = ("avx2", "on")
DTYPES = ("f32", "bf16")
ROUNDS = 5
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "avx512_vnni",
         "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
BEGIN, END = "<!-- matrix_bench:begin -->", "<!-- matrix_bench:end -->"


def cpu_description() -> str:
    """The CPU's model name and which of FLAGS it reports."""
    info = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), "unknown")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines()
                      if line.startswith("flags")), []))
    have = [f for f in FLAGS if f in flags]
    return f"{model}; flags: {' '.join(have) or 'none of ' + ' '.join(FLAGS)}"


def with_kernels(setting: str, run):
    """`run()` with CARAVAN_CPU_KERNELS=`setting` for the processes it starts."""
    before = os.environ.get("CARAVAN_CPU_KERNELS")
    os.environ["CARAVAN_CPU_KERNELS"] = setting
    try:
        return run()
    finally:
        if before is None:
            del os.environ["CARAVAN_CPU_KERNELS"]
        else:
            os.environ["CARAVAN_CPU_KERNELS"] = before


def kernel_path(model_dir: Path, setting: str, dtype: str) -> str:
    """What `caravan-generate` says it computes on with `setting`."""
    binary = Path(os.environ["CARAVAN_BIN_DIR"]) / "caravan-generate"
    out = subprocess.run([binary, "--model", model_dir, "--dtype", dtype, "--cpu-kernels", setting,
                          "--prompt-ids", "1,500", "--max-new-tokens", "1"],
                         cwd=REPO, check=True, capture_output=True, text=True).stdout
    return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                if line.startswith("cpu kernels:"))


def engine_prefill(model_dir: Path, dtype: str, threads: int) -> float:
    """Median prefill tok/s of three 512-token `caravan-generate` runs at TP 1."""
    return statistics.median(
        caravan_engine_run(model_dir, 1, dtype, threads, prompts(1, PREFILL_TOKENS, seed=20 + rep)[0], 1)[0]
        for rep in range(3))


def interleaved_decode(model_dir: Path, threads: int, ggufs: dict) -> dict:
    """Single-stream engine decode tok/s of Caravan with each setting and dtype, and of llama.cpp,
    in rounds of one run per system; medians and runs per system."""
    systems = {}
    for dtype in DTYPES:
        for setting in SETTINGS:
            systems[f"caravan {dtype} {setting}"] = lambda r, d=dtype, s=setting: with_kernels(
                s, lambda: caravan_engine_run(model_dir, 1, d, threads,
                                              prompts(1, SHORT_PROMPT, seed=30 + r)[0], DECODE_TOKENS)[1])
    return interleave({**systems, **llama_cpp_decoders(ggufs, threads)}, ROUNDS)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--write-docs", action="store_true", help="update docs/BENCHMARKS.md")
    args = ap.parse_args()
    model_dir, commit = prepare()
    cpu = cpu_description()
    log(cpu)

    ggufs = {} if args.skip_llama_cpp else {t: (lambda t=t: llama_cpp_peer.convert(model_dir, t))
                                             for t in ("f32", "f16")}
    llama, ggufs = llama_cpp_peers(ggufs, args.threads)

    ours = {}
    for dtype in DTYPES:
        for setting in SETTINGS:
            log(f"caravan {dtype}, --cpu-kernels {setting}")
            path = kernel_path(model_dir, setting, dtype)
            prefill = with_kernels(setting, lambda: engine_prefill(model_dir, dtype, args.threads))
            served = with_kernels(setting, lambda: caravan(model_dir, 1, dtype, args.threads))
            ours[(dtype, setting)] = {"path": path, "prefill": prefill, **served}
    decode = interleaved_decode(model_dir, args.threads, ggufs)
    hf = {}
    for dtype in DTYPES:
        log(f"transformers {dtype}")
        hf[dtype] = transformers_peer(model_dir, dtype, args.threads)

    lines = [f"bench-150m, {args.threads} threads for every system, commit {commit}, "
             f"{time.strftime('%Y-%m-%d')}. Command: `.venv/bin/python bench/matrix_bench.py --write-docs`.",
             "", f"CPU: {cpu}.", "",
             "Caravan at TP 1; engine figures from `caravan-generate`, streams through the HTTP API. "
             f"Decode: single stream, interleaved, medians of {ROUNDS} rounds.", "",
             "| system | dtype | kernel path | engine prefill 512 tok/s | engine decode tok/s "
             "| 8 streams tok/s | 32 streams tok/s |", "|---|---|---|---|---|---|---|"]
    for (dtype, setting), r in ours.items():
        d = decode[f"caravan {dtype} {setting}"]["median"]
        lines.append(f"| Caravan `--cpu-kernels {setting}` | {dtype} | {r['path']} | {fmt(r['prefill'], 0)} "
                     f"| {fmt(d)} | {fmt(r['streams_8'])} | {fmt(r['streams_32'])} |")
    for dtype, r in hf.items():
        lines.append(f"| transformers | {dtype} | libtorch | {fmt(r['prefill'], 0)} | {fmt(r['decode'])} "
                     f"| {fmt(r['streams_8'])} | {fmt(r['streams_32'])} |")
    for outtype, r in llama.items():
        d = decode.get(f"llama.cpp {outtype}", {}).get("median")
        lines.append(f"| llama.cpp | {outtype} | ggml | {llama_cpp_peer.prefill_cell(r)} | {fmt(d)} | - | - |")
    if not llama:
        lines.append("| llama.cpp | - | skipped: see the command's output | | | | |")
    lines += ["", "| decode runs | tok/s |", "|---|---|"]
    for name, r in decode.items():
        lines.append(f"| {name} | {', '.join(f'{v:.1f}' for v in r['runs'])} |")

    b, a = ours[("bf16", "on")], ours[("bf16", "avx2")]
    f, fa = ours[("f32", "on")], ours[("f32", "avx2")]
    med = lambda name: decode.get(name, {}).get("median")  # noqa: E731
    goals = [
        ("engine prefill 512, bf16 >= transformers bf16", ratio(b["prefill"], hf["bf16"]["prefill"])),
        ("engine prefill 512, bf16 >= 2x llama.cpp f16", ratio(b["prefill"], llama.get("f16", {}).get("prefill"))),
        ("32 streams served, bf16 >= 1.2x transformers bf16", ratio(b["streams_32"], hf["bf16"]["streams_32"])),
        ("8 streams served, bf16 >= 1.5x transformers bf16", ratio(b["streams_8"], hf["bf16"]["streams_8"])),
        ("single-stream decode unchanged (on / avx2; bf16, f32)",
         f"{ratio(med('caravan bf16 on'), med('caravan bf16 avx2'))}, "
         f"{ratio(med('caravan f32 on'), med('caravan f32 avx2'))}"),
        ("what the wider loops give (on / avx2): prefill bf16, f32; 32 streams bf16, f32",
         f"{ratio(b['prefill'], a['prefill'])}, {ratio(f['prefill'], fa['prefill'])}; "
         f"{ratio(b['streams_32'], a['streams_32'])}, {ratio(f['streams_32'], fa['streams_32'])}"),
    ]
    lines += ["", "| goal (issue 34) | measured |", "|---|---|"] + [f"| {g} | {m} |" for g, m in goals]
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        write_docs_section(table, BEGIN, END, "CPU loops: AVX2 against AVX-512 (issue 34)")


if __name__ == "__main__":
    main()
