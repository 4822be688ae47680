#!/usr/bin/env python3
"""The device check behind scripts/gpu_check.sh: Caravan's release binaries against Hugging Face
transformers on the same device, in one run, ending in one summary table.

Checks (each a row of the table; the run fails if any check fails):
  golden   caravan-generate's logits (f32, prefill and 15 teacher-forced decode steps, TP 1)
           against transformers' on the same device, and its greedy tokens;
  served   a coordinator and its workers on the device serving the OpenAI API: the `openai`
           client's greedy completion equals transformers' greedy tokens (up to the first near-tie)
           and the streamed text equals the whole one;
  bench    single-stream bf16 decode tok/s against transformers' `generate` on the same device
           and against the bandwidth bound (weight bytes over a device copy's bandwidth, measured
           in the same run), 32-stream throughput, the prefill time of a 512-token prompt, and
           served single-stream decode through the API against caravan-generate's, without and
           with --async-scheduling.

Sizes: `small` (a 4-layer model, for CI on CPUs) or `7b` (Llama-2-7B's shape, random bf16
weights written tensor by tensor). On CPUs the workers run with CARAVAN_CPU_KERNELS=off, the
libtorch path a GPU runs. The served check runs TP 1, on a GPU TP 1 in an NCCL group of one
(`--collective nccl`), and TP 2 with both ranks on the one device over the TCP ring. Not yet
covered: a collective that never completes, aborted within the timeout.

Usage: python/gpu_check.py OUTDIR --bin-dir DIR --tokenizer DIR [--device cuda|cpu] [--size small|7b]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from greedy_reference import hf_greedy

SHAPES = {
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=688),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008),
}
VOCAB = 32000  # the Llama 2 tokenizer's
F32_TOLERANCE = {"cpu": 1e-4, "cuda": 1e-3}
DECODE_STEPS = 16


def log(msg):
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def config(size: str, dtype: str) -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1,
                       eos_token_id=2, tie_word_embeddings=False, torch_dtype=dtype, **SHAPES[size])


def write_checkpoint(out: Path, size: str, dtype: torch.dtype, tokenizer: Path, seed: int,
                     peaked: bool = False) -> Path:
    """A random-weight checkpoint written tensor by tensor (never the whole model in memory), with
    the Llama 2 tokenizer; std 0.02 as Llama's initialisation, norms 1. `peaked` scales the LM
    head so that logits spread (std ~8) and greedy choices are far from ties, as a trained
    model's mostly are."""
    if (out / "model.safetensors.index.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    cfg = config(size, name)
    cfg.save_pretrained(out)
    gen = torch.Generator().manual_seed(seed)
    h, m, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    index, shard = {}, 0

    def flush(tensors):
        nonlocal shard
        file = f"model-{shard:05d}.safetensors"
        save_file(tensors, out / file, metadata={"format": "pt"})
        index.update({k: file for k in tensors})
        shard += 1

    head = rand(cfg.vocab_size, h)
    if peaked:
        head = (head.float() * (8 / (0.02 * h ** 0.5))).to(dtype)
    flush({"model.embed_tokens.weight": rand(cfg.vocab_size, h), "lm_head.weight": head,
           "model.norm.weight": torch.ones(h, dtype=dtype)})
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        flush({p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
               p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
               p + "mlp.gate_proj.weight": rand(m, h), p + "mlp.up_proj.weight": rand(m, h),
               p + "mlp.down_proj.weight": rand(h, m), p + "input_layernorm.weight": torch.ones(h, dtype=dtype),
               p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype)})
    with open(out / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / name).write_bytes((tokenizer / name).read_bytes())
    return out


def hf_model(path: Path, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    """transformers' model on `device`; its `generate` does not stop at EOS, as caravan-generate."""
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None
    return model


def run(cmd, env=None, timeout=900) -> str:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout


def generate_cmd(args, model: Path, prompts, new_tokens: int, dtype: str, extra=()):
    cmd = [args.bin_dir / "caravan-generate", "--model", model, "--device", args.device_arg, "--dtype", dtype,
           "--max-new-tokens", new_tokens, *extra]
    for p in prompts:
        cmd += ["--prompt-ids", ",".join(map(str, p))]
    return cmd


def report(stdout: str) -> dict:
    m = re.search(r"prefill: (\d+) tokens in ([\d.]+) ms .*decode: (\d+) tokens in ([\d.]+) ms", stdout)
    if not m:
        raise RuntimeError(f"no speed report in:\n{stdout}")
    return {"prefill_tokens": int(m[1]), "prefill_ms": float(m[2]), "decode_tokens": int(m[3]),
            "decode_ms": float(m[4])}


def check_golden(args, model_dir: Path) -> list:
    """f32 logits and greedy tokens against transformers on the same device."""
    log("golden: transformers f32 on the device")
    model = hf_model(model_dir, args.device, torch.float32)
    gen = torch.Generator().manual_seed(5)
    prompts = [[1] + torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (11, 29)]
    rows = []
    dump = args.out / "golden-logits.safetensors"
    forced, reference = [], []
    with torch.no_grad():
        for p in prompts:
            out = model.generate(torch.tensor([p], device=args.device), max_new_tokens=DECODE_STEPS,
                                 do_sample=False, pad_token_id=0)
            tokens = out[0, len(p):].tolist()
            full = model(torch.tensor([p + tokens[:-1]], device=args.device)).logits[0].float().cpu()
            forced.append(tokens)
            reference.append(full)
    cmd = generate_cmd(args, model_dir, prompts, DECODE_STEPS, "f32", ["--dump-logits", dump])
    for f in forced:
        cmd += ["--force-tokens", ",".join(map(str, f[:DECODE_STEPS - 1]))]
    log("golden: caravan-generate f32 on the device")
    run(cmd, env=args.env)
    ours = load_file(dump)
    worst, same_tokens = 0.0, True
    for i, p in enumerate(prompts):
        got = torch.cat([ours[f"p{i}.prefill_logits"].float(), ours[f"p{i}.decode_logits"].float()])
        worst = max(worst, (got - reference[i]).abs().max().item())
        same_tokens &= ours[f"p{i}.tokens"].tolist() == forced[i]
    tolerance = F32_TOLERANCE[args.device_kind]
    rows.append(("golden", "f32 logits, max abs diff vs transformers (2 prompts, prefill + 15 decode)",
                 f"{worst:.2e}", f"<= {tolerance:.0e}", worst <= tolerance))
    rows.append(("golden", "greedy tokens equal transformers'", str(same_tokens), "True", same_tokens))
    del model
    return rows


class Coordinator:
    """caravan-coordinator --local-workers on the device; the URL from its ready line."""

    def __init__(self, args, model: Path, log_path: Path, tp: int, collective: str, dtype="f32", extra=()):
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [str(args.bin_dir / "caravan-coordinator"), "--model", str(model), "--tp", str(tp), "--local-workers",
             "--device", args.device_arg, "--collective", collective, "--dtype", dtype, "--port", "0",
             "--host", "127.0.0.1", *extra],
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=args.env, start_new_session=True)
        self.url = None
        deadline = time.monotonic() + 300
        lines = []

        def read():
            for line in self.proc.stdout:
                lines.append(line)

        threading.Thread(target=read, daemon=True).start()
        while self.url is None:
            for line in list(lines):
                m = re.match(r"ready: serving \S+ on (http://\S+)", line)
                if m:
                    self.url = m[1]
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the coordinator did not become ready; see {log_path}")
            time.sleep(0.2)  # polling the ready line, with a deadline

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        self.log.close()


def served_groups(device_kind: str) -> list:
    """(tp, --collective, label) of the groups served: on a GPU, one rank, one rank in an NCCL
    group, and two ranks sharing the GPU over the TCP ring (NCCL refuses two ranks on one GPU);
    on CPUs, one rank and two over the ring."""
    groups = [(1, "auto", "TP 1")]
    if device_kind == "cuda":
        groups.append((1, "nccl", "TP 1, an NCCL group of one"))
    groups.append((2, "tcp", "TP 2 on one device, TCP ring"))
    return groups


def check_served(args, model_dir: Path) -> list:
    """The OpenAI API through the `openai` client against transformers' greedy tokens."""
    log("served: transformers greedy on the device")
    model = hf_model(model_dir, args.device, torch.float32)
    prompt_ids = [1, 450, 7483, 310, 3444, 338]  # "The capital of France is"
    want, safe = hf_greedy(model, prompt_ids, DECODE_STEPS)
    del model
    rows = []
    for tp, collective, label in served_groups(args.device_kind):
        try:
            rows += served_group(args, model_dir, tp, collective, label, prompt_ids, want, safe)
        except Exception as e:  # one group that cannot serve is a failed row; the others still run
            rows.append(("served", f"{label}: could not run: {str(e).splitlines()[0][:200]}", "", "", False))
            log(f"served {label} failed: {e}")
    return rows


def served_group(args, model_dir, tp, collective, label, prompt_ids, want, safe) -> list:
    import openai
    log(f"served: a coordinator and {tp} worker(s) on the device, {label}")
    coordinator = Coordinator(args, model_dir, args.out / f"served-tp{tp}-{collective}.log", tp, collective)
    try:
        client = openai.OpenAI(base_url=coordinator.url + "/v1", api_key="unused", timeout=120, max_retries=0)
        resp = client.completions.create(model=model_dir.name, prompt=prompt_ids, max_tokens=DECODE_STEPS,
                                         temperature=0, logprobs=1,
                                         extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        got = [int(t.split(":", 1)[1]) for t in resp.choices[0].logprobs.tokens]
        text = resp.choices[0].text
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=model_dir.name, prompt=prompt_ids, max_tokens=DECODE_STEPS, temperature=0, stream=True,
            extra_body={"ignore_eos": True}) if c.choices)
        with urllib.request.urlopen(coordinator.url + "/admin/status", timeout=30) as answer:
            members = json.load(answer)["workers"]
    finally:
        coordinator.stop()
    equal = got[:safe] == want[:safe]
    # Each rank's KV cache and its device's memory once loaded (on a GPU the cache is sized by
    # the rank from --gpu-memory-utilization of the GPU; on CPUs from the host's memory).
    gib = 1 << 30
    sized = all(m["kv_cache_bytes"] > 0 and m["device_total_bytes"] > 0 for m in members)
    memory = ", ".join(f"rank {m['rank']} {m['kv_cache_bytes'] / gib:.1f} GiB KV, "
                       f"{(m['device_total_bytes'] - m['device_free_bytes']) / gib:.1f}"
                       f"/{m['device_total_bytes'] / gib:.1f} GiB in use" for m in members)
    return [("served", f"{label}: KV cache and device memory per rank (caravanctl status)", memory,
             "> 0", sized),
            ("served", f"{label}: openai completion's tokens equal transformers' ({safe} before a near-tie)",
             str(equal), "True", equal and safe > 0),
            ("served", f"{label}: streamed text equals the whole completion", str(streamed == text), "True",
             streamed == text)]


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted once each)."""
    n = (1 << 30) if device.startswith("cuda") else (1 << 27)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    reps = 10
    for _ in range(reps):
        dst.copy_(src)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n * reps / (time.perf_counter() - t)


def served_decode(args, model_dir: Path, prompt, new: int, extra=()) -> float:
    """Single-stream bf16 greedy decode tok/s through the API at TP 1: (n - 1) tokens over the time
    from the first streamed token to the last (`logprobs` makes each token its own event), median
    of three after a warm-up."""
    import openai
    name = "-".join(["served"] + [flag.strip("-") for flag in extra])
    coordinator = Coordinator(args, model_dir, args.out / f"bench-{name}.log", 1, "auto", dtype="bf16",
                              extra=extra)
    try:
        client = openai.OpenAI(base_url=coordinator.url + "/v1", api_key="unused", timeout=600, max_retries=0)

        def once():
            times = []
            for chunk in client.completions.create(model=model_dir.name, prompt=prompt, max_tokens=new,
                                                   temperature=0, stream=True, logprobs=1,
                                                   extra_body={"ignore_eos": True}):
                if chunk.choices and chunk.choices[0].finish_reason is None:
                    times.append(time.perf_counter())
            return (len(times) - 1) / (times[-1] - times[0])

        once()
        return statistics.median(once() for _ in range(3))
    finally:
        coordinator.stop()


def check_bench(args, model_dir: Path) -> list:
    """bf16 decode against transformers and the bandwidth bound; 32 streams; a 512-token prefill."""
    gen = torch.Generator().manual_seed(9)
    prompt = [1] + torch.randint(3, VOCAB, (31,), generator=gen).tolist()
    new = 64
    log("bench: caravan-generate bf16, one stream")
    one = report(run(generate_cmd(args, model_dir, [prompt], new, "bf16"), env=args.env))
    ours = one["decode_tokens"] / (one["decode_ms"] / 1e3)
    log("bench: caravan-generate bf16, 32 streams")
    prompts = [[1] + torch.randint(3, VOCAB, (31,), generator=gen).tolist() for _ in range(32)]
    many = report(run(generate_cmd(args, model_dir, prompts, new, "bf16"), env=args.env))
    batch = many["decode_tokens"] / (many["decode_ms"] / 1e3)
    log("bench: caravan-generate bf16, a 512-token prompt")
    long_prompt = [1] + torch.randint(3, VOCAB, (511,), generator=gen).tolist()
    prefill = report(run(generate_cmd(args, model_dir, [long_prompt], 2, "bf16"), env=args.env))

    log("bench: transformers bf16 generate, one stream")
    model = hf_model(model_dir, args.device, torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.tensor([prompt], device=args.device)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        if args.device_kind == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        if args.device_kind == "cuda":
            torch.cuda.synchronize()
        hf = new / (time.perf_counter() - t)
    del model
    bandwidth = copy_bandwidth(args.device)
    bound = bandwidth / weight_bytes
    log("bench: served bf16 decode through the API, synchronous and with --async-scheduling")
    served_sync = served_decode(args, model_dir, prompt, new)
    served_async = served_decode(args, model_dir, prompt, new, ("--async-scheduling",))
    return [
        ("bench", "single-stream bf16 decode, tok/s (caravan-generate)", f"{ours:.1f}", "", True),
        ("bench", "  against transformers bf16 generate on the same device",
         f"{ours / hf:.2f}x ({hf:.1f} tok/s)", ">= 3x on a GPU", True),
        ("bench", "  against the bandwidth bound (weights / copy bandwidth)",
         f"{ours / bound:.0%} ({bound:.1f} tok/s, {bandwidth / 1e9:.0f} GB/s)", ">= 85% on a GPU", True),
        ("bench", "32 streams, decode tok/s", f"{batch:.1f} ({batch / ours:.1f}x one stream)", ">= 15x on a GPU",
         True),
        ("bench", "512-token prompt, prefill ms (TTFT less the first decode)", f"{prefill['prefill_ms']:.1f}", "",
         True),
        ("bench", "served single-stream bf16 decode through the API, tok/s",
         f"{served_sync:.1f} ({served_sync / ours:.2f}x caravan-generate)", ">= 0.97x on a GPU", True),
        ("bench", "  the same with --async-scheduling",
         f"{served_async:.1f} ({served_async / ours:.2f}x caravan-generate)", ">= 0.97x on a GPU", True),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--bin-dir", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True, help="folder with the Llama 2 tokenizer.json")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--size", default="7b", choices=list(SHAPES))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.device_kind = args.device
    args.device = "cuda:0" if args.device == "cuda" else "cpu"
    args.device_arg = args.device
    args.env = dict(os.environ)
    if args.device_kind == "cpu":
        args.env["CARAVAN_CPU_KERNELS"] = "off"  # the libtorch path a GPU runs
    if args.device_kind == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: --device cuda, but torch sees no GPU")
    started = time.monotonic()
    small = write_checkpoint(args.out / "model-small-f32", "small", torch.float32, args.tokenizer, seed=3,
                             peaked=True)
    rows = []
    for name, check, model in (("golden", check_golden, small), ("served", check_served, small)):
        try:
            rows += check(args, model)
        except Exception as e:  # a check that cannot run is a failed row, the others still run
            rows.append((name, f"could not run: {str(e).splitlines()[0][:200]}", "", "", False))
            log(f"{name} failed: {e}")
    log(f"bench: writing the {args.size} bf16 checkpoint")
    bench = write_checkpoint(args.out / f"model-{args.size}-bf16", args.size, torch.bfloat16, args.tokenizer, seed=4)
    try:
        rows += check_bench(args, bench)
    except Exception as e:
        rows.append(("bench", f"could not run: {str(e).splitlines()[0][:200]}", "", "", False))
        log(f"bench failed: {e}")

    device_name = torch.cuda.get_device_name(0) if args.device_kind == "cuda" else "cpu"
    table = [f"gpu_check on {device_name} ({args.size} bench model, torch {torch.__version__}), "
             f"{time.monotonic() - started:.0f} s", "",
             "| check | what | measured | goal | ok |", "|---|---|---|---|---|"]
    table += [f"| {c} | {w} | {m} | {g} | {'yes' if ok else 'NO'} |" for c, w, m, g, ok in rows]
    text = "\n".join(table) + "\n"
    (args.out / "gpu_check.md").write_text(text)
    print(text)
    sys.exit(0 if all(r[4] for r in rows) else 1)


if __name__ == "__main__":
    main()
