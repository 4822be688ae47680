#!/usr/bin/env python3
"""Small random-weight Llama 2 checkpoints and their golden outputs from Hugging Face transformers.

Caravan's golden tests compare its tensor-parallel forward pass against these files. The reference
is transformers' LlamaForCausalLM, never Caravan's own code. For every attention shape (MHA, GQA with
two KV heads, MQA) this writes a Hugging Face folder and `golden.safetensors` with, per prompt:

  p{i}.prompt          int64 [P]      the prompt's token ids (BOS first)
  p{i}.prefill_logits  f32   [P, V]   logits of the prompt's forward pass
  p{i}.tokens          int64 [17]     greedy tokens: one from the prefill, then one per decode step
  p{i}.decode_logits   f32   [16, V]  logits of 16 single-token decode steps using the KV cache
  p{i}.bf16_logits     f32   [P+16, V] transformers' own bf16 logits for prompt + tokens[:16]
                                     (teacher forced), to state the bf16 tolerance against

It also writes deliberately broken checkpoints for the loader's error tests. The output is keyed by
a hash of this file, so re-running is instant when nothing changed.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 32000
DECODE_STEPS = 16
SHAPES = {
    # name: (query heads, kv heads)
    "mha": (8, 8),
    "gqa": (8, 2),
    "mqa": (8, 1),
}
PROMPT_LENGTHS = (7, 12)


def make_config(kv_heads: int, heads: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        # A wider init than the default 0.02 spreads the logits, so greedy choices are not near-ties
        # that float rounding could flip; the script checks the margin below.
        initializer_range=0.08,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    )


@torch.no_grad()
def golden_for_prompt(model: LlamaForCausalLM, model_bf16: LlamaForCausalLM, prompt: torch.Tensor):
    out = model(prompt[None], use_cache=True)
    prefill_logits = out.logits[0].float()
    cache = out.past_key_values
    tokens = [int(prefill_logits[-1].argmax())]
    decode_logits = []
    margins = [top2_margin(prefill_logits[-1])]
    for step in range(DECODE_STEPS):
        pos = prompt.numel() + step
        step_out = model(
            torch.tensor([[tokens[-1]]]),
            past_key_values=cache,
            use_cache=True,
            position_ids=torch.tensor([[pos]]),
        )
        cache = step_out.past_key_values
        logits = step_out.logits[0, -1].float()
        decode_logits.append(logits)
        margins.append(top2_margin(logits))
        tokens.append(int(logits.argmax()))
    # Sanity: the cached decode agrees with a full recompute of the same sequence.
    full = model(torch.cat([prompt, torch.tensor(tokens[:DECODE_STEPS])])[None]).logits[0]
    cached = torch.cat([prefill_logits, torch.stack(decode_logits)])
    assert (full - cached).abs().max() < 1e-4, "transformers' cached and uncached logits disagree"
    teacher = torch.cat([prompt, torch.tensor(tokens[:DECODE_STEPS])])[None]
    bf16_logits = model_bf16(teacher).logits[0].float()
    return {
        "prompt": prompt.clone(),
        "prefill_logits": prefill_logits.contiguous(),
        "tokens": torch.tensor(tokens, dtype=torch.int64),
        "decode_logits": torch.stack(decode_logits).contiguous(),
        "bf16_logits": bf16_logits.contiguous(),
    }, min(margins)


def top2_margin(logits: torch.Tensor) -> float:
    top = logits.topk(2).values
    return float(top[0] - top[1])


def write_broken_checkpoints(good: str, out: str):
    """Copies of `good` with one defect each, for the loader's error messages."""
    weights = load_file(os.path.join(good, "model.safetensors"))

    def variant(name: str, mutate):
        path = os.path.join(out, name)
        os.makedirs(path, exist_ok=True)
        for f in os.listdir(good):
            if not f.endswith(".safetensors"):
                shutil.copy(os.path.join(good, f), path)
        tensors = dict(weights)
        mutate(tensors)
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})

    variant("bad-missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    variant(
        "bad-shape",
        lambda t: t.__setitem__(
            "model.layers.0.self_attn.k_proj.weight", torch.zeros(48, 128, dtype=torch.float32)
        ),
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args()
    with open(__file__, "rb") as f:
        version = hashlib.sha256(f.read() + torch.__version__.encode()).hexdigest()[:16]
    stamp = os.path.join(args.out, "VERSION")
    if os.path.exists(stamp) and open(stamp).read().strip() == version:
        print(f"fixtures up to date in {args.out}", file=sys.stderr)
        return
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    for index, (name, (heads, kv_heads)) in enumerate(SHAPES.items()):
        torch.manual_seed(1000 + index)
        model = LlamaForCausalLM(make_config(kv_heads, heads)).eval()
        folder = os.path.join(args.out, name)
        # The GQA checkpoint is sharded with an index, like real 7B+ checkpoints.
        shard = "5MB" if name == "gqa" else "1GB"
        model.save_pretrained(folder, safe_serialization=True, max_shard_size=shard)
        model_bf16 = LlamaForCausalLM(make_config(kv_heads, heads)).eval()
        model_bf16.load_state_dict(model.state_dict())
        model_bf16 = model_bf16.to(torch.bfloat16)

        gen = torch.Generator().manual_seed(7 + index)
        golden = {}
        worst = float("inf")
        for i, length in enumerate(PROMPT_LENGTHS):
            body = torch.randint(3, VOCAB, (length - 1,), generator=gen)
            prompt = torch.cat([torch.tensor([1]), body]).to(torch.int64)
            tensors, margin = golden_for_prompt(model, model_bf16, prompt)
            worst = min(worst, margin)
            golden.update({f"p{i}.{k}": v for k, v in tensors.items()})
        # A greedy choice closer than this could flip under legitimate float reordering.
        assert worst > 1e-3, f"{name}: top-2 logit margin {worst:.2e} is too small for a golden test"
        save_file(golden, os.path.join(folder, "golden.safetensors"))
        with open(os.path.join(folder, "golden.json"), "w") as f:
            json.dump({"min_top2_margin": worst, "prompts": len(PROMPT_LENGTHS)}, f)
        print(f"{name}: heads={heads} kv_heads={kv_heads} min top-2 margin {worst:.3e}", file=sys.stderr)

    write_broken_checkpoints(os.path.join(args.out, "mha"), args.out)
    with open(stamp, "w") as f:
        f.write(version + "\n")


if __name__ == "__main__":
    main()
