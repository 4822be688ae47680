"""The served path with `--cpu-kernels off` (CARAVAN_CPU_KERNELS=off on the workers): every
product, norm and the paged-KV attention run through libtorch, the calls a GPU rank makes. At
TP 2, greedy completions alone and concurrent (decode steps of several sequences, the gathered
SDPA) equal transformers'; the workers say which path they computed on."""
import concurrent.futures
import os

import httpx
import openai
import pytest

from conftest import Coordinator, greedy_text, metrics

TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def served_off(checkpoint):
    coordinator = Coordinator(["--model", checkpoint, "--tp", 2, "--local-workers", "--port", 0],
                              env={**os.environ, "CARAVAN_CPU_KERNELS": "off"})
    try:
        yield coordinator, coordinator.wait_ready()
    finally:
        coordinator.stop()


def test_the_workers_compute_through_libtorch(served_off):
    coordinator, _ = served_off
    with open(coordinator.log.name, encoding="utf-8", errors="replace") as f:
        log = f.read()
    said = [line for line in log.splitlines() if "computing on" in line]
    assert len(said) == 2, log[-6000:]
    assert all("kernels: libtorch (--cpu-kernels off)" in line for line in said), said


def test_greedy_completions_equal_transformers_alone_and_batched(served_off, checkpoint, reference):
    _, url = served_off
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
    cases = reference["completions"]
    assert len(cases) >= 2
    assert greedy_text(client, checkpoint.name, cases[0]) == cases[0]["text"]
    with httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
        before = metrics(http)
        with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
            texts = list(pool.map(lambda ref: greedy_text(client, checkpoint.name, ref), cases))
        after = metrics(http)
    assert texts == [ref["text"] for ref in cases]
    moved = {name: after[name] - before[name] for name in ("caravan_steps_total", "caravan_generation_tokens_total")}
    # Fewer steps than tokens: sequences shared steps.
    assert moved["caravan_steps_total"] < moved["caravan_generation_tokens_total"], moved
