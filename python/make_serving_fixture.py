#!/usr/bin/env python3
"""A small random-weight Llama 2 checkpoint with a real tokenizer, and reference completions from transformers.

The end-to-end API tests (tests/python) start caravan-coordinator on this folder and compare what the
OpenAI-compatible API returns with what Hugging Face transformers computes here. The reference is
transformers (AutoTokenizer + LlamaForCausalLM, float32, `generate` greedy with max_new_tokens=16,
stopping at EOS), never Caravan's own code. --out DIR receives:

  config.json, generation_config.json, model.safetensors   save_pretrained of LlamaForCausalLM
  tokenizer.json, tokenizer_config.json, special_tokens_map.json   copied from --tokenizer DIR
  reference.json   per text prompt and per chat conversation (and per prompt of "batch", 32 prompts
                   of 3 to ~300 tokens with their own max_tokens, the first 8 sharing a long prefix):
      prompt_ids       the prompt's token ids (BOS first; for chats, apply_chat_template's ids)
      gen_ids          greedy token ids (EOS included when generation stopped on it)
      logprobs         log_softmax of the f32 logits at each step, for the chosen token
      top_logprobs     the 5 best [token id, logprob] pairs at each step, best first
      text             decode(prompt_ids + gen_ids)[len(decode(prompt_ids)):], skip_special_tokens
      finish_reason    "stop" when EOS was generated, else "length"
      log_p_greedy_t08 log-probability that sampling at temperature 0.8 reproduces gen_ids exactly
    plus min_top2_margin, the smallest top-1/top-2 logit gap over all greedy steps.

The weight seed is the first one (from 0) for which every greedy choice has a top-2 logit margin above
1e-3 (so float reordering across tensor-parallel shards cannot flip it), no generated token is a special
token other than a final EOS, and no reference text holds U+FFFD (a dangling byte-fallback token), so
the expected text of every case is unambiguous.

Usage:
  python/make_serving_fixture.py --tokenizer fixtures/serving-tokenizer --out fixtures/serving

The output is keyed by a hash of this file, the torch, transformers and tokenizers versions and the tokenizer
files, so re-running is instant when nothing changed.
"""
import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile

# torch and transformers are imported in build(): the up-to-date check stays instant.

VOCAB = 32000
CONTEXT = 512
MAX_NEW_TOKENS = 16
TOP_LOGPROBS = 5
MIN_MARGIN = 1e-3
SEEDS = range(0, 64)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
BOS, EOS = 1, 2

PROMPTS = [
    "Hello world",
    "The capital of France is",
    "   leading spaces,  and   runs of    spaces",
    "Grüße aus Köln 🦙",
    "def fibonacci(n):\n    return",
    "Once upon a time, in a small village nestled between rolling hills and a quiet river, there "
    "lived an old clockmaker who spent his days repairing the pocket watches of travellers.",
]

CHATS = [
    [
        {"role": "system", "content": "You are a helpful assistant who answers briefly."},
        {"role": "user", "content": "What is the tallest mountain in the world?"},
    ],
    [
        {"role": "user", "content": "Hi! Can you recommend a book?"},
        {"role": "assistant", "content": "Sure: try \"The Hobbit\"."},
        {"role": "user", "content": "Why that one?"},
    ],
]


BATCH_SIZE = 32
BATCH_SHARED = 8
BATCH_CANDIDATES = 120
SHARED_PREFIX = (
    "You are a careful assistant for a caravan company. Answer in one short sentence, name the "
    "route when you know it, and say when you are unsure. Routes: the salt road from Taoudenni to "
    "Timbuktu, the incense road from Dhofar to Gaza, and the silk road from Chang'an to Samarkand. "
    "Question:"
)
WORDS = (
    "caravan camel desert oasis route trade salt silk spice water well dune night star guide map "
    "market city gate road tent fire river mountain valley wind sand journey merchant goods price "
    "the a of and to in on with from under over before after quickly slowly always never today "
    "tomorrow yesterday north south east west big small old new red blue green golden silver"
).split()


def make_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        # Wider than the default 0.02 so logits spread and greedy choices are not near-ties.
        initializer_range=0.08,
        bos_token_id=BOS,
        eos_token_id=EOS,
        torch_dtype="float32",
    )


def continuation_text(tok, prompt_ids, gen_ids) -> str:
    prefix = tok.decode(prompt_ids, skip_special_tokens=True)
    full = tok.decode(prompt_ids + gen_ids, skip_special_tokens=True)
    assert full.startswith(prefix), f"decode is not prefix-stable: {prefix!r} vs {full!r}"
    return full[len(prefix):]


def greedy_reference(model, tok, prompt_ids, max_new_tokens=MAX_NEW_TOKENS):
    """transformers' greedy generation for one prompt, or (None, why) when it is unusable as a reference."""
    import torch

    input_ids = torch.tensor([prompt_ids], dtype=torch.int64)
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=EOS,
        pad_token_id=EOS,
        return_dict_in_generate=True,
        output_logits=True,
    )
    gen_ids = out.sequences[0, len(prompt_ids):].tolist()
    logits = torch.cat([step.float() for step in out.logits])  # [steps, V], raw (unprocessed)
    assert logits.shape[0] == len(gen_ids)
    assert logits.argmax(-1).tolist() == gen_ids, "generate's choice is not the argmax of its logits"

    # Sanity: a teacher-forced full forward pass gives the same logits as generate's cached decode.
    full = model(torch.tensor([prompt_ids + gen_ids[:-1]])).logits[0, len(prompt_ids) - 1:].float()
    assert (full - logits).abs().max() < 1e-4, "transformers' cached and uncached logits disagree"

    logprobs = torch.log_softmax(logits, -1)
    top2 = logits.topk(2, dim=-1).values
    margin = float((top2[:, 0] - top2[:, 1]).min())
    top = logprobs.topk(TOP_LOGPROBS, dim=-1)
    chosen = logprobs.gather(1, torch.tensor(gen_ids)[:, None])[:, 0]
    log_p_t08 = float(torch.log_softmax(logits / 0.8, -1).gather(1, torch.tensor(gen_ids)[:, None]).sum())
    text = continuation_text(tok, prompt_ids, gen_ids)

    problems = []
    if margin <= MIN_MARGIN:
        problems.append(f"top-2 margin {margin:.2e}")
    if any(t in (0, 1, 2) for t in gen_ids[:-1]) or gen_ids[-1] in (0, 1):
        problems.append(f"special token generated: {gen_ids}")
    if "\ufffd" in text:
        problems.append(f"U+FFFD in {text!r}")
    if problems:
        return None, "; ".join(problems)
    return {
        "prompt_ids": prompt_ids,
        "gen_ids": gen_ids,
        "logprobs": chosen.tolist(),
        "top_logprobs": [
            [[int(i), float(v)] for i, v in zip(ids, vals)]
            for ids, vals in zip(top.indices.tolist(), top.values.tolist())
        ],
        "text": text,
        "finish_reason": "stop" if gen_ids[-1] == EOS else "length",
        "log_p_greedy_t08": log_p_t08,
        "min_top2_margin": margin,
    }, None


def batch_prompts():
    """Candidate prompts for the batching tests, deterministic: the first BATCH_SHARED share a long
    common prefix (several KV-cache blocks); the rest vary in length from a few tokens to a few
    hundred, so chunked prefill, decode and preemption all meet in one batch."""
    import random

    lengths = [3, 7, 12, 20, 35, 60, 90, 140, 200, 260]
    for k in range(BATCH_CANDIDATES):
        rng = random.Random(k)
        end = rng.choice([".", "?", ",", ""])
        if k < BATCH_SHARED * 3:  # spare candidates in case some fail the checks
            text = SHARED_PREFIX + " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
        else:
            text = " ".join(rng.choice(WORDS) for _ in range(lengths[k % len(lengths)])).capitalize()
        yield k, text + end, [4, 8, 12, 20][k % 4]


def batch_references(model, tok):
    shared, others = [], []
    for k, text, max_new in batch_prompts():
        ids = list(tok(text)["input_ids"])
        if len(ids) + max_new > CONTEXT:
            continue
        ref, why = greedy_reference(model, tok, ids, max_new)
        if ref is None:
            continue
        case = {"kind": "text", "prompt": text, "max_tokens": max_new, **ref}
        if text.startswith(SHARED_PREFIX) and len(shared) < BATCH_SHARED:
            shared.append(case)
        elif not text.startswith(SHARED_PREFIX) and len(others) < BATCH_SIZE - BATCH_SHARED:
            others.append(case)
    if len(shared) < BATCH_SHARED or len(others) < BATCH_SIZE - BATCH_SHARED:
        sys.exit(f"only {len(shared)} + {len(others)} usable batch prompts")
    return shared + others


def chat_prompt_ids(tok, messages):
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    ids = list(ids)
    assert ids[0] == BOS and ids.count(BOS) == sum(m["role"] == "user" for m in messages), ids
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "[INST]" in rendered and rendered.rstrip().endswith("[/INST]"), rendered
    return ids, rendered


def build(tokenizer_dir: str, out: str) -> dict:
    import torch
    import transformers
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.set_grad_enabled(False)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cases = []
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        assert ids[0] == BOS and len(ids) < CONTEXT - MAX_NEW_TOKENS
        cases.append({"kind": "text", "prompt": text, "prompt_ids": list(ids)})
    for messages in CHATS:
        ids, rendered = chat_prompt_ids(tok, messages)
        cases.append({"kind": "chat", "messages": messages, "rendered": rendered, "prompt_ids": ids})

    for seed in SEEDS:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(make_config()).eval()
        results, why = [], None
        for case in cases:
            ref, why = greedy_reference(model, tok, case["prompt_ids"])
            if ref is None:
                break
            results.append({**case, **ref})
        if why is None:
            break
        print(f"seed {seed} rejected: {why}", file=sys.stderr)
    else:
        sys.exit(f"no seed in {SEEDS} gives a usable reference")

    batch = batch_references(model, tok)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(tokenizer_dir, name), out)
    reference = {
        "generator": "transformers LlamaForCausalLM, float32, greedy generate",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "seed": seed,
        "context": CONTEXT,
        "max_new_tokens": MAX_NEW_TOKENS,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "min_top2_margin": min(r["min_top2_margin"] for r in results),
        "completions": [r for r in results if r["kind"] == "text"],
        "chats": [r for r in results if r["kind"] == "chat"],
        # 32 prompts with their own max_tokens; the first 8 share SHARED_PREFIX.
        "batch": batch,
        "shared_prefix": SHARED_PREFIX,
    }
    with open(os.path.join(out, "reference.json"), "w", encoding="utf-8") as f:
        json.dump(reference, f, ensure_ascii=False, indent=1)
        f.write("\n")
    return reference


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True, help="folder with tokenizer.json and tokenizer_config.json")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args()

    h = hashlib.sha256()
    with open(__file__, "rb") as f:
        h.update(f.read())
    for package in ("torch", "transformers", "tokenizers"):
        h.update(package.encode() + b"=" + importlib.metadata.version(package).encode() + b"\0")
    for name in TOKENIZER_FILES:
        path = os.path.join(args.tokenizer, name)
        if not os.path.isfile(path):
            sys.exit(f"error: {path} not found (build it with python/build_tokenizer.py --out DIR)")
        with open(path, "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    version = h.hexdigest()[:16]
    stamp = os.path.join(args.out, "VERSION")
    if os.path.exists(stamp) and open(stamp).read().strip() == version:
        print(f"serving fixture up to date in {args.out}", file=sys.stderr)
        return

    out = os.path.abspath(args.out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    # Build next to the destination and swap it in, so an interrupted run never leaves a half folder.
    stage = tempfile.mkdtemp(prefix=".serving-", dir=parent)
    try:
        reference = build(args.tokenizer, stage)
        with open(os.path.join(stage, "VERSION"), "w") as f:
            f.write(version + "\n")
        os.chmod(stage, 0o755)  # mkdtemp makes it 0700
        for name in os.listdir(stage):
            os.chmod(os.path.join(stage, name), 0o644)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)

    for r in reference["completions"] + reference["chats"]:
        print(f"{r['kind']:4} prompt {len(r['prompt_ids']):3} tokens -> {len(r['gen_ids'])} "
              f"({r['finish_reason']}): {r['text']!r}", file=sys.stderr)
    print(f"seed {reference['seed']}, min top-2 margin {reference['min_top2_margin']:.3e}; wrote {out}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
