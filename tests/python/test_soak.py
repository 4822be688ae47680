"""Soak: many concurrent clients for a bounded time against a small, overloaded TP-2 cluster.

For CARAVAN_SOAK_SECONDS (default 45; docs/RELIABILITY.md records longer runs), 24 client threads
loop over a random mix of:
- greedy streaming completions of the 32 reference prompts (3 to 296 tokens), whose text must
  equal transformers' exactly, so a lost, duplicated or reordered token fails the test;
- the same, cancelled (connection closed) after a random number of events;
- seeded sampled streams, which must end in a finish reason and [DONE];
- malformed requests (bad JSON, wrong types, out-of-range values, unknown model, a prompt beyond
  the context, invalid UTF-8), which must get a 4xx JSON error.

The server runs with a KV cache of 1024 tokens (preemptions), 8 sequences per batch and a queue of
12 (429s). Accepted requests must complete or end with an explicit error event (none is expected
here); the only non-4xx answer allowed is 429 with Retry-After. Afterwards nothing is in flight, KV
block usage returns to zero, and the processes' memory stays within 1.5x of its level after
warm-up.

Run: CARAVAN_SOAK_SECONDS=300 .venv/bin/python -m pytest tests/python/test_soak.py -s
"""
import collections
import json
import os
import random
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import Coordinator, children, metrics, sse_lines, wait_for_metric

SOAK_SECONDS = float(os.environ.get("CARAVAN_SOAK_SECONDS", "45"))
CLIENTS = 24
TIMEOUT_S = 120.0

BAD_REQUESTS = [
    ("not json", b"{\"model\": ", {"content-type": "application/json"}),
    ("wrong type", {"prompt": 42, "max_tokens": "many"}, None),
    ("negative max_tokens", {"prompt": "Hi", "max_tokens": -1}, None),
    ("temperature out of range", {"prompt": "Hi", "temperature": 7.5}, None),
    ("top_p out of range", {"prompt": "Hi", "top_p": 0}, None),
    ("n above the limit", {"prompt": "Hi", "n": 500}, None),
    ("best_of below n", {"prompt": "Hi", "n": 3, "best_of": 2}, None),
    ("a schema that does not compile", {"prompt": "Hi", "guided_json": {"type": "frobnicate"}}, None),
    ("too many stop sequences", {"prompt": "Hi", "stop": ["a", "b", "c", "d", "e", "f"]}, None),
    ("unknown model", {"model": "no-such-model", "prompt": "Hi"}, None),
    ("prompt beyond the context", {"prompt": [1] + [15043] * 5000, "max_tokens": 4}, None),
    ("token id outside the vocabulary", {"prompt": [1, 32000, 5], "max_tokens": 2}, None),
    ("invalid UTF-8", b"{\"prompt\": \"\xff\xfe\", \"max_tokens\": 2}", {"content-type": "application/json"}),
]


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.failures = []

    def add(self, what, failure=None):
        with self.lock:
            self.counts[what] += 1
            if failure:
                self.failures.append(failure)


def rss_bytes(pids) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def stream(http, body, cancel_after=None):
    """(status, texts, finish_reason, saw_done, error, usage) of one streamed completion."""
    texts, finish, done, error, usage = [], None, False, None, None
    with http.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            resp.read()
            return resp.status_code, resp, None, False, None, None
        events = 0
        for line in sse_lines(resp):
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                error = event["error"]
                continue
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices", []):
                texts.append(choice.get("text", ""))
                finish = choice.get("finish_reason") or finish
            events += 1
            if cancel_after is not None and events >= cancel_after:
                return 200, texts, None, False, None, None  # closing the connection cancels it
    return 200, texts, finish, done, error, usage


def client_loop(url, model, cases, stop_at, tally, seed):
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
        while time.monotonic() < stop_at:
            roll = rng.random()
            case = rng.choice(cases)
            body = {"model": model, "prompt": case["prompt"], "max_tokens": case["max_tokens"], "stream": True,
                    "stream_options": {"include_usage": True}}
            if roll < 0.15:
                name, payload, headers = rng.choice(BAD_REQUESTS)
                if isinstance(payload, dict):
                    resp = http.post("/v1/completions", json={"model": model, **payload})
                else:
                    resp = http.post("/v1/completions", content=payload, headers=headers)
                ok = 400 <= resp.status_code < 500 and resp.status_code != 429 and "error" in resp.json()
                tally.add("bad request refused" if ok else "bad request",
                          None if ok else f"{name}: HTTP {resp.status_code} {resp.text[:200]}")
                continue
            kind = "cancelled" if roll < 0.35 else "sampled" if roll < 0.5 else "greedy"
            if kind == "sampled":
                body.update(temperature=0.8, seed=rng.randrange(1 << 30))
            else:
                body.update(temperature=0)
            cancel_after = rng.randrange(1, 8) if kind == "cancelled" else None
            try:
                status, texts, finish, done, error, usage = stream(http, body, cancel_after)
            except (httpx.TransportError, json.JSONDecodeError) as e:
                tally.add("transport error", f"{kind}: {e!r}")
                continue
            if status == 429:
                retry = texts.headers.get("retry-after")
                tally.add("429", None if retry else "429 without Retry-After")
                time.sleep(rng.uniform(0.05, 0.2))  # client back-off after 429, as a real client would
                continue
            if status != 200:
                tally.add(f"HTTP {status}", f"{kind}: HTTP {status} {texts.text[:200]}")
                continue
            if kind == "cancelled":
                tally.add("cancelled")
                continue
            if error is not None:
                tally.add("error event", f"{kind}: error event {error}")
                continue
            if not done or finish not in ("stop", "length"):
                tally.add("silently dropped", f"{kind}: stream ended without [DONE]/finish ({finish}, {done})")
                continue
            if kind == "greedy":
                text = "".join(texts)
                if text != case["text"]:
                    tally.add("wrong text", f"greedy {len(case['prompt_ids'])}-token prompt: {text!r} != "
                                            f"{case['text']!r}")
                    continue
                if usage is None or usage["completion_tokens"] != len(case["gen_ids"]):
                    tally.add("wrong usage", f"usage {usage} for {len(case['gen_ids'])} generated tokens")
                    continue
            tally.add(f"{kind} ok")


def test_soak(checkpoint, reference):
    coordinator = Coordinator(["--model", checkpoint, "--tp", 2, "--local-workers", "--port", 0,
                               "--kv-cache-tokens", 1024, "--max-batch-size", 8, "--max-waiting", 12,
                               "--max-num-batched-tokens", 128])
    try:
        url = coordinator.wait_ready()
        pids = [coordinator.proc.pid, *children(coordinator.proc.pid)]
        cases = reference["batch"]
        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
            # Warm-up: every reference prompt once, so caches and allocators reach their working size.
            warm = Tally()
            client_loop(url, checkpoint.name, cases, time.monotonic() + 5, warm, seed=-1)
            wait_for_metric(http, "caravan_requests_in_flight", lambda v: v == 0, TIMEOUT_S)
            rss_idle = rss_bytes(pids)

            tally = Tally()
            stop_at = time.monotonic() + SOAK_SECONDS
            threads = [threading.Thread(target=client_loop, args=(url, checkpoint.name, cases, stop_at, tally, i))
                       for i in range(CLIENTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=SOAK_SECONDS + 3 * TIMEOUT_S)
            assert not any(t.is_alive() for t in threads), "a client hung"

            wait_for_metric(http, "caravan_requests_in_flight", lambda v: v == 0, TIMEOUT_S)
            wait_for_metric(http, "caravan_kv_cache_blocks_used", lambda v: v == 0, TIMEOUT_S)
            after = metrics(http)
            rss_after = rss_bytes(pids)
            assert http.get("/health").status_code == 200

        summary = dict(sorted(tally.counts.items()))
        print(f"\nsoak {SOAK_SECONDS:.0f}s x {CLIENTS} clients: {summary}; preemptions "
              f"{after['caravan_preemptions_total']:.0f}; RSS {rss_idle / 2**20:.0f} MiB idle -> "
              f"{rss_after / 2**20:.0f} MiB after")
        assert not tally.failures, f"{len(tally.failures)} failures, e.g. {tally.failures[:5]}; {summary}"
        # The mix really happened: completions of each kind, refusals, and pressure on the cache.
        for kind in ("greedy ok", "sampled ok", "cancelled", "bad request refused"):
            assert tally.counts[kind] > 0, summary
        assert after["caravan_preemptions_total"] > 0 or tally.counts["429"] > 0, summary
        assert rss_after < 1.5 * rss_idle, f"RSS grew from {rss_idle} to {rss_after}"
    finally:
        coordinator.stop()
