#!/usr/bin/env python3
"""Caravan's CPU performance against Hugging Face transformers and llama.cpp, measured in one run on
the same machine and the same thread count, with the memory-bandwidth bound for reference.

Checkpoint: bench-150m (hidden 1024, 8 layers, 16 heads, 4 KV heads, MLP 2816, vocab 32000), f32.

Measured, for each system and dtype:
  decode tok/s     one stream, after a 32-token prompt: (n - 1) tokens / time from the first to the
                   last generated token (Caravan: through the HTTP API, streamed; transformers:
                   generate(n + 1) minus generate(1); llama.cpp: llama-bench tgN from an empty
                   context).
  prefill tok/s    a 512-token prompt: 512 / time to its first token (Caravan: through the API,
                   so it includes the request's overhead; transformers: one forward; llama.cpp:
                   llama-bench pp512).
  TTFT ms          a 32-token prompt, Caravan only (through the API).
  engine decode /  Caravan's forward pass alone, in process, as llama-bench and transformers are
  engine prefill   measured: `caravan-generate` (no HTTP, gRPC or scheduler), same prompts and
                   token counts, same definitions as above.
  interleaved      single-stream engine decode of Caravan and llama.cpp again, in rounds of one run
                   per system, so that drift in the machine (its memory bandwidth moves with its
                   neighbours) falls on every system alike; the goals compare these medians first.
  8 / 32 streams   aggregate output tok/s, Caravan through the API (concurrent streaming clients)
                   and transformers (a batch of 8 / 32 in generate).
Caravan runs at TP 1 (one worker, all threads) and TP 2 (two worker processes, the threads split
between them), f32 and bf16. Step time outside the worker (gRPC, scheduling) comes from /metrics at
32 streams.

The bandwidth bound: decode must read every weight once per token, so tok/s <= read bandwidth /
weight bytes. Read bandwidth is measured here (libtorch summing a 1 GiB f32 tensor with the same
threads), as is copy bandwidth (bytes read + written by a 1 GiB copy).

Peers are optional: transformers is in the project's virtualenv; llama.cpp is built from the
llama-cpp-python sdist by bench/llama_cpp_peer.py (needs cmake: `apt install cmake`) and skipped
with a message when it cannot be. Nothing is estimated in place of a missing measurement.

Usage: bench/perf_bench.py [--threads 2] [--skip-llama-cpp] [--write-docs]
Prints Markdown tables; with --write-docs they replace the section between the perf_bench markers
in docs/BENCHMARKS.md. The machine should be otherwise idle: other load skews every figure.
"""
import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp_peer  # noqa: E402
from serving_bench import REPO, Coordinator, caravan_run, log, prompts, token_times  # noqa: E402

PRESET = "bench-150m"
DECODE_TOKENS = 128
PREFILL_TOKENS = 512
SHORT_PROMPT = 32
INTERLEAVED_ROUNDS = 5
BEGIN, END = "<!-- perf_bench:begin -->", "<!-- perf_bench:end -->"


def weight_bytes(model_dir: Path, bytes_per_param: int) -> int:
    """Bytes of weights one decode step reads (every parameter once) at `bytes_per_param`."""
    from safetensors import safe_open
    params = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "np") as st:
            params += sum(math.prod(st.get_slice(name).get_shape()) for name in st.keys())
    return params * bytes_per_param


def bandwidth(threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    x = torch.ones(1 << 28)  # 1 GiB of f32
    y = torch.empty_like(x)
    x.sum()
    y.copy_(x)  # fault the pages in
    reads, copies = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        reads.append(x.numel() * 4 / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        y.copy_(x)
        copies.append(2 * x.numel() * 4 / (time.perf_counter() - t0))
    return {"read_gbs": max(reads) / 1e9, "copy_gbs": max(copies) / 1e9}


# --- Caravan -----------------------------------------------------------------------------------

def prepare():
    """The bench-150m checkpoint (made if missing), the release binaries (built, and used from
    here on), and the commit measured: (model folder, short commit hash)."""
    model_dir = REPO / "models" / f"{PRESET}-llama2"
    python = str(REPO / ".venv" / "bin" / "python")
    subprocess.run([python, "python/make_checkpoint.py", "--preset", PRESET, "--out", model_dir,
                    "--tokenizer", "models/llama2-tokenizer"], cwd=REPO, check=True)
    log("building release binaries")
    subprocess.run(["cargo", "build", "--quiet", "--release", "--bins"], cwd=REPO, check=True)
    os.environ["CARAVAN_BIN_DIR"] = str(REPO / "target" / "release")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    return model_dir, commit


def stream_times(http, model, prompt, max_tokens):
    """Send time and the arrival time of every generated token of one greedy stream."""
    # logprobs makes every token its own event (otherwise a token that completes no character is
    # folded into the next event).
    return token_times(http, {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                              "stream": True, "ignore_eos": True, "logprobs": 1})


def quantization_args(quantization):
    return [] if quantization is None else ["--quantization", quantization]


def caravan(model_dir: Path, tp: int, dtype: str, threads: int, quantization=None) -> dict:
    coordinator = Coordinator(["--model", model_dir, "--tp", tp, "--local-workers", "--port", 0,
                               "--threads-per-worker", max(1, threads // tp), "--dtype", dtype,
                               "--max-batch-size", 32, *quantization_args(quantization)])
    try:
        url = coordinator.wait_ready()
        model = model_dir.name
        with httpx.Client(base_url=url, timeout=600) as http:
            stream_times(http, model, prompts(1, SHORT_PROMPT, seed=1)[0], 4)  # warm-up
            decode, ttft, prefill = [], [], []
            for rep in range(3):
                t0, times = stream_times(http, model, prompts(1, SHORT_PROMPT, seed=10 + rep)[0], DECODE_TOKENS)
                decode.append((len(times) - 1) / (times[-1] - times[0]))
                ttft.append(1000 * (times[0] - t0))
                t0, times = stream_times(http, model, prompts(1, PREFILL_TOKENS, seed=20 + rep)[0], 1)
                prefill.append(PREFILL_TOKENS / (times[0] - t0))
        result = {"decode": statistics.median(decode), "prefill": statistics.median(prefill),
                  "ttft_ms": statistics.median(ttft)}
        for c in (8, 32):
            r = caravan_run(url, model, c, SHORT_PROMPT, 64)
            result[f"streams_{c}"] = r["tok_s"]
            if c == 32:
                result["outside_pct"] = r["outside_pct"]
        return result
    finally:
        coordinator.stop()


def caravan_engine_run(model_dir: Path, tp: int, dtype: str, threads: int, prompt, new_tokens,
                       quantization=None):
    """(prefill tok/s, decode tok/s) of one `caravan-generate` run (the forward pass without the server)."""
    binary = Path(os.environ.get("CARAVAN_BIN_DIR", REPO / "target" / "release")) / "caravan-generate"
    out = subprocess.run(
        [binary, "--model", model_dir, "--tp", str(tp), "--threads", str(max(1, threads // tp)),
         "--dtype", dtype, "--prompt-ids", ",".join(map(str, prompt)),
         "--max-new-tokens", str(new_tokens), *quantization_args(quantization)],
        cwd=REPO, check=True, capture_output=True, text=True).stdout
    # "prefill: N tokens in X ms (Y tok/s); decode: N tokens in X ms (Y tok/s)"
    line = next(l for l in out.splitlines() if l.startswith("prefill:"))
    return [float(part.split("(")[1].split(" tok/s")[0]) for part in line.split(";")]


def caravan_engine(model_dir: Path, tp: int, dtype: str, threads: int, quantization=None) -> dict:
    """Decode and prefill tok/s of `caravan-generate`, medians of three runs."""
    run = lambda prompt, n: caravan_engine_run(model_dir, tp, dtype, threads, prompt, n,  # noqa: E731
                                               quantization)
    decode = [run(prompts(1, SHORT_PROMPT, seed=10 + rep)[0], DECODE_TOKENS)[1] for rep in range(3)]
    prefill = [run(prompts(1, PREFILL_TOKENS, seed=20 + rep)[0], 1)[0] for rep in range(3)]
    return {"decode": statistics.median(decode), "prefill": statistics.median(prefill)}


def interleaved_decode(model_dir: Path, threads: int, ggufs: dict,
                       caravans=((1, "f32", None), (2, "f32", None), (1, "bf16", None))) -> dict:
    """Single-stream engine decode tok/s of Caravan (`caravans`: TP, dtype, quantization) and
    llama.cpp (`ggufs`), measured in rounds of one run per system ([`interleave`]). Medians per
    system."""
    systems = {
        f"caravan TP {tp} {quantization or dtype}": lambda r, tp=tp, dtype=dtype, q=quantization: caravan_engine_run(
            model_dir, tp, dtype, threads, prompts(1, SHORT_PROMPT, seed=30 + r)[0], DECODE_TOKENS, q)[1]
        for tp, dtype, quantization in caravans
    }
    return interleave({**systems, **llama_cpp_decoders(ggufs, threads)})


def llama_cpp_decoders(ggufs: dict, threads: int) -> dict:
    """For [`interleave`]: a single-stream llama-bench decode run of each GGUF in `ggufs`."""
    return {f"llama.cpp {outtype}": lambda r, gguf=gguf: llama_cpp_peer.run_bench(
        gguf, threads, prompt_tokens=0, gen_tokens=DECODE_TOKENS, repetitions=1)["decode_tps"]
        for outtype, gguf in ggufs.items()}


def interleave(systems: dict, rounds: int = INTERLEAVED_ROUNDS) -> dict:
    """Runs `systems` (name: a function of the round giving tok/s) in rounds of one run each, so
    that whatever the machine does meanwhile (its memory bandwidth moves with its neighbours)
    lands on every system alike; the median and the runs of each."""
    samples = {name: [] for name in systems}
    for r in range(rounds):
        log(f"interleaved decode, round {r + 1} of {rounds}")
        for name, run in systems.items():
            samples[name].append(run(r))
    return {name: {"median": statistics.median(v), "runs": v} for name, v in samples.items()}


def llama_cpp_peers(ggufs: dict, threads: int):
    """llama-bench decode and prefill tok/s of each GGUF in `ggufs` (name: a function that gives
    its path, called only when llama.cpp can run here), and the paths; nothing, with a message,
    when `ggufs` is empty (skipped) or llama.cpp cannot be built."""
    if not ggufs:
        log("llama.cpp: skipped (--skip-llama-cpp)")
        return {}, {}
    ok, why = llama_cpp_peer.available()
    if not ok:
        log(f"llama.cpp: skipped ({why})")
        return {}, {}
    llama, paths = {}, {}
    for name, make in ggufs.items():
        paths[name] = make()
        log(f"llama.cpp {name}")
        r = llama_cpp_peer.run_bench(paths[name], threads, prompt_tokens=PREFILL_TOKENS,
                                     gen_tokens=DECODE_TOKENS, repetitions=3)
        llama[name] = {"decode": r["decode_tps"], "prefill": r["prefill_tps"],
                       "prefill_error": r["prefill_error"]}
    return llama, paths


# --- transformers ------------------------------------------------------------------------------

def transformers_peer(model_dir: Path, dtype: str, threads: int) -> dict:
    import torch
    from transformers import LlamaForCausalLM
    torch.set_num_threads(threads)
    kind = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=kind).eval()

    def generate(ids, n):
        t0 = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0

    with torch.inference_mode():
        short = torch.tensor(prompts(1, SHORT_PROMPT, seed=1))
        generate(short, 2)  # warm-up
        decode = []
        for rep in range(3):
            ids = torch.tensor(prompts(1, SHORT_PROMPT, seed=10 + rep))
            decode.append((DECODE_TOKENS - 1) / (generate(ids, DECODE_TOKENS) - generate(ids, 1)))
        prefill = []
        for rep in range(3):
            ids = torch.tensor(prompts(1, PREFILL_TOKENS, seed=20 + rep))
            t0 = time.perf_counter()
            model(ids)
            prefill.append(PREFILL_TOKENS / (time.perf_counter() - t0))
        result = {"decode": statistics.median(decode), "prefill": statistics.median(prefill)}
        for c in (8, 32):
            ids = torch.tensor(prompts(c, SHORT_PROMPT, seed=c))
            result[f"streams_{c}"] = c * 64 / generate(ids, 64)
    return result


# --- report ------------------------------------------------------------------------------------

def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def ratio(a, b):
    return "-" if a is None or not b else f"{a / b:.2f}x"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--write-docs", action="store_true", help="update docs/BENCHMARKS.md")
    args = ap.parse_args()
    model_dir, commit = prepare()

    ggufs = {} if args.skip_llama_cpp else {t: (lambda t=t: llama_cpp_peer.convert(model_dir, t))
                                             for t in ("f32", "f16")}
    llama, ggufs = llama_cpp_peers(ggufs, args.threads)

    rows = {}
    for tp in (1, 2):
        for dtype in ("f32", "bf16"):
            log(f"caravan TP {tp} {dtype}")
            # The engine first: nothing of the served run's processes is left to compete with it.
            engine = caravan_engine(model_dir, tp, dtype, args.threads)
            rows[("caravan", tp, dtype)] = caravan(model_dir, tp, dtype, args.threads)
            rows[("caravan", tp, dtype)].update(engine_decode=engine["decode"],
                                                engine_prefill=engine["prefill"])
    interleaved = interleaved_decode(model_dir, args.threads, ggufs)
    hf = {}
    for dtype in ("f32", "bf16"):
        log(f"transformers {dtype}")
        hf[dtype] = transformers_peer(model_dir, dtype, args.threads)
    bw = bandwidth(args.threads)
    bound = {d: bw["read_gbs"] * 1e9 / weight_bytes(model_dir, b) for d, b in (("f32", 4), ("bf16", 2))}

    lines = [f"{PRESET}, {args.threads} threads for every system, commit {commit}, "
             f"{time.strftime('%Y-%m-%d')}. Command: `.venv/bin/python bench/perf_bench.py --write-docs`.", "",
             f"Memory bandwidth measured in the same run: read {bw['read_gbs']:.1f} GB/s, copy "
             f"{bw['copy_gbs']:.1f} GB/s. The decode bound (read bandwidth / weight bytes) is "
             f"{bound['f32']:.1f} tok/s in f32 and {bound['bf16']:.1f} tok/s in 16-bit.", "",
             "Caravan's *served* figures go through the HTTP API, gRPC and the scheduler; its *engine* "
             "figures are the forward pass alone (`caravan-generate`), which is what llama-bench and "
             "transformers' `generate` measure.", "",
             "| system | dtype | decode tok/s (served) | engine decode tok/s | of bound | prefill 512 tok/s "
             "(served) | engine prefill tok/s | TTFT ms | 8 streams tok/s | 32 streams tok/s "
             "| outside the worker @32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (name, tp, dtype), r in rows.items():
        lines.append(f"| Caravan TP {tp} | {dtype} | {fmt(r['decode'])} | {fmt(r['engine_decode'])} "
                     f"| {100 * r['engine_decode'] / bound[dtype]:.0f}% "
                     f"| {fmt(r['prefill'], 0)} | {fmt(r['engine_prefill'], 0)} | {fmt(r['ttft_ms'], 0)} "
                     f"| {fmt(r['streams_8'])} | {fmt(r['streams_32'])} | {r['outside_pct']:.1f}% |")
    for dtype, r in hf.items():
        lines.append(f"| transformers | {dtype} | - | {fmt(r['decode'])} | {100 * r['decode'] / bound[dtype]:.0f}% "
                     f"| - | {fmt(r['prefill'], 0)} | - | {fmt(r['streams_8'])} | {fmt(r['streams_32'])} | - |")
    for outtype, r in llama.items():
        b = bound["f32" if outtype == "f32" else "bf16"]
        lines.append(f"| llama.cpp | {outtype} | - | {fmt(r['decode'])} | {100 * r['decode'] / b:.0f}% "
                     f"| - | {llama_cpp_peer.prefill_cell(r)} | - | - | - | - |")
    if not llama:
        lines.append("| llama.cpp | - | skipped: see the command's output | | | | | | | | |")

    lines += ["", f"Single-stream engine decode, interleaved: {INTERLEAVED_ROUNDS} rounds of one "
              f"{DECODE_TOKENS}-token run per system, medians (each run's tok/s in brackets).", "",
              "| system | decode tok/s | runs |", "|---|---|---|"]
    for name, r in interleaved.items():
        lines.append(f"| {name} | {r['median']:.1f} | {', '.join(f'{v:.1f}' for v in r['runs'])} |")
    med = lambda name: interleaved.get(name, {}).get("median")  # noqa: E731

    c1, c2 = rows[("caravan", 1, "f32")], rows[("caravan", 2, "f32")]
    b1 = rows[("caravan", 1, "bf16")]
    llama_f32, llama_f16 = llama.get("f32", {}).get("decode"), llama.get("f16", {}).get("decode")
    goals = [
        ("single-stream f32 decode >= 2x transformers f32 (engine / served)",
         f"{ratio(c1['engine_decode'], hf['f32']['decode'])} / {ratio(c1['decode'], hf['f32']['decode'])}"),
        ("single-stream f32 decode >= 1.0x llama.cpp f32 (engine interleaved / engine / served)",
         f"{ratio(med('caravan TP 1 f32'), med('llama.cpp f32'))} / {ratio(c1['engine_decode'], llama_f32)} "
         f"/ {ratio(c1['decode'], llama_f32)}"),
        ("bf16 decode >= llama.cpp f16 (engine interleaved / engine / served)",
         f"{ratio(med('caravan TP 1 bf16'), med('llama.cpp f16'))} / {ratio(b1['engine_decode'], llama_f16)} "
         f"/ {ratio(b1['decode'], llama_f16)}"),
        ("TP=2 costs <= 10% over TP=1 (decode, f32; TP 2 / TP 1, engine interleaved / engine / served)",
         f"{ratio(med('caravan TP 2 f32'), med('caravan TP 1 f32'))} / "
         f"{ratio(c2['engine_decode'], c1['engine_decode'])} / {ratio(c2['decode'], c1['decode'])}"),
        ("step time outside the model < 5% at 32 streams (TP 1, f32)", f"{c1['outside_pct']:.1f}%"),
    ]
    lines += ["", "| goal (issue 7) | measured |", "|---|---|"] + [f"| {g} | {m} |" for g, m in goals]
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        write_docs_section(table, BEGIN, END, "CPU performance against transformers and llama.cpp (issue 7)")


def write_docs_section(table, begin, end, heading):
    """Puts `table` between the `begin` and `end` markers of docs/BENCHMARKS.md, or appends it
    under `heading` with the markers."""
    path = REPO / "docs" / "BENCHMARKS.md"
    text = path.read_text()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + begin + "\n" + table + "\n" + end + rest.split(end, 1)[1]
    else:
        text += f"\n## {heading}\n\n{begin}\n{table}\n{end}\n"
    path.write_text(text)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
