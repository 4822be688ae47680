"""End-to-end tests of how the coordinator forms and watches its worker group, with real processes.

- Remote workers: a coordinator without `--local-workers` answers 503 until the workers it waits for
  register over gRPC, then serves the transformers reference outputs.
- Worker death: SIGKILL one worker of a local TP-2 group in the middle of a streamed completion; the
  stream must end with an explicit error, /health must turn 503, later requests get 503 JSON errors,
  and the coordinator keeps answering.

Run: .venv/bin/python -m pytest tests/python  (after `cargo build --workspace --bins`)
"""
import json
import os
import queue
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import READY_RE, READY_TIMEOUT_S, REPO, _pump_stdout, _stop

TIMEOUT_S = 60.0
HEALTH_DEADLINE_S = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bin_path(name: str) -> Path:
    path = Path(os.environ.get("CARAVAN_BIN_DIR", REPO / "target" / "debug")) / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"{path} not found: build it with `cargo build --workspace --bins`", pytrace=False)
    return path


class Coordinator:
    """A caravan-coordinator process in its own session, its stdout pumped into a queue."""

    def __init__(self, args):
        self.log = tempfile.NamedTemporaryFile(prefix="caravan-coordinator-", suffix=".log", delete=False)
        self.cmd = [str(bin_path("caravan-coordinator")), *map(str, args)]
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, start_new_session=True)
        self.log.close()
        self.lines, self.queue = [], queue.Queue()
        threading.Thread(target=_pump_stdout, args=(self.proc.stdout, self.lines, self.queue), daemon=True).start()

    def stderr(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()[-6000:]

    def wait_ready(self) -> str:
        """The URL from the ready line."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self.queue.get(timeout=1.0)
            except queue.Empty:
                line = ""
            if line is None or self.proc.poll() is not None:
                break
            match = READY_RE.match(line)
            if match:
                return match["url"]
        pytest.fail(f"`{' '.join(self.cmd)}` did not become ready\nstderr:\n{self.stderr()}", pytrace=False)

    def stop(self):
        problems = _stop(self.proc)
        assert not problems, "; ".join(problems) + "\n" + self.stderr()
        os.unlink(self.log.name)


def children(pid: int) -> list:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(p) for p in (task / "children").read_text().split()]
    return kids


def wait_for_status(http: httpx.Client, path: str, status: int, deadline_s: float):
    """Polls GET `path` until it answers `status`; returns the response (fails after the deadline)."""
    deadline = time.monotonic() + deadline_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = http.get(path)
            if last.status_code == status:
                return last
        except httpx.TransportError as e:
            last = e
        time.sleep(0.05)  # polling a status that changes asynchronously, with a deadline
    pytest.fail(f"GET {path} did not answer {status} within {deadline_s}s; last: {last!r}", pytrace=False)


def test_remote_workers_register_then_serve(checkpoint, reference):
    grpc_port, http_port = free_port(), free_port()
    coordinator = Coordinator(["--model", checkpoint, "--tp", 2, "--host", "127.0.0.1", "--port", http_port,
                               "--grpc-addr", f"127.0.0.1:{grpc_port}"])
    workers = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=TIMEOUT_S) as http:
            # HTTP is up before any worker: health and requests say why they cannot be served.
            health = wait_for_status(http, "/health", 503, READY_TIMEOUT_S)
            assert "reason" in health.json(), health.text
            ref = reference["completions"][0]
            resp = http.post("/v1/completions", json={"model": checkpoint.name, "prompt": ref["prompt"],
                                                      "max_tokens": 4})
            assert resp.status_code == 503 and "error" in resp.json(), resp.text

            for _ in range(2):
                workers.append(subprocess.Popen(
                    [str(bin_path("caravan-worker")), "--coordinator", f"http://127.0.0.1:{grpc_port}",
                     "--listen", "127.0.0.1:0"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
            url = coordinator.wait_ready()
            assert url == f"http://127.0.0.1:{http_port}"
            assert http.get("/health").status_code == 200
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
            out = client.completions.create(model=checkpoint.name, prompt=ref["prompt"], temperature=0,
                                            max_tokens=len(ref["gen_ids"]))
            assert out.choices[0].text == ref["text"]
    finally:
        coordinator.stop()
        for w in workers:
            w.kill()
            w.wait()


def test_worker_death_fails_requests_and_health(checkpoint):
    coordinator = Coordinator(["--model", checkpoint, "--tp", 2, "--local-workers", "--port", 0])
    try:
        url = coordinator.wait_ready()
        workers = children(coordinator.proc.pid)
        assert len(workers) == 2, f"expected 2 worker processes, found {workers}"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        stream = client.completions.create(model=checkpoint.name, prompt="Once upon a time", max_tokens=400,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        received, error = [], None
        try:
            for chunk in stream:
                received.append(chunk)
                if len(received) == 1:
                    os.kill(workers[1], signal.SIGKILL)
        except openai.APIError as e:
            error = e
        assert error is not None, f"stream ended without an error after {len(received)} chunks"
        assert len(received) < 400
        assert all(c.choices[0].finish_reason is None for c in received), "the stream claimed to finish"

        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
            health = wait_for_status(http, "/health", 503, HEALTH_DEADLINE_S)
            assert health.json().get("reason"), health.text
            resp = http.post("/v1/completions", json={"model": checkpoint.name, "prompt": "Hi", "max_tokens": 2})
            assert resp.status_code == 503, resp.text
            assert json.loads(resp.text)["error"]["message"], resp.text
            assert http.get("/v1/models").status_code == 200, "the coordinator stopped answering"
        assert coordinator.proc.poll() is None, "the coordinator exited when a worker died"
    finally:
        coordinator.stop()
