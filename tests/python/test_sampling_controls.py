"""vLLM's and OpenAI's sampling controls on the served path (TP 1 and 2, the random-weight Llama 2
fixture, real workers), each against transformers' own logits processors in `generate`:

- `repetition_penalty` as transformers' `repetition_penalty` (over prompt and output);
- `logit_bias` as `sequence_bias` (a ban moves greedy to another token, +100 forces one);
- `min_tokens` as `min_new_tokens` (end-of-sequence held back, here made the likeliest token);
- `stop_token_ids`: the completion ends at the token (finish reason `stop`), which is not shown;
- bad values are 400s naming the field, and the server goes on serving.
"""
import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import continuation_text, hf_greedy
from test_batching import Served

PROMPT = "The old lighthouse keeper climbed the stairs and"
EOS = 2
NEW = 16


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def served(request, checkpoint):
    s = Served(checkpoint, tp=request.param)
    yield s
    s.close()


@pytest.fixture(scope="module")
def hf(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(checkpoint)


def prompt_ids(tokenizer):
    return tokenizer(PROMPT).input_ids


def complete(served, **fields):
    body = {"model": served.model, "prompt": PROMPT, "temperature": 0, "max_tokens": NEW, **fields}
    r = served.http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def assert_follows(choice_text, tokenizer, ids, tokens, safe, label):
    assert safe >= 4, f"{label}: transformers' margins are too thin to compare ({safe} tokens)"
    want = continuation_text(tokenizer, ids, tokens[:safe])
    assert choice_text.startswith(want), f"{label}: {choice_text!r} does not start with {want!r}"


def test_repetition_penalty_matches_transformers(served, hf):
    model, tokenizer = hf
    ids = prompt_ids(tokenizer)
    plain, _ = hf_greedy(model, ids, NEW)
    tokens, safe = hf_greedy(model, ids, NEW, repetition_penalty=1.3)
    assert tokens != plain, "the penalty changes nothing on this prompt: the test proves nothing"
    out = complete(served, repetition_penalty=1.3, ignore_eos=True)
    assert_follows(out["choices"][0]["text"], tokenizer, ids, tokens, safe, "repetition_penalty 1.3")


def test_logit_bias_bans_and_forces_as_transformers_sequence_bias(served, hf):
    model, tokenizer = hf
    ids = prompt_ids(tokenizer)
    plain, _ = hf_greedy(model, ids, NEW)
    banned = plain[0]
    tokens, safe = hf_greedy(model, ids, NEW, sequence_bias={(banned,): -100.0})
    assert tokens[0] != banned
    out = complete(served, logit_bias={str(banned): -100}, ignore_eos=True)
    assert_follows(out["choices"][0]["text"], tokenizer, ids, tokens, safe, f"ban {banned}")
    # +100 all but forces a token at every step; the log-probability stays the model's own.
    forced = 450
    out = complete(served, logit_bias={str(forced): 100}, max_tokens=6, logprobs=1)
    lp = out["choices"][0]["logprobs"]
    want = continuation_text(tokenizer, ids, [forced] * 6)
    assert out["choices"][0]["text"] == want, (out["choices"][0]["text"], want)
    assert all(v < -1.0 for v in lp["token_logprobs"]), lp["token_logprobs"]
    # The chat endpoint takes it too.
    chat = served.http.post("/v1/chat/completions", json={
        "model": served.model, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0,
        "max_tokens": 3, "logit_bias": {str(forced): 100}}).json()
    assert chat["choices"][0]["message"]["content"].lstrip() == tokenizer.decode([forced] * 3), chat


def test_min_tokens_holds_back_end_of_sequence_as_transformers_min_new_tokens(served, hf):
    model, tokenizer = hf
    ids = prompt_ids(tokenizer)
    # End-of-sequence made the likeliest token: without min_tokens the completion is empty.
    bias = {"logit_bias": {str(EOS): 100}}
    out = complete(served, **bias)
    assert out["choices"][0]["finish_reason"] == "stop" and out["usage"]["completion_tokens"] == 1, out
    tokens, safe = hf_greedy(model, ids, NEW, sequence_bias={(EOS,): 100.0}, min_new_tokens=5)
    assert tokens[:6] == tokens[:5] + [EOS] and EOS not in tokens[:5], tokens
    out = complete(served, min_tokens=5, **bias)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop" and out["usage"]["completion_tokens"] == 6, out
    assert choice["text"] == continuation_text(tokenizer, ids, tokens[:5]) or safe < 5, (choice, tokens)


def test_stop_token_ids_end_the_completion_without_showing_the_token(served, hf):
    model, tokenizer = hf
    ids = prompt_ids(tokenizer)
    tokens, safe = hf_greedy(model, ids, NEW)
    assert safe >= 6, safe
    at = next(i for i in range(2, 6) if tokens[i] not in tokens[:i])
    out = complete(served, stop_token_ids=[tokens[at]])
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert out["usage"]["completion_tokens"] == at + 1, out
    assert choice["text"] == continuation_text(tokenizer, ids, tokens[:at]), (choice, at)
    # With min_tokens past it, the stop token is held back, so the completion runs longer.
    out = complete(served, stop_token_ids=[tokens[at]], min_tokens=at + 2, ignore_eos=True)
    assert out["usage"]["completion_tokens"] >= at + 2, out


@pytest.mark.parametrize("fields,param", [
    ({"logit_bias": {"abc": 5}}, "logit_bias"),
    ({"logit_bias": {"450": 101}}, "logit_bias"),
    ({"logit_bias": {"32000": 1}}, "logit_bias"),
    ({"logit_bias": {"450": "high"}}, "logit_bias"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": 20}, "min_tokens"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_bad_sampling_controls_are_400s(served, fields, param):
    body = {"model": served.model, "prompt": PROMPT, "max_tokens": NEW, **fields}
    r = served.http.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
    assert served.http.post("/v1/completions", json={"model": served.model, "prompt": PROMPT,
                                                     "max_tokens": 2}).status_code == 200


def test_tokens_as_token_ids(served, hf):
    """vLLM's `return_tokens_as_token_ids`: `token_id:N` in place of each token's text, the ids
    transformers' tokenizer gives the prompt and greedy decoding gives the completion."""
    model, tokenizer = hf
    ids = prompt_ids(tokenizer)
    tokens, safe = hf_greedy(model, ids, 4)
    assert safe >= 2, safe
    out = complete(served, echo=True, logprobs=2, max_tokens=4, return_tokens_as_token_ids=True)
    lp = out["choices"][0]["logprobs"]
    assert lp["tokens"][:len(ids)] == [f"token_id:{i}" for i in ids]
    assert lp["tokens"][len(ids):len(ids) + safe] == [f"token_id:{t}" for t in tokens[:safe]]
    for top in lp["top_logprobs"][1:]:
        assert len(top) == 2 and all(k.startswith("token_id:") for k in top), top
    # The text itself is unchanged, and the offsets count its characters.
    assert out["choices"][0]["text"].startswith(PROMPT)
    chat = served.http.post("/v1/chat/completions", json={
        "model": served.model, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0,
        "max_tokens": 2, "logprobs": True, "top_logprobs": 1, "return_tokens_as_token_ids": True}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert all(c["token"].startswith("token_id:") and c["top_logprobs"][0]["token"].startswith("token_id:")
               for c in content), content
