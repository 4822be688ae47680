#!/usr/bin/env python3
"""Asynchronous scheduling (issue 33): served decode against the engine alone, with and without
`--async-scheduling`, measured in one run on the same machine.

Checkpoint: bench-150m (made if missing), release binaries. For each configuration (TP, dtype):
  engine decode     `caravan-generate` single-stream decode tok/s (no HTTP, gRPC or scheduler):
                    what served decode can at best reach.
  served decode     one streamed greedy completion through the HTTP API after a 32-token prompt:
                    (n - 1) tokens / time from the first to the last token, on a coordinator
                    without and one with --async-scheduling.
  32 streams        aggregate output tok/s of 32 concurrent streaming clients, both coordinators.
  outside ms/step   mean wall time per step on the coordinator's critical path less rank 0's
                    compute (/metrics), at one stream: what the round trip adds to each step.
The three single-stream systems run in interleaved rounds (one run each per round), so drift in
the machine falls on all alike; medians are reported.

Usage: bench/async_bench.py [--threads 2] [--rounds 5] [--write-docs]
Prints a Markdown table; with --write-docs it replaces the section between the async_bench
markers in docs/BENCHMARKS.md. The machine should be otherwise idle.
"""
import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from perf_bench import (DECODE_TOKENS, SHORT_PROMPT, caravan_engine_run, interleave,  # noqa: E402
                        prepare, stream_times, write_docs_section)
from serving_bench import Coordinator, caravan_run, log, prompts, scrape  # noqa: E402

BEGIN, END = "<!-- async_bench:begin -->", "<!-- async_bench:end -->"
CONFIGS = ((1, "f32"), (2, "f32"), (1, "bf16"))


def served(model_dir: Path, tp: int, dtype: str, threads: int, ahead: bool) -> Coordinator:
    flags = ["--async-scheduling"] if ahead else []
    return Coordinator(["--model", model_dir, "--tp", tp, "--local-workers", "--port", 0,
                        "--threads-per-worker", max(1, threads // tp), "--dtype", dtype,
                        "--max-batch-size", 32, *flags])


def served_decode(url: str, model: str, seed: int) -> tuple:
    """(tok/s, outside ms per step) of one greedy stream."""
    before = scrape(url)
    with httpx.Client(base_url=url, timeout=600) as http:
        _, times = stream_times(http, model, prompts(1, SHORT_PROMPT, seed=seed)[0], DECODE_TOKENS)
    steps, step_s, compute_s = (b - a for a, b in zip(before, scrape(url)))
    return (len(times) - 1) / (times[-1] - times[0]), 1000 * (step_s - compute_s) / steps


def measure(model_dir: Path, tp: int, dtype: str, threads: int, rounds: int) -> dict:
    coordinators = {"sync": served(model_dir, tp, dtype, threads, False),
                    "async": served(model_dir, tp, dtype, threads, True)}
    try:
        urls = {name: c.wait_ready() for name, c in coordinators.items()}
        model = model_dir.name
        outside = {name: [] for name in urls}

        def serve(name):
            def run(r):
                tok_s, ms = served_decode(urls[name], model, seed=40 + r)
                outside[name].append(ms)
                return tok_s
            return run

        for name in urls:  # warm-up
            served_decode(urls[name], model, seed=1)
        decode = interleave({
            "engine": lambda r: caravan_engine_run(model_dir, tp, dtype, threads,
                                                   prompts(1, SHORT_PROMPT, seed=40 + r)[0],
                                                   DECODE_TOKENS)[1],
            "sync": serve("sync"),
            "async": serve("async"),
        }, rounds)
        streams = {name: caravan_run(url, model, 32, SHORT_PROMPT, 64)["tok_s"]
                   for name, url in urls.items()}
        return {"decode": {k: v["median"] for k, v in decode.items()},
                "outside_ms": {k: statistics.median(v) for k, v in outside.items()},
                "streams": streams}
    finally:
        for c in coordinators.values():
            c.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--write-docs", action="store_true", help="update docs/BENCHMARKS.md")
    args = ap.parse_args()
    model_dir, commit = prepare()
    rows = []
    for tp, dtype in CONFIGS:
        log(f"TP {tp} {dtype}")
        r = measure(model_dir, tp, dtype, args.threads, args.rounds)
        d, o, s = r["decode"], r["outside_ms"], r["streams"]
        rows.append(f"| TP {tp} {dtype} | {d['engine']:.1f} | {d['sync']:.1f} ({d['sync'] / d['engine']:.2f}x) "
                    f"| {d['async']:.1f} ({d['async'] / d['engine']:.2f}x) | {o['sync']:.2f} | {o['async']:.2f} "
                    f"| {s['sync']:.0f} | {s['async']:.0f} ({s['async'] / s['sync']:.2f}x) |")
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), "?")
    table = "\n".join([
        f"Command: `.venv/bin/python bench/async_bench.py --threads {args.threads} --rounds {args.rounds}`; "
        f"commit {commit}; bench-150m; {args.threads} threads; {model_name}; release build; medians of "
        f"{args.rounds} interleaved rounds (engine, served synchronous, served asynchronous).",
        "",
        "| configuration | engine decode tok/s | served decode, sync | served decode, async "
        "| outside ms/step, sync | outside ms/step, async | 32 streams tok/s, sync | 32 streams, async |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    print(table)
    if args.write_docs:
        write_docs_section(table, BEGIN, END, "Asynchronous scheduling (issue 33)")


if __name__ == "__main__":
    main()
