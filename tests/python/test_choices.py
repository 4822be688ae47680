"""Several choices per request on the OpenAI API, with real coordinator and worker processes
(TP 1 and 2, the random-weight Llama 2 fixture), through the official `openai` client.

- `n`: seeded choices each equal the single request with seed + index (so any choice can be
  reproduced alone), greedy choices equal the greedy completion, and the prompt's KV blocks are
  computed once: the other choices hit them (counted in /metrics).
- `best_of`: the `n` sequences of highest cumulative log-probability out of `best_of`, the same
  ones single requests with the same seeds give; every generated token is counted in the usage.
- Prompt arrays (strings, or token-id lists as lm-evaluation-harness sends them): each prompt its
  own choices, indexed prompt by prompt; `echo` scores each prompt.
- Streaming with `n`: chunks of every index interleave, each index's text equals the non-streamed
  choice, and `include_usage` ends with a usage chunk that has no choices.
- Bad shapes are 400s that name the field.
"""
import json
import uuid

import httpx
import openai
import pytest

from conftest import metrics, sse_lines
from test_batching import Served

BLOCK = 16  # the coordinator's default KV-cache block size


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def served(request, checkpoint):
    s = Served(checkpoint, tp=request.param)
    yield s
    s.close()


def unique_prompt(words=60):
    """A prompt no earlier request shares a block with (so prefix-cache hits come from this one)."""
    return uuid.uuid4().hex + " " + " ".join(f"word{i}" for i in range(words))


def prompt_ids(served, text):
    r = served.http.post("/tokenize", json={"model": served.model, "prompt": text})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_seeded_choices_each_equal_the_single_request_with_their_seed(served):
    prompt = "Once upon a time"
    resp = served.client.completions.create(model=served.model, prompt=prompt, n=4, seed=1234,
                                            temperature=1.0, max_tokens=12, extra_body={"ignore_eos": True})
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    singles = [served.client.completions.create(model=served.model, prompt=prompt, seed=1234 + j,
                                                temperature=1.0, max_tokens=12, extra_body={"ignore_eos": True})
               for j in range(4)]
    assert [c.text for c in resp.choices] == [s.choices[0].text for s in singles]
    # Different seeds sample different text (32000-way sampling from a random model).
    assert len({c.text for c in resp.choices}) > 1, [c.text for c in resp.choices]
    # The prompt counts once; every choice's tokens count.
    assert resp.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert resp.usage.completion_tokens == 4 * 12


def test_choices_share_the_prompts_blocks(served):
    prompt = unique_prompt()
    ids = prompt_ids(served, prompt)
    assert len(ids) >= 4 * BLOCK, len(ids)
    before = metrics(served.http)["caravan_prefix_cache_hit_tokens_total"]
    resp = served.client.completions.create(model=served.model, prompt=prompt, n=4, temperature=0,
                                            max_tokens=8)
    gained = metrics(served.http)["caravan_prefix_cache_hit_tokens_total"] - before
    # The first choice computes the prompt; the other 3 find all its full blocks (the last
    # prompt token is always computed, for its logits).
    assert gained == 3 * ((len(ids) - 1) // BLOCK) * BLOCK, (gained, len(ids))
    single = served.client.completions.create(model=served.model, prompt=prompt, temperature=0, max_tokens=8)
    assert [c.text for c in resp.choices] == [single.choices[0].text] * 4


def test_best_of_returns_the_most_likely_sequences(served):
    prompt = "The history of the lighthouse"
    singles = [served.client.completions.create(model=served.model, prompt=prompt, seed=7 + j, temperature=1.0,
                                                max_tokens=8, logprobs=0, extra_body={"ignore_eos": True})
               for j in range(4)]
    scored = sorted(((sum(s.choices[0].logprobs.token_logprobs), s.choices[0].text) for s in singles),
                    reverse=True)
    resp = served.client.completions.create(model=served.model, prompt=prompt, seed=7, temperature=1.0,
                                            max_tokens=8, n=2, best_of=4, extra_body={"ignore_eos": True})
    assert [c.index for c in resp.choices] == [0, 1]
    assert [c.text for c in resp.choices] == [text for _, text in scored[:2]], scored
    assert resp.choices[0].logprobs is None  # not asked for: ranking needs none shown
    assert resp.usage.completion_tokens == 4 * 8


def test_prompt_arrays_get_their_own_choices(served):
    texts = ["Hello there, my friend", "A long road winds through the hills and"]
    greedy = [served.client.completions.create(model=served.model, prompt=t, temperature=0, max_tokens=6)
              for t in texts]
    resp = served.client.completions.create(model=served.model, prompt=texts, n=2, temperature=0, max_tokens=6)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    want = [greedy[0].choices[0].text] * 2 + [greedy[1].choices[0].text] * 2
    assert [c.text for c in resp.choices] == want
    assert resp.usage.prompt_tokens == sum(g.usage.prompt_tokens for g in greedy)
    assert resp.usage.completion_tokens == 4 * 6
    # The same prompts as token ids.
    ids = [prompt_ids(served, t) for t in texts]
    by_ids = served.client.completions.create(model=served.model, prompt=ids, temperature=0, max_tokens=6)
    assert [c.text for c in by_ids.choices] == [g.choices[0].text for g in greedy]


def test_scoring_a_batch_of_token_prompts_as_lm_eval_does(served):
    texts = ["The capital of France is Paris", "Water boils at one hundred degrees", "Cats purr"]
    ids = [prompt_ids(served, t) for t in texts]
    resp = served.client.completions.create(model=served.model, prompt=ids, echo=True, logprobs=1,
                                            max_tokens=1, temperature=0)
    assert len(resp.choices) == 3
    for i, choice in enumerate(resp.choices):
        assert choice.index == i
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(ids[i]) + 1, (i, len(lp.token_logprobs), len(ids[i]))
        assert lp.token_logprobs[0] is None
        assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
        assert choice.text.startswith(texts[i]), (i, choice.text)
        # Each prompt scored alone gives the same numbers.
        alone = served.client.completions.create(model=served.model, prompt=ids[i], echo=True, logprobs=1,
                                                 max_tokens=1, temperature=0)
        assert alone.choices[0].logprobs.token_logprobs[1:-1] == pytest.approx(lp.token_logprobs[1:-1], abs=1e-4)


def test_streamed_choices_interleave_and_end_with_usage(served):
    body = {"model": served.model, "prompt": "In the morning the keeper", "n": 3, "seed": 99,
            "temperature": 1.0, "max_tokens": 10, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    texts, finished, chunks = {}, {}, []
    with httpx.Client(base_url=served.url, timeout=120) as http, http.stream("POST", "/v1/completions",
                                                                             json=body) as r:
        assert r.status_code == 200
        for line in sse_lines(r):
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: "):]))
    *choice_chunks, last = chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 30, last
    for chunk in choice_chunks:
        (choice,) = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        if choice["finish_reason"] is not None:
            finished[choice["index"]] = choice["finish_reason"]
    assert finished == {0: "length", 1: "length", 2: "length"}
    whole = served.client.completions.create(model=served.model, prompt=body["prompt"], n=3, seed=99,
                                             temperature=1.0, max_tokens=10, extra_body={"ignore_eos": True})
    assert [texts[i] for i in range(3)] == [c.text for c in whole.choices]
    assert last["usage"]["prompt_tokens"] == whole.usage.prompt_tokens


def test_chat_takes_n_too(served):
    messages = [{"role": "user", "content": "Tell me about lighthouses."}]
    resp = served.client.chat.completions.create(model=served.model, messages=messages, n=3, seed=5,
                                                 temperature=1.0, max_tokens=6)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    second = served.client.chat.completions.create(model=served.model, messages=messages, seed=6,
                                                   temperature=1.0, max_tokens=6)
    assert resp.choices[1].message.content == second.choices[0].message.content


@pytest.mark.parametrize("extra,field", [
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"n": 3, "best_of": 2}, "best_of"),
    ({"best_of": 2, "stream": True}, "best_of"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 450], []]}, "prompt"),
    ({"prompt": [[1, 450], [1, 32000]]}, "prompt"),
])
def test_bad_choice_requests_are_400s(served, extra, field):
    body = {"model": served.model, "prompt": "Hello", "max_tokens": 2, **extra}
    r = served.http.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field, r.text
    # A mixed array is no prompt shape at all.
    r = served.http.post("/v1/completions", json={**body, "prompt": ["text", [1, 2]]})
    assert r.status_code == 400 and "error" in r.json(), r.text
    # And the server still serves.
    ok = served.client.completions.create(model=served.model, prompt="Hello", max_tokens=2,
                                          extra_body={"ignore_eos": True})
    assert ok.choices[0].finish_reason == "length"
