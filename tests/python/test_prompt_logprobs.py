"""`echo` with prompt log-probabilities on /v1/completions (what lm-evaluation-harness's
loglikelihood tasks send), against transformers on the same weights.

- The random-weight Llama 2 fixture at TP 1 and TP 2 (and at TP 2 on the libtorch path, where the
  scores are computed where the logits lie, as on a GPU), served with a small step budget so that long
  prompts are split into prefill chunks (the chunk boundary's token is scored from the previous
  chunk's last row): every prompt position's log-probability and top alternatives equal
  transformers' within 1e-3; the first token has none; the generated token follows; the token
  texts concatenate to the echoed prompt; text and token-id prompts; streaming; the same prompt
  twice (a prefix-cache hit must not skip the scoring); echo requests batched with plain ones;
  vLLM's `prompt_logprobs` field (log-probability, rank and alternatives per position).
- SmolLM2-135M-Instruct (a trained model): the perplexity of a committed English text
  (tests/data/perplexity.txt, over 1,000 tokens) equal to transformers' within 1e-3 relative.
"""
import concurrent.futures
import json
import math
import os

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import GREEDY_MARGIN, REPO, Coordinator, continuation_text, sse_lines

LOGPROB_TOL = 1e-3
PERPLEXITY_RTOL = 1e-3
# Small enough that the long prompts below span several prefill chunks.
STEP_TOKENS = 48
TOP = 2
TEXT = (REPO / "tests" / "data" / "perplexity.txt").read_text(encoding="utf-8")


def hf_scores(model, ids):
    """transformers' log-probability of each token after the first, the top-`TOP` values at those
    positions, and the greedy next token (None after a near-tie)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    own = logprobs[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()
    top = torch.topk(logprobs[:-1], TOP, dim=-1).values.tolist()
    best = torch.topk(logits[-1], 2)
    next_id = int(best.indices[0]) if best.values[0] - best.values[1] >= GREEDY_MARGIN else None
    return own, top, next_id


def echo_problems(label, choice, ids, prompt_text, hf):
    own, top, next_id = hf
    lp = choice.logprobs
    n = len(ids)
    problems = []
    if lp is None or len(lp.token_logprobs) != n + 1:
        return [f"{label}: expected {n + 1} logprob entries (prompt + 1 generated), got {lp!r}"[:400]]
    if lp.token_logprobs[0] is not None or lp.top_logprobs[0] is not None:
        problems.append(f"{label}: the first prompt token has a log-probability: {lp.token_logprobs[0]!r}")
    worst = max(range(n - 1), key=lambda i: abs(lp.token_logprobs[i + 1] - own[i]))
    if abs(lp.token_logprobs[worst + 1] - own[worst]) > LOGPROB_TOL:
        problems.append(f"{label}: prompt position {worst + 1}: {lp.token_logprobs[worst + 1]} vs "
                        f"transformers {own[worst]}")
    for i in range(n - 1):
        values = sorted(lp.top_logprobs[i + 1].values(), reverse=True)
        if len(values) != TOP or any(abs(a - b) > LOGPROB_TOL for a, b in zip(values, top[i])):
            problems.append(f"{label}: top_logprobs at {i + 1}: {values} vs transformers {top[i]}")
            break
    if not choice.text.startswith(prompt_text):
        problems.append(f"{label}: the text does not start with the prompt: {choice.text[:80]!r}")
    if "".join(lp.tokens) != choice.text:
        problems.append(f"{label}: the tokens do not concatenate to the text")
    if lp.text_offset[n] != len(prompt_text):
        problems.append(f"{label}: the generated token's offset {lp.text_offset[n]} != {len(prompt_text)}")
    return problems


@pytest.fixture(scope="module")
def hf_random(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module", params=[(1, "on"), (2, "on"), (2, "off")], ids=["tp1", "tp2", "tp2-libtorch"])
def served(request, checkpoint):
    """TP 1 and 2 on Caravan's CPU kernels (prompts scored on the host), and TP 2 on the
    device-generic libtorch path (scored where the logits lie, as on a GPU)."""
    tp, kernels = request.param
    coordinator = Coordinator(["--model", checkpoint, "--tp", tp, "--local-workers", "--host",
                               "127.0.0.1", "--port", "0", "--max-num-batched-tokens", STEP_TOKENS,
                               "--max-batch-size", 8], env={**os.environ, "CARAVAN_CPU_KERNELS": kernels})
    url = coordinator.wait_ready()
    yield url, checkpoint.name
    coordinator.stop()


# Short, spanning several prefill chunks, and with multi-byte characters.
PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog.", " ".join(TEXT.split()[:120]),
           "Grüße aus Köln — ☕ und 🥨!"]


def test_echo_scores_every_prompt_token(served, hf_random, tokenizer):
    url, model = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=120, max_retries=0)
    problems = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        hf = hf_scores(hf_random, ids)
        for label, sent in [(f"text {prompt[:20]!r}", prompt), (f"ids {prompt[:20]!r}", ids)]:
            resp = client.completions.create(model=model, prompt=sent, echo=True, logprobs=TOP, max_tokens=1,
                                             temperature=0)
            choice = resp.choices[0]
            echoed = prompt if isinstance(sent, str) else tokenizer.decode(ids, skip_special_tokens=True)
            problems += echo_problems(label, choice, ids, echoed, hf)
            if resp.usage.prompt_tokens != len(ids) or resp.usage.completion_tokens != 1:
                problems.append(f"{label}: usage {resp.usage}")
            generated = choice.text[len(echoed):]
            if hf[2] is not None and generated != continuation_text(tokenizer, ids, [hf[2]]):
                problems.append(f"{label}: generated {generated!r}, transformers' greedy token {hf[2]}")
    assert not problems, "\n".join(problems)


def test_prefix_cache_hit_still_scores_the_prompt(served, hf_random, tokenizer):
    """The second identical prompt would reuse the first's cached blocks; scoring needs them all."""
    url, model = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=120, max_retries=0)
    prompt = " ".join(TEXT.split()[200:300])
    ids = tokenizer(prompt).input_ids
    hf = hf_scores(hf_random, ids)
    plain = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None
    problems = []
    for attempt in range(2):
        resp = client.completions.create(model=model, prompt=prompt, echo=True, logprobs=TOP, max_tokens=1,
                                         temperature=0)
        problems += echo_problems(f"attempt {attempt}", resp.choices[0], ids, prompt, hf)
    assert not problems, "\n".join(problems)


def test_echo_requests_share_a_batch_with_plain_ones(served, hf_random, tokenizer):
    url, model = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=120, max_retries=0)
    cases = [" ".join(TEXT.split()[i * 40:(i + 1) * 40]) for i in range(6)]
    plain_ref = client.completions.create(model=model, prompt=cases[0], max_tokens=8, temperature=0).choices[0].text

    def one(i):
        if i % 2:
            return client.completions.create(model=model, prompt=cases[0], max_tokens=8, temperature=0)
        return client.completions.create(model=model, prompt=cases[i], echo=True, logprobs=TOP, max_tokens=1,
                                         temperature=0)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    problems = []
    for i, resp in enumerate(results):
        if i % 2:
            if resp.choices[0].text != plain_ref:
                problems.append(f"plain request {i}: {resp.choices[0].text!r} != {plain_ref!r}")
        else:
            ids = tokenizer(cases[i]).input_ids
            problems += echo_problems(f"echo request {i}", resp.choices[0], ids, cases[i], hf_scores(hf_random, ids))
    assert not problems, "\n".join(problems)


def test_streamed_echo_sends_the_prompt_first(served, hf_random, tokenizer):
    url, model = served
    prompt = " ".join(TEXT.split()[:70])
    ids = tokenizer(prompt).input_ids
    own, _, _ = hf_scores(hf_random, ids)
    body = {"model": model, "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 4, "temperature": 0,
            "stream": True}
    with httpx.Client(base_url=url, timeout=120) as http, http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        data = [line.removeprefix("data: ") for line in sse_lines(r) if line.startswith("data: ")]
    assert data[-1] == "[DONE]", data[-1]
    events = [json.loads(d) for d in data[:-1]]
    first = events[0]["choices"][0]
    assert first["text"] == prompt
    assert first["logprobs"]["token_logprobs"][0] is None
    got = first["logprobs"]["token_logprobs"][1:]
    assert len(got) == len(ids) - 1
    assert max(abs(a - b) for a, b in zip(got, own)) <= LOGPROB_TOL
    generated = [c["choices"][0] for c in events[1:]]
    assert sum(len(c["logprobs"]["tokens"]) for c in generated if c["logprobs"]) == 4
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_echo_without_logprobs_prepends_the_prompt(served):
    url, model = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=120, max_retries=0)
    plain = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0)
    echoed = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == "Once upon a time" + plain.choices[0].text
    assert echoed.choices[0].logprobs is None


def test_vllms_prompt_logprobs_field(served, hf_random, tokenizer):
    """vLLM's `prompt_logprobs`: per prompt position, the prompt token's log-probability and rank
    and the top alternatives (ranks 1..n), as transformers computes them; no echo implied."""
    url, model = served
    prompt = " ".join(TEXT.split()[:60])
    ids = tokenizer(prompt).input_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_random(torch.tensor([ids])).logits[0].float(), dim=-1)
    with httpx.Client(base_url=url, timeout=120) as http:
        body = {"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0, "prompt_logprobs": TOP}
        choice = http.post("/v1/completions", json=body).json()["choices"][0]
        assert choice["logprobs"] is None and not choice["text"].startswith(prompt[:20]), choice["text"]
        got = choice["prompt_logprobs"]
        assert len(got) == len(ids) and got[0] is None
        problems = []
        for p in range(1, len(ids)):
            row, own = logprobs[p - 1], ids[p]
            entry = got[p][str(own)]
            low = 1 + int((row > row[own] + LOGPROB_TOL).sum())
            high = int((row >= row[own] - LOGPROB_TOL).sum())
            if abs(entry["logprob"] - float(row[own])) > LOGPROB_TOL or not low <= entry["rank"] <= high:
                problems.append(f"position {p}: {entry} vs transformers {float(row[own])}, rank {low}..{high}")
            top = torch.topk(row, TOP)
            for r, (value, token) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
                alt = got[p].get(str(token))
                if alt is None or abs(alt["logprob"] - value) > LOGPROB_TOL or (token != own and alt["rank"] != r):
                    problems.append(f"position {p}: alternative {token} (rank {r}, {value}): {alt}")
        assert not problems, "\n".join(problems[:10])
        # Chat: once per response; streaming is refused with a clear 400.
        chat = http.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "Hi"}],
                                                       "max_tokens": 2, "prompt_logprobs": 1}).json()
        assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"], chat
        refused = http.post("/v1/completions", json={**body, "stream": True})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt_logprobs"


# ---------------------------------------------------------------------------------------------------
# A trained model: perplexity


def test_smollm2_perplexity_equals_transformers(smollm2):
    tok = AutoTokenizer.from_pretrained(smollm2)
    ids = tok(TEXT).input_ids
    assert len(ids) >= 1000, f"the text has {len(ids)} tokens"
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    model.eval()
    own, _, _ = hf_scores(model, ids)
    want = math.exp(-sum(own) / len(own))
    coordinator = Coordinator(["--model", smollm2, "--tp", 3, "--local-workers", "--host", "127.0.0.1",
                               "--port", "0"])
    try:
        url = coordinator.wait_ready()
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=300, max_retries=0)
        resp = client.completions.create(model=smollm2.name, prompt=ids, echo=True, logprobs=0, max_tokens=1,
                                         temperature=0)
    finally:
        coordinator.stop()
    scored = resp.choices[0].logprobs.token_logprobs[1:len(ids)]
    assert len(scored) == len(ids) - 1 and all(s is not None for s in scored)
    got = math.exp(-sum(scored) / len(scored))
    # A trained model on plain English: a perplexity far from uniform (49152) proves real scores.
    assert got < 100, f"perplexity {got}"
    assert abs(got - want) <= PERPLEXITY_RTOL * want, f"Caravan's perplexity {got}, transformers' {want}"

