#!/usr/bin/env python3
"""What serving costs per step at batch 1: single-stream decode through the whole server (HTTP, the
engine and scheduler, gRPC, the worker's handler) against the bare forward pass of the same build
(`caravan-generate`, no server), measured in interleaved rounds on the same machine.

Checkpoint: bench-150m (hidden 1024, 8 layers, 16 heads, 4 KV heads, MLP 2816, vocab 32000), TP 1.
Each round runs, per dtype, one `caravan-generate` decode of 128 tokens after a 32-token prompt and
one served stream of the same shape (a coordinator with one local worker, started for the round and
stopped after it, so neither run shares the machine with the other's processes). Decode tok/s is
(n - 1) tokens / time from the first to the last generated token in both. The time outside the
worker per step comes from the served run's /metrics: caravan_step_outside_worker_seconds_total
over caravan_steps_total (the step's wall time at the coordinator less rank 0's compute).

Goal (issue 20): served decode within 5% of caravan-generate; outside the worker < 0.5 ms per step.

With --baseline DIR (a folder holding the binaries of an earlier build), every round measures
that build too, in the same interleaved order, so a change to the step path is compared A/B on
one machine at one time.

Usage: bench/step_overhead_bench.py [--threads 2] [--rounds 5] [--dtypes f32,bf16] [--baseline DIR]
Prints a Markdown table; progress goes to stderr. The machine should be otherwise idle.
"""
import argparse
import os
import statistics
from pathlib import Path

import httpx

import perf_bench
from serving_bench import Coordinator, log, prompts

DECODE_TOKENS = 128
SHORT_PROMPT = 32


def metric(http, name):
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def served(model_dir: Path, dtype: str, threads: int, seed: int):
    """(decode tok/s, ms outside the worker per step) of one served stream."""
    coordinator = Coordinator(["--model", model_dir, "--tp", 1, "--local-workers", "--port", 0,
                               "--threads-per-worker", threads, "--dtype", dtype])
    try:
        url = coordinator.wait_ready()
        with httpx.Client(base_url=url, timeout=600) as http:
            perf_bench.stream_times(http, model_dir.name, prompts(1, SHORT_PROMPT, seed=1)[0], 4)  # warm-up
            steps0 = metric(http, "caravan_steps_total")
            outside0 = metric(http, "caravan_step_outside_worker_seconds_total")
            _, times = perf_bench.stream_times(http, model_dir.name, prompts(1, SHORT_PROMPT, seed=seed)[0],
                                               DECODE_TOKENS)
            steps = metric(http, "caravan_steps_total") - steps0
            outside = metric(http, "caravan_step_outside_worker_seconds_total") - outside0
        return (len(times) - 1) / (times[-1] - times[0]), 1000 * outside / steps
    finally:
        coordinator.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--baseline", type=Path, help="binaries of an earlier build, measured alongside")
    args = ap.parse_args()
    dtypes = args.dtypes.split(",")
    model_dir, commit = perf_bench.prepare()
    builds = {commit: os.environ["CARAVAN_BIN_DIR"]}
    if args.baseline:
        if not (args.baseline / "caravan-coordinator").is_file():
            raise SystemExit(f"{args.baseline} holds no caravan-coordinator")
        builds["baseline"] = str(args.baseline.resolve())

    rows = [(b, d) for d in dtypes for b in builds]
    engine, serve, outside = ({row: [] for row in rows} for _ in range(3))
    for r in range(args.rounds):
        for build, dtype in rows:
            log(f"round {r + 1} of {args.rounds}, {dtype}, {build}")
            os.environ["CARAVAN_BIN_DIR"] = builds[build]
            prompt = prompts(1, SHORT_PROMPT, seed=40 + r)[0]
            engine[build, dtype].append(perf_bench.caravan_engine_run(model_dir, 1, dtype, args.threads, prompt,
                                                                      DECODE_TOKENS)[1])
            tok_s, ms = served(model_dir, dtype, args.threads, 40 + r)
            serve[build, dtype].append(tok_s)
            outside[build, dtype].append(ms)

    print(f"\nbench-150m, TP 1, {args.threads} threads, {args.rounds} interleaved rounds, commit {commit}"
          f"{f' against the baseline {args.baseline}' if args.baseline else ''}; medians (each round's figure "
          f"in brackets)\n")
    print("| build | dtype | caravan-generate decode tok/s | served decode tok/s | served / generate "
          "| outside the worker per step |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        e, s, o = (statistics.median(v[row]) for v in (engine, serve, outside))
        runs = lambda v, d=1: ", ".join(f"{x:.{d}f}" for x in v)  # noqa: E731
        print(f"| {row[0]} | {row[1]} | {e:.1f} ({runs(engine[row])}) | {s:.1f} ({runs(serve[row])}) | {s / e:.3f}x "
              f"| {o:.2f} ms ({runs(outside[row], 2)}) |")


if __name__ == "__main__":
    main()
