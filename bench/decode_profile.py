#!/usr/bin/env python3
"""Where a single-stream decode step's time goes (issue 7's profile), on the bench-150m checkpoint.

1. Step attribution, from Caravan's own /metrics over a 256-token greedy stream (32-token prompt):
   the step's wall time, of which the worker's forward + sampling ("worker compute") and its
   collectives; the rest is outside the worker (gRPC, scheduling, detokenization). TP 1 with all
   threads, and TP 2 with the threads split between two worker processes.
2. The weight-GEMV floor in libtorch, and Caravan's own kernel (ops/src/cpu, the path decode takes): one decode token's matrix-vector products alone (8 layers of
   q, k, v, o, gate, up, down, then the LM head; f32 weights read once each, as in decode), with
   the same libtorch. Timed with 1 and with all intra-op threads, and with each weight's rows split
   in two halves run at once on two threads of a pool (intra-op threads 1), to show whether a
   second thread adds memory bandwidth to a one-row product.

Usage: bench/decode_profile.py [--threads 2]
Builds the release binaries and the checkpoint as bench/perf_bench.py does. The machine should be
otherwise idle.
"""
import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
PRESET = "bench-150m"
HIDDEN, KV, MLP, VOCAB, LAYERS = 1024, 256, 2816, 32000, 8


def log(msg):
    print(f"[decode_profile] {msg}", file=sys.stderr, flush=True)


def metrics(http):
    out = {}
    for line in http.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def attribute(model_dir, tp, threads_per_worker):
    bin_dir = REPO / "target" / "release"
    proc = subprocess.Popen([str(bin_dir / "caravan-coordinator"), "--model", str(model_dir), "--tp", str(tp),
                             "--local-workers", "--port", "0", "--threads-per-worker", str(threads_per_worker)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    try:
        url = None
        for line in proc.stdout:
            if line.startswith("ready"):
                url = line.split(" on ", 1)[1].strip()
                break
        if url is None:
            raise SystemExit("the coordinator exited before it was ready")
        with httpx.Client(base_url=url, timeout=300) as http:
            body = {"model": model_dir.name, "prompt": [1] + [450] * 31, "max_tokens": 256,
                    "temperature": 0, "ignore_eos": True}
            http.post("/v1/completions", json={**body, "max_tokens": 16}).raise_for_status()
            before, started = metrics(http), time.perf_counter()
            answer = http.post("/v1/completions", json=body)
            answer.raise_for_status()
            wall = time.perf_counter() - started
            after = metrics(http)
        d = {k: after[k] - before.get(k, 0.0) for k in after}
        steps = d["caravan_steps_total"]
        step = d["caravan_step_seconds_total"] / steps * 1e3
        compute = d["caravan_worker_compute_seconds_total"] / steps * 1e3
        collectives = d["caravan_collective_seconds_total"] / steps * 1e3
        tokens = answer.json()["usage"]["completion_tokens"]
        return {"tok/s": tokens / wall, "step ms": step, "compute ms": compute,
                "collectives ms": collectives, "outside ms": step - compute}
    finally:
        proc.terminate()
        proc.wait()


def gemv_floor(threads):
    shapes = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (MLP, HIDDEN), (MLP, HIDDEN),
              (HIDDEN, MLP)] * LAYERS + [(VOCAB, HIDDEN)]
    weights = [torch.randn(o, i) for o, i in shapes]
    halves = [tuple(h.contiguous() for h in w.chunk(2, 0)) for w in weights]
    xs = {HIDDEN: torch.randn(1, HIDDEN), MLP: torch.randn(1, MLP)}
    weight_bytes = sum(w.numel() for w in weights) * 4
    pool = ThreadPoolExecutor(2)
    linear = torch.nn.functional.linear

    def whole():
        for w in weights:
            linear(xs[w.shape[1]], w)

    def split():
        for a, b in halves:
            x = xs[a.shape[1]]
            other = pool.submit(linear, x, b)
            torch.cat([linear(x, a), other.result()], 1)

    def best_ms(f):
        f()
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(10):
                f()
            best = min(best, (time.perf_counter() - started) / 10)
        return best * 1e3

    rows = []
    for label, n, f in [("1 intra-op thread", 1, whole), (f"{threads} intra-op threads", threads, whole),
                        ("rows split over 2 pool threads (intra-op 1)", 1, split)]:
        torch.set_num_threads(n)
        ms = best_ms(f)
        rows.append((label, ms, weight_bytes / ms / 1e6))
    return weight_bytes, rows


def caravan_products(threads):
    """One token's products through Caravan's own kernel (ops/src/cpu), from the matmul_bench example:
    (dtype, ours ms, ours GB/s, libtorch ms, libtorch GB/s) at one row of activations."""
    subprocess.run(["cargo", "build", "--quiet", "--release", "-p", "caravan-ops", "--example", "matmul_bench"],
                   cwd=REPO, check=True)
    rows = []
    for dtype in ("f32", "bf16"):
        out = subprocess.run([str(REPO / "target" / "release" / "examples" / "matmul_bench"), str(threads), dtype],
                             cwd=REPO, check=True, capture_output=True, text=True).stdout
        # rows | ours ms | ours GB/s | ours GFLOP/s | libtorch ms | libtorch GFLOP/s
        cells = [float(c) for c in next(l for l in out.splitlines() if l.split("|")[0].strip() == "1").split("|")]
        weight_bytes = cells[2] * cells[1] * 1e6  # GB/s x ms
        rows.append((dtype, cells[1], cells[2], cells[4], weight_bytes / cells[4] / 1e6))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    model_dir = REPO / "models" / f"{PRESET}-llama2"
    subprocess.run([str(REPO / ".venv" / "bin" / "python"), "python/make_checkpoint.py", "--preset", PRESET,
                    "--out", model_dir, "--tokenizer", "models/llama2-tokenizer"], cwd=REPO, check=True)
    log("building release binaries")
    subprocess.run(["cargo", "build", "--quiet", "--release", "--bins"], cwd=REPO, check=True)

    print("| layout | tok/s | step ms | worker compute ms | of which collectives ms | outside the worker ms |")
    print("|---|---|---|---|---|---|")
    layouts = [(1, args.threads)] + ([(2, max(1, args.threads // 2))] if args.threads >= 2 else [])
    for tp, per_worker in layouts:
        log(f"step attribution, TP {tp} x {per_worker} threads")
        r = attribute(model_dir, tp, per_worker)
        print(f"| TP {tp}, {per_worker} thread(s) per worker | {r['tok/s']:.1f} | {r['step ms']:.2f} | "
              f"{r['compute ms']:.2f} | {r['collectives ms']:.2f} | {r['outside ms']:.2f} "
              f"({r['outside ms'] / r['step ms']:.0%}) |")
    log("weight-GEMV floor")
    weight_bytes, rows = gemv_floor(args.threads)
    print()
    print(f"One decode token's weight GEMVs alone ({weight_bytes / 1e6:.0f} MB of f32 weights, libtorch "
          f"{torch.__version__}):")
    print()
    print("| how | ms per token | GB/s | tok/s if nothing else ran |")
    print("|---|---|---|---|")
    for label, ms, gbps in rows:
        print(f"| {label} | {ms:.2f} | {gbps:.1f} | {1e3 / ms:.1f} |")
    log("Caravan's kernel")
    for dtype, ours_ms, ours_gbs, torch_ms, torch_gbs in caravan_products(args.threads):
        print(f"| Caravan `cpu::packed`, {dtype} weights, {args.threads} threads | {ours_ms:.2f} | {ours_gbs:.1f} "
              f"| {1e3 / ours_ms:.1f} |")
        print(f"| libtorch `linear`, {dtype} weights, {args.threads} threads (same run) | {torch_ms:.2f} "
              f"| {torch_gbs:.1f} | {1e3 / torch_ms:.1f} |")


if __name__ == "__main__":
    main()
