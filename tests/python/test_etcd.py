"""End-to-end tests of cluster membership in etcd, with a real etcd server (Debian's etcd-server)
on loopback, real coordinators and workers.

- Workers register under leases; the leading coordinator forms the group from them.
- Two coordinators share the etcd: one leads, the standby answers 503; when the leader is
  SIGKILLed, the standby takes over within 10 s, forms the group again and serves correctly.
- A worker SIGKILLed: its lease expires, a replacement registers, the group is formed again.
"""
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid

import httpx
import openai
import pytest

from conftest import READY_TIMEOUT_S, Coordinator, greedy_text, bin_path, ctl_status, free_port, wait_for_status

TIMEOUT_S = 60.0
TAKEOVER_DEADLINE_S = 10.0
LEASE_TTL_S = 2


@pytest.fixture(scope="module")
def etcd_url():
    etcd = shutil.which("etcd")
    if etcd is None:
        pytest.fail("etcd not found: scripts/setup.sh installs Debian's etcd-server", pytrace=False)
    client, peer = free_port(), free_port()
    data = tempfile.mkdtemp(prefix="caravan-etcd-")
    url = f"http://127.0.0.1:{client}"
    proc = subprocess.Popen(
        [etcd, "--name", "caravan-test", "--data-dir", data,
         "--listen-client-urls", url, "--advertise-client-urls", url,
         "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"caravan-test=http://127.0.0.1:{peer}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=url, timeout=2) as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if http.get("/health").json().get("health") == "true":
                        break
                except (httpx.TransportError, ValueError):
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("etcd did not become healthy", pytrace=False)
                time.sleep(0.1)  # waiting for an external process to start, with a deadline
        yield url
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(data, ignore_errors=True)


def start_worker(etcd_url, prefix):
    return subprocess.Popen([str(bin_path("caravan-worker")), "--etcd-endpoints", etcd_url,
                             "--etcd-prefix", prefix, "--etcd-lease-ttl", str(LEASE_TTL_S),
                             "--listen", "127.0.0.1:0"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def greedy_matches(url, model, ref):
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
    return greedy_text(client, model, ref) == ref["text"]


def test_standby_takes_over_and_groups_reform_from_etcd(etcd_url, checkpoint, reference):
    prefix = f"/caravan-test-{uuid.uuid4().hex[:8]}"
    common = ["--model", checkpoint, "--tp", 2, "--etcd-endpoints", etcd_url, "--etcd-prefix", prefix,
              "--etcd-lease-ttl", LEASE_TTL_S, "--grpc-addr", "127.0.0.1:0"]
    port_a, port_b = free_port(), free_port()
    leader = Coordinator([*common, "--port", port_a])
    workers = [start_worker(etcd_url, prefix) for _ in range(2)]
    standby = None
    ref = reference["completions"][0]
    try:
        url_a = leader.wait_ready()
        assert greedy_matches(url_a, checkpoint.name, ref)

        standby = Coordinator([*common, "--port", port_b])
        url_b = f"http://127.0.0.1:{port_b}"
        with httpx.Client(base_url=url_b, timeout=TIMEOUT_S) as http_b:
            health = wait_for_status(http_b, "/health", 503, READY_TIMEOUT_S)
            assert health.json()["reason"].startswith("standby"), health.text
            refused = http_b.post("/v1/completions", json={"model": checkpoint.name, "prompt": "Hi", "max_tokens": 2})
            assert refused.status_code == 503 and refused.json()["error"]["message"], refused.text
            standby_status = ctl_status(url_b)
            assert not standby_status["ready"] and standby_status["reason"].startswith("standby"), standby_status
            assert ctl_status(url_a)["ready"]

            # The leader dies without a word; the standby must serve within 10 s.
            leader.proc.send_signal(signal.SIGKILL)
            leader.proc.wait()
            wait_for_status(http_b, "/health", 200, TAKEOVER_DEADLINE_S)
            assert greedy_matches(url_b, checkpoint.name, ref)
            assert ctl_status(url_b)["ready"]

            # A worker dies: its lease expires and the group cannot serve; a replacement joins
            # and the group is formed again, without restarting the coordinator.
            workers[1].send_signal(signal.SIGKILL)
            workers[1].wait()
            wait_for_status(http_b, "/health", 503, LEASE_TTL_S + 5)
            workers.append(start_worker(etcd_url, prefix))
            wait_for_status(http_b, "/health", 200, READY_TIMEOUT_S)
            assert greedy_matches(url_b, checkpoint.name, ref)
    finally:
        leader.stop()
        if standby is not None:
            standby.stop()
        for w in workers:
            if w.poll() is None:
                w.kill()
            w.wait()
