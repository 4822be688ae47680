"""GET /metrics: scraped before and after requests through a coordinator and two workers, the
counters and histograms must move by exactly what the requests did."""
import httpx
import pytest

from conftest import metrics, wait_for_metric
from test_batching import Served

N = 3
MAX_TOKENS = 5


@pytest.fixture(scope="module")
def served(checkpoint):
    s = Served(checkpoint)
    yield s
    s.close()


def delta(before, after, name):
    return after.get(name, 0.0) - before.get(name, 0.0)


def test_counters_and_histograms_move_by_what_requests_did(served, reference):
    cases = reference["completions"][:N]
    before = metrics(served.http)
    assert before["caravan_ready"] == 1 and before["caravan_workers_up"] == 2
    for case in cases:
        out = served.client.completions.create(model=served.model, prompt=case["prompt"], temperature=0,
                                               max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == MAX_TOKENS
    # A malformed request is refused at the API and never reaches the scheduler.
    assert served.http.post("/v1/completions", json={"model": served.model}).status_code == 400
    # The scheduler records a request's end just after its response: wait until it is idle.
    wait_for_metric(served.http, "caravan_requests_in_flight", lambda v: v == 0)
    after = metrics(served.http)

    assert delta(before, after, 'caravan_requests_total{status="length"}') == N
    for status in ("stop", "error", "cancelled", "rejected"):
        assert delta(before, after, f'caravan_requests_total{{status="{status}"}}') == 0, status
    assert delta(before, after, "caravan_generation_tokens_total") == N * MAX_TOKENS
    assert delta(before, after, "caravan_prompt_tokens_total") == sum(len(c["prompt_ids"]) for c in cases)
    assert delta(before, after, "caravan_time_to_first_token_seconds_count") == N
    assert delta(before, after, "caravan_request_latency_seconds_count") == N
    assert delta(before, after, "caravan_inter_token_latency_seconds_count") == N * (MAX_TOKENS - 1)
    assert delta(before, after, 'caravan_request_latency_seconds_bucket{le="+Inf"}') == N
    assert delta(before, after, "caravan_request_latency_seconds_sum") >= \
        delta(before, after, "caravan_time_to_first_token_seconds_sum") > 0
    # Buckets are cumulative.
    buckets = [v for k, v in after.items() if k.startswith("caravan_time_to_first_token_seconds_bucket")]
    assert buckets == sorted(buckets)
    # Steps ran, and with TP 2 some of their time was spent in the ring's collectives.
    assert delta(before, after, "caravan_steps_total") >= MAX_TOKENS
    assert delta(before, after, "caravan_step_seconds_total") > 0
    assert 0 < delta(before, after, "caravan_collective_seconds_total") <= \
        delta(before, after, "caravan_worker_compute_seconds_total")
    wait_for_metric(served.http, "caravan_kv_cache_blocks_used", lambda v: v == 0)
    assert after["caravan_workers_registered"] == 2
