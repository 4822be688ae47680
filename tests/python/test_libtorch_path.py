"""The served path with `--cpu-kernels off` (CARAVAN_CPU_KERNELS=off on the workers): every
product, norm and the paged-KV attention run through libtorch, the calls a GPU rank makes. At
TP 2, greedy completions alone and concurrent (decode steps of several sequences, the gathered
SDPA) equal transformers'; the workers say which path they computed on.

Tokens are chosen there too, where the logits lie (worker/src/device_sampling.rs): generated
tokens' log-probabilities and alternatives equal transformers', and a seeded draw gives the same
text as a group that samples on the host, with penalties (rows that go to the host) and without.
Prompt log-probabilities on this path are in test_prompt_logprobs.py."""
import concurrent.futures
import math
import os
import subprocess

import httpx
import openai
import pytest

from conftest import Coordinator, bin_path, ctl_status, greedy_text, metrics

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
    coordinator, url = served_off
    with open(coordinator.log.name, encoding="utf-8", errors="replace") as f:
        log = f.read()
    said = [line for line in log.splitlines() if "computing on" in line]
    assert len(said) == 2, log[-6000:]
    assert all("kernels: libtorch (--cpu-kernels off)" in line for line in said), said
    # caravanctl status says what computes each loaded shard's products.
    assert [w["kernels"] for w in ctl_status(url)["workers"]] == ["libtorch", "libtorch"]
    table = subprocess.run([str(bin_path("caravanctl")), "--url", url, "status"], capture_output=True,
                           text=True, timeout=30, check=True).stdout
    assert "kernels    libtorch (every rank)" in table, table


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


def client_of(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)


LOGPROB_TOL = 1e-3


def test_logprobs_and_alternatives_equal_transformers(served_off, checkpoint, reference):
    _, url = served_off
    client = client_of(url)
    problems = []
    for i, ref in enumerate(reference["completions"][:3]):
        resp = client.completions.create(model=checkpoint.name, prompt=ref["prompt"], temperature=0,
                                         max_tokens=len(ref["gen_ids"]), logprobs=5)
        choice = resp.choices[0]
        lp = choice.logprobs
        if choice.text != ref["text"] or len(lp.token_logprobs) != len(ref["logprobs"]):
            problems.append(f"prompt {i}: {choice.text!r} vs {ref['text']!r}")
            continue
        for step, (got, want) in enumerate(zip(lp.token_logprobs, ref["logprobs"])):
            if abs(got - want) > LOGPROB_TOL:
                problems.append(f"prompt {i} token {step}: logprob {got} vs transformers {want}")
        for step, (top, ref_top) in enumerate(zip(lp.top_logprobs, ref["top_logprobs"])):
            want = [v for _, v in ref_top]
            got = sorted(top.values(), reverse=True)
            # Distinct byte-fallback tokens may render as the same string and share a dict key.
            collide = any(3 <= tid <= 258 for tid, _ in ref_top)
            if not (len(got) == 5 or (collide and 3 <= len(got) <= 5)) or abs(got[0] - want[0]) > LOGPROB_TOL \
                    or any(min(abs(g - w) for w in want) > LOGPROB_TOL for g in got):
                problems.append(f"prompt {i} token {step}: alternatives {top!r} vs transformers {want}")
    assert not problems, "\n".join(problems[:10])


# Settings that draw (temperature with and without top-k / top-p), and one whose rows are sampled
# on the host even here (its logits are penalised before the choice).
DRAWS = [
    {"temperature": 0.8},
    {"temperature": 1.3, "top_p": 0.9, "extra_body": {"top_k": 40}},
    {"temperature": 0.7, "frequency_penalty": 1.5, "presence_penalty": 0.5},
]


def test_seeded_draws_equal_those_of_a_group_sampling_on_the_host(served_off, checkpoint, reference):
    _, url = served_off
    ref = reference["completions"][0]
    # The random model is nearly flat: a draw at 0.8 reproduces the greedy path with this probability.
    assert ref["log_p_greedy_t08"] < math.log(1e-6)
    host = Coordinator(["--model", checkpoint, "--tp", 1, "--local-workers", "--port", 0],
                       env={**os.environ, "CARAVAN_CPU_KERNELS": "on"})
    try:
        host_url = host.wait_ready()

        def texts(base, seed):
            client = client_of(base)
            return [client.completions.create(model=checkpoint.name, prompt=ref["prompt"], max_tokens=16, seed=seed,
                                              **settings).choices[0].text for settings in DRAWS]

        on_device = texts(url, 1234)
        assert texts(host_url, 1234) == on_device
    finally:
        host.stop()
    assert all(text != ref["text"] for text in on_device), "a draw gave the greedy text: is temperature ignored?"
    assert texts(url, 4321) != on_device, "a different seed drew the same texts: is the seed ignored?"
