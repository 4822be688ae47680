"""End-to-end tests of how the coordinator forms and watches its worker group, with real processes.

- Remote workers: a coordinator without `--local-workers` answers 503 until the workers it waits for
  register over gRPC, then serves the transformers reference outputs. `caravanctl health --wait`
  (the Helm chart's serving gate) waits through the 503s and returns once the group serves; it
  gives up with the reason when nothing answers in time.
- A worker in a memory-limited cgroup (a pod's `limits.memory`) reports the cgroup's headroom,
  not the host's available memory, so the KV cache it is given fits the limit.
- Worker death, with the default --recovery-timeout: the requests in flight wait for the group
  to be formed again and go on, ending exactly as without the fault: 8 streams (greedy and seeded
  sampling) through two kills in turn, a request arriving during the recovery, four clients under
  load, a kill during a long prefill (the 296-token prompt's step in flight). With remote workers
  and no replacement, the requests end with an explicit error after the recovery timeout.
- Spare workers (`--local-spares 1`): the spare is listed, takes the dead rank's place at once
  (rank 0 keeps its own), the streams end as without the fault, the restarted worker is the new
  spare.
- Worker death with --recovery-timeout 0: the stream ends with an explicit error within 5 s,
  /health turns 503, later requests get 503 JSON errors, and the coordinator keeps answering;
  then the restarted worker joins a new group and serving resumes without restarting it.
- Drain: SIGTERM during a stream lets it finish, refuses new requests with 503, then exits.

Run: .venv/bin/python -m pytest tests/python  (after `cargo build --workspace --bins`)
"""
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from conftest import (READY_TIMEOUT_S, Coordinator, Load, metrics, greedy_text, bin_path, children, ctl_status, free_port,
                      listening_pid, stream_text, wait_for_chunks, wait_for_metric, wait_for_spares, wait_for_status)

TIMEOUT_S = 60.0
HEALTH_DEADLINE_S = 5.0


def test_remote_workers_register_then_serve(checkpoint, reference):
    grpc_port, http_port = free_port(), free_port()
    coordinator = Coordinator(["--model", checkpoint, "--tp", 2, "--host", "127.0.0.1", "--port", http_port,
                               "--grpc-addr", f"127.0.0.1:{grpc_port}"])
    workers, gate = [], None
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=TIMEOUT_S) as http:
            # HTTP is up before any worker: health and requests say why they cannot be served.
            health = wait_for_status(http, "/health", 503, READY_TIMEOUT_S)
            assert "reason" in health.json(), health.text
            ref = reference["completions"][0]
            resp = http.post("/v1/completions", json={"model": checkpoint.name, "prompt": ref["prompt"],
                                                      "max_tokens": 4})
            assert resp.status_code == 503 and "error" in resp.json(), resp.text

            # Nothing listening: the wait gives up after its time with the reason.
            gone = subprocess.run([str(bin_path("caravanctl")), "--url", f"http://127.0.0.1:{free_port()}",
                                   "health", "--wait", "1"], capture_output=True, text=True, timeout=30)
            assert gone.returncode == 1 and "unavailable after 1 s: not reachable" in gone.stdout, gone
            # The serving gate waits through the 503s: it has said why before any worker exists.
            gate = subprocess.Popen([str(bin_path("caravanctl")), "--url", f"http://127.0.0.1:{http_port}",
                                     "health", "--wait", "300"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            first = gate.stderr.readline()
            assert "waiting: HTTP 503: " in first and gate.poll() is None, first

            for _ in range(2):
                workers.append(subprocess.Popen(
                    [str(bin_path("caravan-worker")), "--coordinator", f"http://127.0.0.1:{grpc_port}",
                     "--listen", "127.0.0.1:0"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
            url = coordinator.wait_ready()
            assert url == f"http://127.0.0.1:{http_port}"
            gate_out, gate_err = gate.communicate(timeout=60)
            assert gate.returncode == 0 and gate_out.startswith("ok after "), (gate_out, gate_err)
            assert http.get("/health").status_code == 200
            status = ctl_status(url)
            assert status["ready"] and [w["health"] for w in status["workers"]] == ["ready", "ready"], status
            assert [w["rank"] for w in status["workers"]] == [0, 1] and status["tensor_parallel_size"] == 2
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
            assert greedy_text(client, checkpoint.name, ref) == ref["text"]
    finally:
        if gate is not None and gate.poll() is None:
            gate.kill()
            gate.communicate()
        coordinator.stop()
        for w in workers:
            w.kill()
            w.wait()


class MemoryCgroup:
    """A child memory cgroup with a limit (cgroup v1's memory controller, or v2 where the root
    delegates memory), like a Kubernetes pod's `limits.memory`. Needs root."""

    def __init__(self, limit_bytes):
        if os.geteuid() != 0:
            pytest.fail("the cgroup test needs root to create a memory cgroup", pytrace=False)
        name = f"caravan-test-{uuid.uuid4().hex[:8]}"
        v1, v2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")
        if (v1 / "cgroup.procs").exists():
            self.dir, limit_file = v1 / name, "memory.limit_in_bytes"
        elif "memory" in (v2 / "cgroup.subtree_control").read_text():
            self.dir, limit_file = v2 / name, "memory.max"
        else:
            pytest.fail("no writable memory cgroup (v1 memory controller, or v2 with memory delegated)",
                        pytrace=False)
        self.dir.mkdir()
        self.procs = self.dir / "cgroup.procs"
        try:
            (self.dir / limit_file).write_text(str(limit_bytes))
        except OSError:
            self.close()
            raise

    def close(self):
        try:
            self.dir.rmdir()
        except OSError as e:  # still busy: leave it rather than hide the test's own failure
            print(f"could not remove {self.dir}: {e}")


def host_available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable in /proc/meminfo")


def test_a_worker_in_a_memory_limited_cgroup_sizes_from_the_limit_not_the_host(checkpoint, reference):
    limit = 1 << 30
    assert host_available_memory() > 2 * limit, "the host must have more memory than the limit for this test"
    cgroup = MemoryCgroup(limit)
    coordinator, worker = None, None
    try:
        grpc_port = free_port()
        coordinator = Coordinator(["--model", checkpoint, "--tp", 1, "--port", 0,
                                   "--grpc-addr", f"127.0.0.1:{grpc_port}"])
        # The worker joins the cgroup before it starts, as a container's process would be.
        worker = subprocess.Popen(
            ["sh", "-c", f'echo $$ > {cgroup.procs} && exec "$0" "$@"', str(bin_path("caravan-worker")),
             "--coordinator", f"http://127.0.0.1:{grpc_port}", "--listen", "127.0.0.1:0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        url = coordinator.wait_ready()
        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
            [registered] = http.get("/admin/workers").json()["workers"]
        assert 0 < registered["memory_bytes"] <= limit, registered
        # Status says what the rank's memory is once loaded: the cgroup's limit, not the host's
        # total, and a KV cache of whole blocks within the 20% of the memory it was given.
        status = ctl_status(url)
        [member] = status["workers"]
        assert member["device_total_bytes"] == limit, member
        # An f32 shard on Caravan's kernels: the AVX2 loop, or AVX-512F where the CPU has it.
        assert member["kernels"] in ("AVX2/FMA", "AVX-512F"), member
        assert 0 < member["device_free_bytes"] <= limit, member
        blocks = status["kv_cache_blocks_total"]
        assert blocks > 0 and member["kv_cache_bytes"] % blocks == 0, (member, blocks)
        assert member["kv_cache_bytes"] <= 0.2 * registered["memory_bytes"], (member, registered)
        table = subprocess.run([str(bin_path("caravanctl")), "--url", url, "status"], capture_output=True,
                               text=True, timeout=30, check=True).stdout
        assert "KV CACHE" in table and "/1.0 GiB" in table, table
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        ref = reference["completions"][0]
        assert greedy_text(client, checkpoint.name, ref) == ref["text"]
    finally:
        if coordinator is not None:
            coordinator.stop()
        if worker is not None:
            worker.kill()
            worker.wait()
        cgroup.close()


# Seeded sampling among the top 4: a resumed random stream must draw what it would have. (Over
# the whole vocabulary of this random-weight model, thousands of near-equal candidates, the last
# bits in which recomputed logits differ from decoded ones would decide some draws; see
# docs/RELIABILITY.md.)
SAMPLED = {"temperature": 1.0, "seed": 1234, "frequency_penalty": 0.3, "presence_penalty": 0.2,
           "extra_body": {"top_k": 4}}


PROMPTS = ["Once upon a time", "The capital of France is", "In a hole in the ground there lived", "def main():"]


CASES = [(prompt, {"temperature": 0}) for prompt in PROMPTS] + \
    [(prompt, {**SAMPLED, "seed": 100 + i}) for i, prompt in enumerate(PROMPTS)]
STREAM_TOKENS = 300


def start_streams(client, model, cases=CASES):
    """Starts one stream per (prompt, options) case; returns their outputs and threads."""
    outs = [{} for _ in cases]
    threads = [threading.Thread(target=stream_text, args=(client, model, prompt, STREAM_TOKENS, out), kwargs=options)
               for (prompt, options), out in zip(cases, outs)]
    for t in threads:
        t.start()
    return outs, threads


def fault_free_texts(client, model):
    """What the 8 streams give without a fault, batched the same way."""
    outs, threads = start_streams(client, model)
    for t in threads:
        t.join(TIMEOUT_S)
    assert not [o["error"] for o in outs if "error" in o]
    assert outs[0]["text"] != outs[4]["text"], "sampling should differ from greedy"
    return [o["text"] for o in outs]


def assert_streams_equal(outs, threads, expected, cases=CASES):
    for t in threads:
        t.join(TIMEOUT_S)
    for (prompt, options), out, want in zip(cases, outs, expected):
        assert "error" not in out, f"{prompt!r} {options}: {out['error']!r}"
        assert out["finish"] == "length"
        assert out["text"] == want, f"{prompt!r} {options}: differs from the run without the faults"


def test_two_workers_killed_in_turn_the_streams_go_on_on_each_re_formed_group(checkpoint, reference):
    """SIGKILL of rank 1 while 8 streams run (4 greedy, 4 seeded top-k sampling), then of the
    other worker once they have gone on: every stream stays open while the coordinator restarts
    the worker and forms the group again, and ends exactly as it does without the faults (no
    token lost, repeated or drawn differently)."""
    coordinator = Coordinator(["--model", checkpoint, "--tp", 2, "--local-workers", "--port", 0])
    try:
        url = coordinator.wait_ready()
        workers = children(coordinator.proc.pid)
        assert len(workers) == 2, f"expected 2 worker processes, found {workers}"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        expected = fault_free_texts(client, checkpoint.name)

        outs, threads = start_streams(client, checkpoint.name)
        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
            late = {}
            for victim in (workers[1], workers[0]):
                wait_for_chunks(outs, threads, max(len(o.get("chunks", [])) for o in outs) + 5)
                os.kill(victim, signal.SIGKILL)
                health = wait_for_status(http, "/health", 503, HEALTH_DEADLINE_S)
                assert health.json()["reason"].startswith("recovering"), health.text
                if not late:
                    # A request that arrives while the group is formed again waits for it.
                    prompt, options = CASES[0]
                    late_thread = threading.Thread(target=stream_text, kwargs=options,
                                                   args=(client, checkpoint.name, prompt, STREAM_TOKENS, late))
                    late_thread.start()
                wait_for_status(http, "/health", 200, READY_TIMEOUT_S)
            assert_streams_equal(outs, threads, expected)
            late_thread.join(TIMEOUT_S)
            assert "error" not in late and late["text"] == expected[0], late
            after = metrics(http)
            assert after["caravan_requests_resumed_total"] >= len(CASES) + 1, after
            assert after["caravan_recovery_seconds_count"] == 2, after
            assert after['caravan_requests_total{status="error"}'] == 0, after
            assert not set(workers) & set(children(coordinator.proc.pid)), "both workers were killed"
    finally:
        coordinator.stop()


def test_a_spare_worker_takes_a_dead_ranks_place_and_the_streams_go_on(checkpoint, reference):
    """--local-spares 1: a third worker registers as a spare (`caravanctl status`, /metrics).
    SIGKILL of rank 1 while 8 streams run: the group is formed again at once with the spare as
    rank 1 while rank 0 keeps its place, every stream ends exactly as without the fault, and the
    restarted worker becomes the new spare."""
    coordinator = Coordinator(["--model", checkpoint, "--tp", 2, "--local-workers", "--local-spares", 1,
                               "--port", 0])
    try:
        url = coordinator.wait_ready()
        before = wait_for_spares(url, 1)
        assert len(children(coordinator.proc.pid)) == 3, children(coordinator.proc.pid)
        group = [w["id"] for w in before["workers"]]
        spare = before["spares"][0]
        assert spare not in group, before
        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
            assert metrics(http)["caravan_workers_spare"] == 1
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
            expected = fault_free_texts(client, checkpoint.name)

            rank1_port = int(before["workers"][1]["address"].rsplit(":", 1)[1])
            victim = listening_pid(children(coordinator.proc.pid), rank1_port)
            outs, threads = start_streams(client, checkpoint.name)
            wait_for_chunks(outs, threads, 5)
            os.kill(victim, signal.SIGKILL)
            # With a spare the pause can be shorter than a poll of /health, so the recovery is
            # seen in its metric (observed when the new group takes the requests over).
            wait_for_metric(http, "caravan_recovery_seconds_count", lambda v: v == 1, READY_TIMEOUT_S)
            wait_for_status(http, "/health", 200, READY_TIMEOUT_S)
            assert_streams_equal(outs, threads, expected)

            after = wait_for_spares(url, 1)
            assert [w["id"] for w in after["workers"]] == [group[0], spare], (before, after)
            assert after["spares"][0] not in group + [spare], after
            assert victim not in children(coordinator.proc.pid)
            m = metrics(http)
            assert m["caravan_workers_spare"] == 1, m
            assert m["caravan_recovery_seconds_count"] == 1, m
            assert m["caravan_requests_resumed_total"] >= len(CASES), m
            print(f"recovery with a spare: {m['caravan_recovery_seconds_sum']:.2f} s")
    finally:
        coordinator.stop()


def test_with_no_recovery_timeout_a_worker_death_fails_requests_then_the_group_recovers(checkpoint, reference):
    coordinator = Coordinator(["--model", checkpoint, "--tp", 2, "--local-workers", "--port", 0,
                               "--recovery-timeout", "0s"])
    try:
        url = coordinator.wait_ready()
        workers = children(coordinator.proc.pid)
        assert len(workers) == 2, f"expected 2 worker processes, found {workers}"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        stream = client.completions.create(model=checkpoint.name, prompt="Once upon a time", max_tokens=400,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        received, error, killed_at = [], None, None
        try:
            for chunk in stream:
                received.append(chunk)
                if len(received) == 1:
                    os.kill(workers[1], signal.SIGKILL)
                    killed_at = time.monotonic()
        except openai.APIError as e:
            error = e
        assert error is not None, f"stream ended without an error after {len(received)} chunks"
        took = time.monotonic() - killed_at
        assert took < HEALTH_DEADLINE_S, f"the error event came {took:.1f}s after the kill"
        assert len(received) < 400
        assert all(c.choices[0].finish_reason is None for c in received), "the stream claimed to finish"

        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
            # Within 5 s of the kill, not of this line.
            health = wait_for_status(http, "/health", 503, max(0.1, HEALTH_DEADLINE_S - (time.monotonic() - killed_at)))
            assert health.json().get("reason"), health.text
            status = ctl_status(url)
            assert not status["ready"] and status["reason"], status
            resp = http.post("/v1/completions", json={"model": checkpoint.name, "prompt": "Hi", "max_tokens": 2})
            assert resp.status_code == 503, resp.text
            assert json.loads(resp.text)["error"]["message"], resp.text
            assert http.get("/v1/models").status_code == 200, "the coordinator stopped answering"
            assert coordinator.proc.poll() is None, "the coordinator exited when a worker died"

            # The coordinator restarts the dead local worker, which registers; the group is formed
            # again (new ranks, shards reloaded, warm-up) and serving resumes, same process.
            wait_for_status(http, "/health", 200, READY_TIMEOUT_S)
            status = ctl_status(url)
            assert status["ready"] and all(w["health"] == "ready" for w in status["workers"]), status
            survivors = set(workers) & set(children(coordinator.proc.pid))
            assert survivors == {workers[0]}, "the surviving worker should have been reused"
            ref = reference["completions"][0]
            assert greedy_text(client, checkpoint.name, ref) == ref["text"]
            assert metrics(http)["caravan_requests_resumed_total"] == 0
    finally:
        coordinator.stop()


def test_worker_killed_under_load_every_request_completes_as_transformers_does(checkpoint, reference):
    coordinator = Coordinator(["--model", checkpoint, "--tp", 2, "--local-workers", "--port", 0])
    load = None
    try:
        url = coordinator.wait_ready()
        workers = children(coordinator.proc.pid)
        assert len(workers) == 2, f"expected 2 worker processes, found {workers}"
        load = Load(url, checkpoint.name, reference["completions"], threads=4)
        load.wait_for(4, TIMEOUT_S)
        os.kill(workers[1], signal.SIGKILL)
        killed = load.count()
        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
            wait_for_status(http, "/health", 503, HEALTH_DEADLINE_S)
            wait_for_status(http, "/health", 200, READY_TIMEOUT_S)
            # Serving goes on under the same load.
            recovered = load.count()
            load.wait_for(recovered + 4, TIMEOUT_S)
            results = load.finish()
            load = None
            resumed = metrics(http)["caravan_requests_resumed_total"]
        errors = [(r["prompt"][:30], repr(e)) for r, _, _, e in results if e is not None]
        assert not errors, f"requests that failed: {errors[:3]}"
        silent = [r["prompt"][:30] for r, text, finish, e in results if finish is None]
        assert not silent, f"streams that ended without a finish reason: {silent[:3]}"
        wrong = [r["prompt"][:30] for r, text, finish, e in results if text != r["text"]]
        assert not wrong, f"streams that differ from transformers: {wrong[:3]}"
        assert resumed >= 1, "no request was in flight when the worker died"
        assert killed < len(results)
    finally:
        if load is not None:
            load.finish()
        coordinator.stop()


def test_worker_killed_during_a_long_prefill_the_request_completes_on_the_re_formed_group(checkpoint, reference):
    coordinator = Coordinator(["--model", checkpoint, "--tp", 2, "--local-workers", "--port", 0])
    try:
        url = coordinator.wait_ready()
        workers = children(coordinator.proc.pid)
        assert len(workers) == 2, f"expected 2 worker processes, found {workers}"
        longest = max(reference["batch"], key=lambda c: len(c["prompt_ids"]))
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
            generated = metrics(http)["caravan_generation_tokens_total"]
            # Rank 1 is frozen first, so the prompt's prefill step is certainly in flight (running,
            # no token generated yet) when it is killed.
            os.kill(workers[1], signal.SIGSTOP)
            outcome = {}

            def request():
                try:
                    outcome["response"] = client.completions.create(
                        model=checkpoint.name, prompt=longest["prompt"], max_tokens=longest["max_tokens"],
                        temperature=0)
                except openai.APIError as e:
                    outcome["error"] = e

            thread = threading.Thread(target=request)
            thread.start()
            deadline = time.monotonic() + HEALTH_DEADLINE_S
            while metrics(http)["caravan_requests_running"] < 1:
                assert time.monotonic() < deadline, "the request never started running"
                time.sleep(0.02)  # polling a gauge the scheduler sets before each step, with a deadline
            assert metrics(http)["caravan_generation_tokens_total"] == generated, "prefill was already over"
            os.kill(workers[1], signal.SIGKILL)
            wait_for_status(http, "/health", 503, HEALTH_DEADLINE_S)
            wait_for_status(http, "/health", 200, READY_TIMEOUT_S)
            thread.join(TIMEOUT_S)
            assert "response" in outcome, f"the request did not complete: {outcome}"
            assert outcome["response"].choices[0].text == longest["text"]
            assert metrics(http)["caravan_requests_resumed_total"] == 1
    finally:
        coordinator.stop()


def test_requests_end_with_an_error_when_no_group_forms_within_the_recovery_timeout(checkpoint, reference):
    """Remote workers: one is killed and does not come back. The stream in flight, and a request
    that arrives meanwhile, wait for --recovery-timeout and then end with an explicit error; the
    coordinator keeps serving once a worker registers again."""
    grpc_port = free_port()
    coordinator = Coordinator(["--model", checkpoint, "--tp", 2, "--host", "127.0.0.1", "--port", 0,
                               "--grpc-addr", f"127.0.0.1:{grpc_port}", "--recovery-timeout", "3s"])

    def worker():
        return subprocess.Popen([str(bin_path("caravan-worker")), "--coordinator", f"http://127.0.0.1:{grpc_port}",
                                 "--listen", "127.0.0.1:0"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    workers = [worker(), worker()]
    try:
        url = coordinator.wait_ready()
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        out = {}
        thread = threading.Thread(target=stream_text, args=(client, checkpoint.name, "Once upon a time", 400, out),
                                  kwargs={"temperature": 0})
        thread.start()
        deadline = time.monotonic() + TIMEOUT_S
        while len(out.get("chunks", [])) < 2:
            assert time.monotonic() < deadline and thread.is_alive(), out
            time.sleep(0.01)  # polling the stream's progress, with a deadline
        workers[1].kill()
        workers[1].wait()
        killed_at = time.monotonic()
        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
            health = wait_for_status(http, "/health", 503, HEALTH_DEADLINE_S)
            assert health.json()["reason"].startswith("recovering"), health.text
            late = http.post("/v1/completions", json={"model": checkpoint.name, "prompt": "Hi", "max_tokens": 2})
            waited = time.monotonic() - killed_at
            assert late.status_code == 503, late.text
            assert "recovery timeout" in late.json()["error"]["message"], late.text
            assert 2.0 < waited, f"the late request was refused after {waited:.1f}s, not after waiting"
            thread.join(TIMEOUT_S)
            assert isinstance(out.get("error"), openai.APIError), out
            assert "recovery timeout" in str(out["error"]), out["error"]
            took = time.monotonic() - killed_at
            assert 3.0 <= took < 3.0 + HEALTH_DEADLINE_S, f"the stream failed {took:.1f}s after the kill"
            assert all(c.choices[0].finish_reason is None for c in out["chunks"]), "the stream claimed to finish"
            assert metrics(http)['caravan_requests_total{status="error"}'] == 2
            assert coordinator.proc.poll() is None

            workers[1] = worker()
            wait_for_status(http, "/health", 200, READY_TIMEOUT_S)
            ref = reference["completions"][0]
            assert greedy_text(client, checkpoint.name, ref) == ref["text"]
    finally:
        coordinator.stop()
        for w in workers:
            w.kill()
            w.wait()


@pytest.mark.parametrize("how", ["sigterm", "caravanctl"])
def test_drain_finishes_streams_refuses_new_requests_then_exits(checkpoint, how):
    coordinator = Coordinator(["--model", checkpoint, "--tp", 2, "--local-workers", "--port", 0,
                               "--drain-timeout", 60])
    try:
        url = coordinator.wait_ready()
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        first_chunk = threading.Event()
        outcome = {}

        def stream():
            chunks, finish = 0, None
            try:
                for chunk in client.completions.create(model=checkpoint.name, prompt="Once upon a time",
                                                       max_tokens=200, temperature=0, stream=True,
                                                       extra_body={"ignore_eos": True}):
                    chunks += 1
                    finish = chunk.choices[0].finish_reason or finish
                    first_chunk.set()
            except Exception as e:  # recorded and asserted on below
                outcome["error"] = repr(e)
            outcome.update(chunks=chunks, finish=finish)
            first_chunk.set()

        streamer = threading.Thread(target=stream)
        streamer.start()
        assert first_chunk.wait(TIMEOUT_S)
        ctl = None
        if how == "sigterm":
            coordinator.proc.send_signal(signal.SIGTERM)
        else:
            ctl = subprocess.Popen([str(bin_path("caravanctl")), "--url", url, "drain", "--timeout", "60"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
            health = wait_for_status(http, "/health", 503, HEALTH_DEADLINE_S)
            assert health.json()["reason"] == "draining", health.text
            if streamer.is_alive():
                status = ctl_status(url)
                assert status["draining"] and not status["ready"], status
            if streamer.is_alive():
                refused = http.post("/v1/completions", json={"model": checkpoint.name, "prompt": "Hi",
                                                             "max_tokens": 2})
                assert refused.status_code == 503 and "draining" in refused.json()["error"]["message"]
        streamer.join(TIMEOUT_S)
        assert outcome.get("error") is None, outcome
        assert outcome["finish"] == "length", outcome
        if ctl is not None:
            out, _ = ctl.communicate(timeout=TIMEOUT_S)
            assert ctl.returncode == 0, out
            assert "drained" in out, out
        assert coordinator.proc.wait(timeout=TIMEOUT_S) == 0, coordinator.stderr()
    finally:
        coordinator.stop()


@pytest.mark.parametrize("inherited, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")],
                         ids=["unset", "set-by-the-operator"])
def test_workers_run_with_passive_openmp_unless_the_operator_chose(checkpoint, reference, inherited, expected):
    """A worker re-executes itself with OMP_WAIT_POLICY=PASSIVE (libtorch's OpenMP threads otherwise
    spin on the decode kernel's cores), keeping its arguments; an operator's own setting stands."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if inherited is not None:
        env["OMP_WAIT_POLICY"] = inherited
    coordinator = Coordinator(["--model", checkpoint, "--tp", 2, "--local-workers", "--port", 0], env=env)
    try:
        url = coordinator.wait_ready()
        workers = children(coordinator.proc.pid)
        assert len(workers) == 2, f"expected 2 worker processes, found {workers}"
        for pid in workers:
            environ = dict(entry.split("=", 1) for entry in
                           Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
                           if "=" in entry)
            assert environ.get("OMP_WAIT_POLICY") == expected, f"worker {pid}: {environ.get('OMP_WAIT_POLICY')}"
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            assert Path(argv[0]).name == "caravan-worker" and "--coordinator" in " ".join(argv), argv
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        ref = reference["completions"][0]
        assert greedy_text(client, checkpoint.name, ref) == ref["text"]
    finally:
        coordinator.stop()


def test_a_worker_asked_for_a_device_it_cannot_use_refuses_in_one_line(checkpoint):
    """This build has no GPU support: `--device cuda`, `cuda:0` and `cuda:7` are refused at start
    with one line naming the device and how to build for GPUs (not libtorch's dispatch dump at the
    first tensor), exit status 2. A coordinator whose local workers refuse so stops with their
    reason instead of restarting them forever, and leaves no worker behind."""
    for device in ("cuda", "cuda:0", "cuda:7"):
        out = subprocess.run([str(bin_path("caravan-worker")), "--coordinator", "http://127.0.0.1:9",
                              "--device", device], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, out.stderr
        assert lines[0].startswith("error: --device cuda:") and "--features cuda" in lines[0], out.stderr

    coordinator = Coordinator(["--model", checkpoint, "--tp", 2, "--local-workers", "--device", "cuda",
                               "--port", 0])
    try:
        status = coordinator.proc.wait(timeout=READY_TIMEOUT_S)
        assert status != 0
        stderr = coordinator.stderr()
        assert "refused to start" in stderr and "--features cuda" in stderr, stderr
        assert "; restarting it" not in stderr and "aten::" not in stderr, stderr
    finally:
        coordinator.stop()


def test_nccl_asked_for_cpu_workers_is_refused_at_start(checkpoint):
    """`--collective nccl` with local workers on the CPU cannot form a group: the coordinator
    refuses at start, naming both flags, instead of failing every formation."""
    coordinator = Coordinator(["--model", checkpoint, "--tp", 2, "--local-workers", "--collective", "nccl",
                               "--port", 0])
    try:
        assert coordinator.proc.wait(timeout=READY_TIMEOUT_S) != 0
        stderr = coordinator.stderr()
        assert "--collective nccl" in stderr and "--device cpu" in stderr, stderr
    finally:
        coordinator.stop()
