#!/usr/bin/env python3
"""Writes a random-weight Llama-2-shaped Hugging Face checkpoint, for demos and benchmarks.

Presets:
  tiny        hidden 256, 4 layers, 8 heads, 2 KV heads, MLP 688      (~18M parameters)
  tiny-mha    the same with 8 KV heads (multi-head), to convert to GQA
  bench-150m  hidden 1024, 8 layers, 16 heads, 4 KV heads, MLP 2816   (~150M, the benchmark shape)
  7b          hidden 4096, 32 layers, 32 heads, MLP 11008             (Llama-2-7B's shape)

With --tokenizer DIR (a folder from python/build_tokenizer.py), the tokenizer files are copied in,
which makes the folder servable by caravan-coordinator.

Idempotent: a folder whose config already matches is left alone.
"""
import argparse
import json
import os
import shutil
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PRESETS = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, intermediate_size=688),
    "tiny-mha": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=8, intermediate_size=688),
    "bench-150m": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                       num_key_value_heads=4, intermediate_size=2816),
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, intermediate_size=11008),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", choices=PRESETS, default="tiny")
    ap.add_argument("--dtype", choices=DTYPES, default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", help="folder with tokenizer.json to copy into the checkpoint")
    args = ap.parse_args()
    if args.tokenizer:
        copy_tokenizer(args.tokenizer, args.out)

    shape = PRESETS[args.preset]
    wanted = dict(shape, vocab_size=32000, seed=args.seed, dtype=args.dtype)
    stamp = os.path.join(args.out, "caravan-checkpoint.json")
    if os.path.exists(stamp) and json.load(open(stamp)) == wanted:
        print(f"checkpoint up to date in {args.out}", file=sys.stderr)
        return
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=2, initializer_range=0.02, **shape)
    print(f"writing {args.preset} checkpoint to {args.out}", file=sys.stderr)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(DTYPES[args.dtype]).eval()
    model.save_pretrained(args.out, safe_serialization=True, max_shard_size="2GB")
    # Readable by other users (e.g. non-root pods mounting the folder); save_pretrained may
    # write 0600 files.
    for name in os.listdir(args.out):
        os.chmod(os.path.join(args.out, name), 0o644)
    with open(stamp, "w") as f:
        json.dump(wanted, f)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def copy_tokenizer(src, out):
    os.makedirs(out, exist_ok=True)
    for name in TOKENIZER_FILES:
        path = os.path.join(src, name)
        if not os.path.isfile(path):
            sys.exit(f"error: {path} not found (build it with python/build_tokenizer.py --out {src})")
        shutil.copyfile(path, os.path.join(out, name))


if __name__ == "__main__":
    main()
