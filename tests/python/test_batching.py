"""End-to-end tests of continuous batching, with real coordinator and worker processes (TP 2).

- Batch invariance: 32 concurrent greedy requests (3 to ~300 prompt tokens, chunked prefill under a
  small token budget) give exactly the tokens each gives alone, and transformers' `generate`.
- Preemption: the same 32 under a deliberately small KV cache are preempted and recomputed, and
  still all complete correctly.
- Cancellation: clients that disconnect mid-stream free their blocks; used blocks return to 0.
- Prefix caching: a second prompt sharing a long prefix hits the cache (counted in /metrics) and
  gives the reference output.
- Admission control: beyond --max-waiting, 429 with Retry-After and a JSON error.

Expected outputs come from fixtures/serving/reference.json ("batch"), written by transformers.
"""
import concurrent.futures
import threading
import time

import httpx
import openai
import pytest

from conftest import Coordinator, metrics, sse_lines, wait_for_metric

TIMEOUT_S = 120.0


def complete(client, model, case):
    out = client.completions.create(model=model, prompt=case["prompt"], temperature=0,
                                    max_tokens=case["max_tokens"])
    return out.choices[0].text, out.usage.completion_tokens


def run_concurrently(client, model, cases):
    barrier = threading.Barrier(len(cases))

    def one(case):
        barrier.wait(timeout=TIMEOUT_S)  # every request in flight together
        return complete(client, model, case)

    with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
        futures = [pool.submit(one, c) for c in cases]
        return [f.result(timeout=3 * TIMEOUT_S) for f in futures]


def mismatches(cases, results):
    return [f"prompt {i} ({len(c['prompt_ids'])} tokens): {text!r} != reference {c['text']!r}"
            for i, (c, (text, _)) in enumerate(zip(cases, results)) if text != c["text"]]


class Served:
    def __init__(self, checkpoint, *extra, tp=2):
        self.coordinator = Coordinator(["--model", checkpoint, "--tp", tp, "--local-workers", "--port", 0, *extra])
        self.url = self.coordinator.wait_ready()
        self.model = checkpoint.name
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", timeout=TIMEOUT_S,
                                    max_retries=0)
        self.http = httpx.Client(base_url=self.url, timeout=TIMEOUT_S)

    def close(self):
        self.http.close()
        self.coordinator.stop()


@pytest.fixture(scope="module")
def chunked(checkpoint):
    # A 64-token step budget splits every prompt above 64 tokens across steps.
    served = Served(checkpoint, "--max-num-batched-tokens", 64)
    yield served
    served.close()


def test_batch_invariance_with_chunked_prefill(chunked, reference):
    cases = reference["batch"]
    assert len(cases) == 32
    alone = [complete(chunked.client, chunked.model, c) for c in cases]
    problems = mismatches(cases, alone)
    assert not problems, "alone:\n" + "\n".join(problems)

    before = metrics(chunked.http)
    together = run_concurrently(chunked.client, chunked.model, cases)
    after = metrics(chunked.http)
    assert together == alone, "\n".join(mismatches(cases, together))
    generated = after["caravan_generation_tokens_total"] - before["caravan_generation_tokens_total"]
    steps = after["caravan_steps_total"] - before["caravan_steps_total"]
    assert generated == sum(n for _, n in together)
    # Batched: far fewer steps than tokens (one step per token if requests ran one at a time).
    assert steps < generated / 4, f"{steps} steps for {generated} tokens: requests did not share steps"
    assert after["caravan_preemptions_total"] == 0
    wait_for_metric(chunked.http, "caravan_kv_cache_blocks_used", lambda v: v == 0)


def test_cancelled_streams_free_their_blocks(chunked, reference):
    def cancel_after_two_chunks(i):
        with httpx.Client(base_url=chunked.url, timeout=TIMEOUT_S) as http:
            body = {"model": chunked.model, "prompt": reference["batch"][i]["prompt"], "max_tokens": 300,
                    "temperature": 0, "stream": True, "ignore_eos": True}
            with http.stream("POST", "/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                events = 0
                for line in sse_lines(resp):
                    events += line.startswith("data:")
                    if events == 2:
                        return True  # leaving the block closes the connection mid-stream
        return False

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(cancel_after_two_chunks, range(8)))
    wait_for_metric(chunked.http, "caravan_requests_running", lambda v: v == 0)
    assert wait_for_metric(chunked.http, "caravan_kv_cache_blocks_used", lambda v: v == 0) == 0
    # The server is still healthy and correct.
    case = reference["batch"][9]
    assert complete(chunked.client, chunked.model, case)[0] == case["text"]


def test_prefix_cache_hits_are_counted_and_exact(checkpoint, reference):
    served = Served(checkpoint)
    try:
        first, second = reference["batch"][0], reference["batch"][1]
        shared = reference["shared_prefix"]
        assert first["prompt"].startswith(shared) and second["prompt"].startswith(shared)
        assert complete(served.client, served.model, first)[0] == first["text"]
        hits = metrics(served.http)["caravan_prefix_cache_hit_tokens_total"]
        assert complete(served.client, served.model, second)[0] == second["text"]
        after = metrics(served.http)
        gained = after["caravan_prefix_cache_hit_tokens_total"] - hits
        # The common prefix spans several 16-token blocks.
        common = 0
        for a, b in zip(first["prompt_ids"], second["prompt_ids"]):
            if a != b:
                break
            common += 1
        assert gained == (common // 16) * 16 and gained >= 48, (gained, common)
        # The same prompt again hits all its full blocks and still gives the same text.
        before_again = metrics(served.http)["caravan_prefix_cache_hit_tokens_total"]
        assert complete(served.client, served.model, first)[0] == first["text"]
        again = metrics(served.http)["caravan_prefix_cache_hit_tokens_total"] - before_again
        assert again == ((len(first["prompt_ids"]) - 1) // 16) * 16, again
        # Idle: nothing referenced (the engine releases just after the response), blocks cached.
        wait_for_metric(served.http, "caravan_kv_cache_blocks_used", lambda v: v == 0)
        assert metrics(served.http)["caravan_kv_cache_blocks_cached"] > 0
    finally:
        served.close()


def test_preemption_under_a_small_kv_cache(checkpoint, reference):
    # 512 tokens of cache (one full context) for 32 requests needing ~4000: most must wait or be
    # preempted and recomputed. Prefix caching off, so recomputation really recomputes.
    served = Served(checkpoint, "--kv-cache-tokens", 512, "--no-prefix-caching", "--max-num-batched-tokens", 128)
    try:
        cases = reference["batch"]
        results = run_concurrently(served.client, served.model, cases)
        problems = mismatches(cases, results)
        assert not problems, "\n".join(problems)
        m = metrics(served.http)
        assert m["caravan_preemptions_total"] > 0, "the small cache never preempted: the test proves nothing"
        assert m["caravan_kv_cache_blocks_total"] == 32
        wait_for_metric(served.http, "caravan_kv_cache_blocks_used", lambda v: v == 0)
    finally:
        served.close()


def test_full_queue_answers_429(checkpoint, reference):
    served = Served(checkpoint, "--max-batch-size", 1, "--max-waiting", 1)
    streams = []
    try:
        def start_stream():
            client = httpx.Client(base_url=served.url, timeout=TIMEOUT_S)
            body = {"model": served.model, "prompt": "Hello", "max_tokens": 400, "temperature": 0,
                    "stream": True, "ignore_eos": True}
            ctx = client.stream("POST", "/v1/completions", json=body)
            resp = ctx.__enter__()
            streams.append((client, ctx))
            return resp

        running = start_stream()
        assert running.status_code == 200
        # The first event: this request holds the only batch slot. (Keep the iterator: dropping it
        # closes the response, which cancels the request.)
        running_lines = sse_lines(running)
        next(running_lines)
        # A streamed response starts once its request is admitted: start this one in the background.
        queued = concurrent.futures.ThreadPoolExecutor(1)
        queued_response = queued.submit(start_stream)
        wait_for_metric(served.http, "caravan_requests_waiting", lambda v: v == 1)

        refused = served.http.post("/v1/completions", json={"model": served.model, "prompt": "Hi", "max_tokens": 2})
        assert refused.status_code == 429, refused.text
        assert refused.headers.get("retry-after", "").isdigit(), refused.headers
        assert refused.json()["error"]["message"]
        assert metrics(served.http)['caravan_requests_total{status="rejected"}'] == 1
        assert queued_response.result(timeout=TIMEOUT_S).status_code == 200
        queued.shutdown()
    finally:
        for client, ctx in streams:
            ctx.__exit__(None, None, None)
            client.close()
    try:
        # Once the streams are gone, the server admits again.
        wait_for_metric(served.http, "caravan_requests_running", lambda v: v == 0)
        case = reference["batch"][3]
        assert complete(served.client, served.model, case)[0] == case["text"]
    finally:
        served.close()
