#!/usr/bin/env python3
"""Serving throughput at several concurrency levels, with Hugging Face transformers measured in the
same run on the same machine as the peer.

Caravan: a coordinator with --tp local workers (release build) serves a generated Llama-2-shaped
checkpoint (default: bench-150m, hidden 1024, 8 layers, 16 heads, 4 KV heads, MLP 2816, vocab
32000). For each concurrency c, c streaming completions start together (different prompts of
--prompt-tokens token ids, exactly --max-tokens output tokens each: greedy with ignore_eos); the
aggregate output rate is c * max_tokens / wall time from the first request to the last token.
Time to first token and inter-token latency are per stream.

Peer: transformers `generate` on the same checkpoint and the same thread count, a batch of c
prompts (same lengths), greedy, exactly --max-tokens new tokens.

The benchmark's own client threads run at nice 10 (each thread, not the process, so the servers and
peers it starts later keep the default priority) so that they yield the two cores to the server
when both want them. Step time is split from /metrics: mean wall time of a step at the coordinator, and the share of it
spent outside rank 0's compute (gRPC, scheduling, the coordinator's own work).

Usage: bench/serving_bench.py [--tp 1] [--concurrency 1,8,32] [--max-tokens 64] [--prompt-tokens 32]
Prints a Markdown table (for docs/BENCHMARKS.md); progress goes to stderr.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "python"))
from conftest import Coordinator, sse_lines  # noqa: E402  (a coordinator process; SSE lines)


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def prompts(n, length, seed=0):
    rng = random.Random(seed)
    # BOS, then ordinary vocabulary ids (no special or byte-fallback tokens).
    return [[1] + [rng.randrange(300, 32000) for _ in range(length - 1)] for _ in range(n)]


def token_times(http, body):
    """Send time and the arrival time of each token event of one streamed completion."""
    times = []
    t0 = time.perf_counter()
    with http.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.read()[:300]!r}")
        for line in sse_lines(resp):
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(event["error"])
            if event["choices"] and event["choices"][0].get("finish_reason") is None:
                times.append(time.perf_counter())
    return t0, times


def stream_one(url, model, prompt, max_tokens, out, index, start):
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    # Clients share the machine with the server here, where in production they would not: each
    # client thread runs at nice 10 so the server's steps are not delayed by their SSE parsing.
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    with httpx.Client(base_url=url, timeout=600) as http:
        start.wait()
        out[index] = token_times(http, body)


def scrape(url):
    """The step counters of /metrics: steps, step seconds, rank 0's compute seconds."""
    text = httpx.get(url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return (values["caravan_steps_total"], values["caravan_step_seconds_total"],
            values["caravan_worker_compute_seconds_total"])


def caravan_run(url, model, c, prompt_len, max_tokens):
    before = scrape(url)
    ps = prompts(c, prompt_len, seed=c)
    out = [None] * c
    start = threading.Event()
    threads = [threading.Thread(target=stream_one, args=(url, model, p, max_tokens, out, i, start))
               for i, p in enumerate(ps)]
    for t in threads:
        t.start()
    time.sleep(0.2)  # let every client connect before the common start signal
    begin = time.perf_counter()
    start.set()
    for t in threads:
        t.join()
    end = max(times[-1] for _, times in out)
    tokens = sum(len(times) for _, times in out)
    ttft = [times[0] - t0 for t0, times in out]
    itl = [b - a for _, times in out for a, b in zip(times, times[1:])]
    steps, step_s, compute_s = (b - a for a, b in zip(before, scrape(url)))
    return {"tokens": tokens, "wall": end - begin, "tok_s": tokens / (end - begin),
            "ttft_ms": 1000 * statistics.median(ttft), "itl_ms": 1000 * statistics.median(itl),
            "step_ms": 1000 * step_s / steps, "outside_pct": 100 * (step_s - compute_s) / step_s}


def hf_run(model_dir, c, prompt_len, max_tokens, threads):
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    model = hf_run.cache.get(model_dir)
    if model is None:
        model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        hf_run.cache[model_dir] = model
    ids = torch.tensor(prompts(c, prompt_len, seed=c))
    with torch.inference_mode():
        model.generate(ids[:, :4], attention_mask=torch.ones_like(ids[:, :4]), max_new_tokens=2,
                       min_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
        wall = time.perf_counter() - t0
    tokens = (out.shape[1] - prompt_len) * c
    return {"tokens": tokens, "wall": wall, "tok_s": tokens / wall}


hf_run.cache = {}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="bench-150m")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for both systems")
    ap.add_argument("--no-peer", action="store_true", help="skip transformers")
    ap.add_argument("--profile", default="release", choices=["release", "debug"])
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    model_dir = REPO / "models" / f"{args.preset}-llama2"
    python = str(REPO / ".venv" / "bin" / "python")
    log(f"checkpoint {model_dir}")
    subprocess.run([python, "python/make_checkpoint.py", "--preset", args.preset, "--out", model_dir,
                    "--tokenizer", "models/llama2-tokenizer"], cwd=REPO, check=True)
    log(f"building ({args.profile})")
    cargo = ["cargo", "build", "--quiet", "--bins"] + (["--release"] if args.profile == "release" else [])
    subprocess.run(cargo, cwd=REPO, check=True)
    os.environ["CARAVAN_BIN_DIR"] = str(REPO / "target" / args.profile)

    per_worker = max(1, args.threads // args.tp)
    coordinator = Coordinator(["--model", model_dir, "--tp", args.tp, "--local-workers", "--port", 0,
                               "--threads-per-worker", per_worker, "--max-batch-size", max(levels)])
    results = {}
    try:
        url = coordinator.wait_ready()
        model = model_dir.name
        log("warming up")
        caravan_run(url, model, 2, args.prompt_tokens, 4)
        for c in levels:
            log(f"caravan: {c} concurrent streams x {args.max_tokens} tokens")
            results[c] = {"caravan": caravan_run(url, model, c, args.prompt_tokens, args.max_tokens)}
            log(f"  {results[c]['caravan']['tok_s']:.1f} tok/s")
    finally:
        coordinator.stop()
    if not args.no_peer:
        for c in levels:
            log(f"transformers: batch of {c} x {args.max_tokens} tokens")
            results[c]["hf"] = hf_run(str(model_dir), c, args.prompt_tokens, args.max_tokens, args.threads)
            log(f"  {results[c]['hf']['tok_s']:.1f} tok/s")

    base = results[levels[0]]["caravan"]["tok_s"]
    print(f"\n{args.preset}, TP {args.tp}, {args.threads} CPU threads, prompts of {args.prompt_tokens} tokens, "
          f"{args.max_tokens} output tokens per stream\n")
    header = ("| streams | Caravan tok/s | vs 1 stream | TTFT median ms | ITL median ms | step ms "
              "| outside the worker |")
    sep = "|---|---|---|---|---|---|---|"
    if not args.no_peer:
        header += " transformers tok/s | Caravan / transformers |"
        sep += "---|---|"
    print(header)
    print(sep)
    for c in levels:
        r = results[c]["caravan"]
        row = (f"| {c} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f}x | {r['ttft_ms']:.0f} | {r['itl_ms']:.0f} "
               f"| {r['step_ms']:.0f} | {r['outside_pct']:.1f}% |")
        if not args.no_peer:
            h = results[c]["hf"]
            row += f" {h['tok_s']:.1f} | {r['tok_s'] / h['tok_s']:.2f}x |"
        print(row)


if __name__ == "__main__":
    main()
