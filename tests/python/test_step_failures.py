"""End-to-end tests of what each kind of step failure does to a serving group, with real processes.

A fault is injected into the workers of a local TP-2 group (CARAVAN_INJECT_FAULT, see
worker/src/faults.rs; local workers inherit the coordinator's environment) at step 3, a decode
step of the first request. Every rank alive, the group must serve again afterwards:
- rejected (every rank refuses the step as invalid): only the step's requests end, with an
  explicit error; the group is not formed again and /health never leaves 200;
- diverged (rank 1 answers a different token, or rank 1 alone refuses the step that rank 0
  runs), timeout (rank 1 answers 2 s late, past --collective-timeout) and panicked (rank 1's
  step code panics after the collectives; the worker answers with the panic's message and drops
  its shard, and the process stays up): the group is formed again from the same worker
  processes and the request goes on on it, ending with the transformers reference text; with
  `--recovery-timeout 0` it ends with an explicit error instead.
A step that is only long (every rank pauses 6 s) is not a failure: the ranks still answer health
checks meanwhile, and the group is not formed again.

Run: .venv/bin/python -m pytest tests/python/test_step_failures.py  (after `cargo build --workspace --bins`)
"""
import os

import httpx
import openai
import pytest

from conftest import READY_TIMEOUT_S, Coordinator, children, greedy_text, metrics, wait_for_status

TIMEOUT_S = 60.0

CASES = {
    # the failure's kind, fault, extra flags, the error's words, whether the group is formed again
    "rejected": ("rejected", "reject@3", [], "injected fault: step 3 refused", False),
    "diverged": ("diverged", "diverge@3/rank1", [], "sampled different tokens", True),
    "refused-by-one": ("diverged", "reject@3/rank1", ["--collective-timeout", 1],
                       "refused the step the others ran", True),
    "timeout": ("timeout", "stall@3/rank1/2000ms", ["--collective-timeout", 1], "timed out", True),
    "panicked": ("unreachable", "panic@3/rank1", [], "step 3 panicked (injected fault", True),
}
# With --recovery-timeout 0 the requests of a failed group end at once, with an explicit error.
CASES.update({f"{name}-no-recovery": (kind, fault, [*flags, "--recovery-timeout", "0s"], words, True)
              for name, (kind, fault, flags, words, reformed) in CASES.items() if reformed})


@pytest.mark.parametrize("case", list(CASES))
def test_after_a_step_failure_with_every_rank_alive_the_group_serves_again(checkpoint, reference, case):
    kind, fault, flags, words, reformed = CASES[case]
    resumes = reformed and "--recovery-timeout" not in flags
    env = dict(os.environ, CARAVAN_INJECT_FAULT=fault)
    coordinator = Coordinator(["--model", checkpoint, "--tp", 2, "--local-workers", "--port", 0, *flags], env=env)
    try:
        url = coordinator.wait_ready()
        workers = sorted(children(coordinator.proc.pid))
        assert len(workers) == 2, f"expected 2 worker processes, found {workers}"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        ref = reference["completions"][0]
        assert len(ref["gen_ids"]) >= 4, "step 3 must be one of the request's decode steps"
        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
            before = metrics(http)
            assert before["caravan_group_formations_total"] == 1
            if resumes:
                # The request goes on on the re-formed group and ends as it does without the fault.
                assert greedy_text(client, checkpoint.name, ref) == ref["text"]
            else:
                with pytest.raises(openai.APIStatusError) as failed:
                    greedy_text(client, checkpoint.name, ref)
                assert failed.value.status_code == 503, failed.value
                assert words in str(failed.value), failed.value

            after = metrics(http)
            assert after[f'caravan_step_failures_total{{kind="{kind}"}}'] == 1, after
            assert after['caravan_requests_total{status="error"}'] == (0 if resumes else 1), after
            assert after["caravan_requests_resumed_total"] == (1 if resumes else 0), after
            if reformed:
                wait_for_status(http, "/health", 200, READY_TIMEOUT_S)
                assert metrics(http)["caravan_group_formations_total"] == 2
                assert "forming it again" in coordinator.stderr()
                if resumes:
                    assert words in coordinator.stderr(), "the failure was not logged"
            else:
                assert http.get("/health").status_code == 200, "a rejected step must not fail the group"
                assert after["caravan_group_formations_total"] == 1
                assert "forming it again" not in coordinator.stderr()
            # The same worker processes serve the reference text again.
            assert greedy_text(client, checkpoint.name, ref) == ref["text"]
            assert sorted(children(coordinator.proc.pid)) == workers, "a worker was restarted"
            assert http.get("/health").status_code == 200
    finally:
        coordinator.stop()


def test_a_long_step_on_live_ranks_is_not_taken_for_a_dead_rank(checkpoint, reference):
    """Every rank takes 6 s over step 3 (past the health check's 2 s deadline, well inside the step
    timeout): the health checks made meanwhile are still answered, so the group is not formed
    again and the request ends as it does without the pause."""
    env = dict(os.environ, CARAVAN_INJECT_FAULT="stall@3/6000ms")
    coordinator = Coordinator(["--model", checkpoint, "--tp", 2, "--local-workers", "--port", 0], env=env)
    try:
        url = coordinator.wait_ready()
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        ref = reference["completions"][0]
        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
            assert greedy_text(client, checkpoint.name, ref) == ref["text"]
            after = metrics(http)
            assert after["caravan_group_formations_total"] == 1, "a slow step was taken for a dead rank"
            assert after["caravan_requests_resumed_total"] == 0, after
            assert "forming it again" not in coordinator.stderr()
    finally:
        coordinator.stop()
