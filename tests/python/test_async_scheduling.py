"""Asynchronous scheduling (`--async-scheduling`): the coordinator plans and sends each decode
step while the step before it runs, and each rank feeds the token it sampled into the next step.
Real coordinator and worker processes at TP 1 and 2 (the random-weight Llama 2 fixture), through
the official `openai` client, against the same server without it:

- 32 concurrent greedy requests (chunked prefill, admissions while others decode) give the
  synchronous path's text token for token, and transformers' (reference.json); steps were in
  fact planned ahead (counted in /metrics), and none on the synchronous server.
- Seeded sampling with `n` choices, logprobs, stop strings, stop tokens and lengths end exactly
  where the synchronous path ends: a sequence found finished one step late never shows its extra
  token, and the usage and `caravan_generation_tokens_total` count only the tokens returned.
- Streams carry the same text; structured outputs (which wait for each answer) share a batch with
  requests that run ahead and still follow their grammar.
"""
import concurrent.futures

import pytest

from conftest import metrics, wait_for_metric
from test_batching import Served, mismatches, run_concurrently

# A 64-token step budget chunks long prompts, so prefill and admissions interleave with decodes.
FLAGS = ("--max-num-batched-tokens", 64)


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def servers(request, checkpoint):
    sync = Served(checkpoint, *FLAGS, tp=request.param)
    ahead = Served(checkpoint, *FLAGS, "--async-scheduling", tp=request.param)
    yield sync, ahead
    ahead.close()
    sync.close()


def planned_ahead(served):
    return metrics(served.http)["caravan_steps_planned_ahead_total"]


def test_concurrent_greedy_requests_equal_the_synchronous_path(servers, reference):
    sync, ahead = servers
    cases = reference["batch"]
    before = [planned_ahead(s) for s in servers]
    generated_before = metrics(ahead.http)["caravan_generation_tokens_total"]
    expected = run_concurrently(sync.client, sync.model, cases)
    got = run_concurrently(ahead.client, ahead.model, cases)
    assert got == expected
    assert not mismatches(cases, got), "\n".join(mismatches(cases, got))
    # Steps went ahead on the async server only.
    assert planned_ahead(ahead) - before[1] > 0
    assert planned_ahead(sync) == before[0]
    # Tokens computed for sequences that had already ended are not counted (nor shown).
    generated = metrics(ahead.http)["caravan_generation_tokens_total"] - generated_before
    assert generated == sum(n for _, n in got)
    wait_for_metric(ahead.http, "caravan_kv_cache_blocks_used", lambda v: v == 0)


def sampled(served, **options):
    out = served.client.completions.create(model=served.model, prompt="Once upon a time", **options)
    return [(c.text, c.finish_reason, c.logprobs.tokens if c.logprobs else None,
             c.logprobs.token_logprobs if c.logprobs else None) for c in out.choices], out.usage


CASES = [
    dict(temperature=1.0, seed=7, n=3, max_tokens=20, extra_body={"ignore_eos": True}),
    dict(temperature=0.8, top_p=0.9, seed=3, max_tokens=17, logprobs=2),
    dict(temperature=0, max_tokens=1),
    dict(temperature=0, max_tokens=2),
    dict(temperature=1.0, seed=11, max_tokens=30, stop=["e", "a"]),
    dict(temperature=1.0, seed=5, max_tokens=30, extra_body={"stop_token_ids": [29871, 263, 278]}),
    dict(temperature=1.0, seed=5, max_tokens=40, extra_body={"min_tokens": 5, "repetition_penalty": 1.3}),
]


def test_sampling_stops_and_lengths_end_where_the_synchronous_path_ends(servers):
    sync, ahead = servers

    def run(served):
        with concurrent.futures.ThreadPoolExecutor(len(CASES)) as pool:
            return list(pool.map(lambda c: sampled(served, **c), CASES))

    expected, got = run(sync), run(ahead)
    for case, (choices, usage), (want, want_usage) in zip(CASES, got, expected):
        assert usage.completion_tokens == want_usage.completion_tokens, case
        for (text, reason, tokens, logprobs), (w_text, w_reason, w_tokens, w_logprobs) in zip(choices, want):
            assert (text, reason, tokens) == (w_text, w_reason, w_tokens), case
            if logprobs is not None:
                assert logprobs == pytest.approx(w_logprobs, abs=1e-4), case


def streamed(served, prompt, max_tokens):
    text, usage = "", None
    stream = served.client.completions.create(model=served.model, prompt=prompt, temperature=0,
                                              max_tokens=max_tokens, stream=True,
                                              stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
        if chunk.usage:
            usage = chunk.usage.completion_tokens
    return text, usage


def test_streams_and_structured_outputs_share_batches_that_run_ahead(servers, reference):
    sync, ahead = servers
    prompts = [c["prompt"] for c in reference["batch"][:6]]
    choices = ["red", "green", "blue"]

    def run(served):
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            streams = [pool.submit(streamed, served, p, 24) for p in prompts]
            constrained = [pool.submit(
                served.client.completions.create, model=served.model, prompt=p, max_tokens=40,
                temperature=0, extra_body={"guided_choice": choices}) for p in prompts[:2]]
            return [f.result() for f in streams], [f.result().choices[0].text for f in constrained]

    (want_streams, want_json), (got_streams, got_json) = run(sync), run(ahead)
    assert got_streams == want_streams
    assert got_json == want_json
    assert all(text in choices for text in got_json), got_json
