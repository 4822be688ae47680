#!/usr/bin/env python3
"""A llama.cpp GGUF file of a Llama-architecture model -> a Hugging Face checkpoint folder that
Caravan (and transformers) serve.

  config.json               from the GGUF's llama.* metadata (tied embeddings when there is no
                            output.weight)
  model.safetensors         every tensor dequantized to f32 (Q4_0/Q4_1/Q8_0/... through the `gguf`
                            package's reference dequantizers), llama.cpp's q/k row permutation
                            undone, renamed to transformers' names
  tokenizer.json            rebuilt from tokenizer.ggml.* (byte-level BPE: vocabulary, merges,
                            special tokens, and the pre-tokenizer tokenizer.ggml.pre names)
  tokenizer_config.json     special tokens and tokenizer.chat_template
  special_tokens_map.json, generation_config.json
  CONVERTED                 the GGUF's sha256 and this converter's version: a rerun on the same
                            file is a no-op

Only what Llama-architecture GGUFs with a byte-level BPE ("gpt2") vocabulary need is
implemented; anything else is refused with a message naming it.

Usage: python/convert_gguf.py --gguf FILE.gguf --out DIR
"""
import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGMLQuantizationType
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

CONVERTER_VERSION = 1
# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4
# Pre-tokenizers of byte-level BPE vocabularies, by tokenizer.ggml.pre: what the model's own
# tokenizer.json splits before ByteLevel (llama.cpp's LLAMA_VOCAB_PRE_TYPE_* regexes).
PRE_TOKENIZERS = {
    # SmolLM / SmolLM2: every digit on its own, then GPT-2's byte-level split.
    "smollm": lambda: [pre_tokenizers.Digits(individual_digits=True)],
    "gpt2": lambda: [],
}


def log(msg):
    print(f"[convert_gguf] {msg}", file=sys.stderr, flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def field(reader: GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            sys.exit(f"convert_gguf: the GGUF has no {key}")
        return default
    return f.contents()


def config_from(reader: GGUFReader, vocab_size: int, tied: bool) -> dict:
    arch = field(reader, "general.architecture")
    if arch != "llama":
        sys.exit(f"convert_gguf: general.architecture is {arch!r}; only 'llama' is converted")
    heads = int(field(reader, "llama.attention.head_count"))
    hidden = int(field(reader, "llama.embedding_length"))
    head_dim = int(field(reader, "llama.rope.dimension_count", hidden // heads))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(field(reader, "llama.context_length")),
        # The GGUF stores f32; written as that f32's exact value, as transformers reads it.
        "rms_norm_eps": float(field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field(reader, "llama.rope.freq_base", 10000.0)),
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": int(field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(field(reader, "tokenizer.ggml.padding_token_id",
                                  field(reader, "tokenizer.ggml.eos_token_id"))),
        "torch_dtype": "float32",
    }


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's convert_hf_to_gguf `permute` of q/k rows (its rotary pairs are
    interleaved; transformers' are split in halves)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4:
        layer, kind = parts[1], parts[2]
        names = {
            "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
            "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj",
        }
        if kind in names:
            return f"model.layers.{layer}.{names[kind]}.{parts[3]}"
    sys.exit(f"convert_gguf: unknown tensor {gguf_name!r}")


def weights(reader: GGUFReader, config: dict) -> dict:
    out = {}
    total = len(reader.tensors)
    for i, t in enumerate(reader.tensors):
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
            data = dequantize(t.data, t.tensor_type) if t.tensor_type == GGMLQuantizationType.BF16 else t.data
            w = np.asarray(data, dtype=np.float32).reshape(shape)
        else:
            w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        if t.name.endswith("attn_q.weight"):
            w = unpermute(w, config["num_attention_heads"])
        elif t.name.endswith("attn_k.weight"):
            w = unpermute(w, config["num_key_value_heads"])
        out[tensor_name(t.name)] = np.ascontiguousarray(w)
        if (i + 1) % 30 == 0 or i + 1 == total:
            log(f"dequantized {i + 1}/{total} tensors")
    return out


def tokenizer_from(reader: GGUFReader) -> tuple:
    """tokenizer.json (a `tokenizers` Tokenizer) and the special tokens' texts."""
    kind = field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        sys.exit(f"convert_gguf: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is converted")
    pre = field(reader, "tokenizer.ggml.pre", "gpt2")
    if pre not in PRE_TOKENIZERS:
        sys.exit(f"convert_gguf: tokenizer.ggml.pre {pre!r} is not known here (known: {sorted(PRE_TOKENIZERS)})")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                     byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        PRE_TOKENIZERS[pre]() + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, ty in enumerate(types) if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
    tok.add_special_tokens(special)
    names = {}
    for name, key in [("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")]:
        f = reader.fields.get(f"tokenizer.ggml.{key}")
        if f is not None:
            names[name] = tokens[int(f.contents())]
    return tok, names, [t.content for t in special]


def convert(gguf_path: Path, out: Path):
    digest = sha256(gguf_path)
    stamp = {"gguf_sha256": digest, "converter_version": CONVERTER_VERSION}
    stamp_path = out / "CONVERTED"
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        log(f"{out} already holds {gguf_path.name} (sha256 {digest[:12]}); nothing to do")
        return
    reader = GGUFReader(gguf_path)
    tensors = {t.name for t in reader.tensors}
    tokens = field(reader, "tokenizer.ggml.tokens")
    config = config_from(reader, len(tokens), tied="output.weight" not in tensors)
    log(f"{gguf_path.name}: {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
        f"{config['num_attention_heads']} heads / {config['num_key_value_heads']} KV heads, vocab {len(tokens)}")
    state = weights(reader, config)
    tok, special, specials = tokenizer_from(reader)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok.save(str(tmp / "tokenizer.json"))
    tokenizer_config = {
        **special,
        "add_bos_token": bool(field(reader, "tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
        "additional_special_tokens": [t for t in specials if t not in special.values()],
    }
    template = reader.fields.get("tokenizer.chat_template")
    if template is not None:
        tokenizer_config["chat_template"] = template.contents()
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (tmp / "CONVERTED").write_text(json.dumps(stamp) + "\n")
    if out.exists():
        for p in out.iterdir():
            p.unlink()
        out.rmdir()
    os.replace(tmp, out)
    out.chmod(0o755)
    for p in out.iterdir():
        p.chmod(0o644)
    log(f"wrote {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    convert(args.gguf, args.out)


if __name__ == "__main__":
    main()
