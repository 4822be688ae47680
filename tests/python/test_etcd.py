"""End-to-end tests of cluster membership in etcd, with a real etcd server (Debian's etcd-server)
on loopback, real coordinators and workers.

- Workers register under leases; the leading coordinator forms the group from them.
- Two coordinators share the etcd: one leads, the standby answers 503; when the leader is
  SIGKILLed, the standby takes over within 10 s, forms the group again and serves correctly.
- A worker SIGKILLed: its lease expires, a replacement registers, the group is formed again.
- With a spare registered: rank 1 SIGKILLed mid-stream is replaced by the spare well before its
  lease expires, and the stream ends as without the fault.
- etcd restarted under load: etcd is off the data path, so every request completes correctly and
  the leader keeps leading (its lease survives the restart).
- etcd down for longer than the lease TTL: the leader steps down (in-flight requests end with an
  explicit error, /health 503 "standby"), and leads and serves again when etcd returns, without
  restarting any process.
"""
import base64
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
import uuid

import httpx
import openai
import pytest

from conftest import (READY_TIMEOUT_S, Coordinator, Load, greedy_text, bin_path, ctl_status, free_port, listening_pid,
                      metrics, wait_for_metric, wait_for_spares, wait_for_status)

TIMEOUT_S = 60.0
TAKEOVER_DEADLINE_S = 10.0
LEASE_TTL_S = 2


class EtcdServer:
    """A single-member etcd on loopback that can be stopped and started again on the same ports
    and data (a restart, or an outage). With `tls` ({"cert", "key", "ca"}), it serves HTTPS with
    that certificate and requires client certificates signed by that CA (`--client-cert-auth`)."""

    def __init__(self, tls=None):
        self.binary = shutil.which("etcd")
        if self.binary is None:
            pytest.fail("etcd not found: scripts/setup.sh installs Debian's etcd-server", pytrace=False)
        self.client_port, self.peer_port = free_port(), free_port()
        self.data = tempfile.mkdtemp(prefix="caravan-etcd-")
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.client_port}"
        self.proc = None

    def http(self, timeout):
        """A client of the JSON gateway, with the server's own certificate as its identity."""
        if not self.tls:
            return httpx.Client(base_url=self.url, timeout=timeout)
        context = ssl.create_default_context(cafile=str(self.tls["ca"]))
        context.load_cert_chain(str(self.tls["cert"]), str(self.tls["key"]))
        return httpx.Client(base_url=self.url, timeout=timeout, verify=context)

    def start(self):
        peer = f"http://127.0.0.1:{self.peer_port}"
        tls = []
        if self.tls:
            tls = ["--cert-file", str(self.tls["cert"]), "--key-file", str(self.tls["key"]),
                   "--trusted-ca-file", str(self.tls["ca"]), "--client-cert-auth"]
        self.proc = subprocess.Popen(
            [self.binary, "--name", "caravan-test", "--data-dir", self.data,
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"caravan-test={peer}", *tls],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with self.http(timeout=2) as http:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if http.get("/health").json().get("health") == "true":
                        return
                except (httpx.TransportError, ValueError):
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("etcd did not become healthy", pytrace=False)
                time.sleep(0.1)  # waiting for an external process to start, with a deadline

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()

    def __enter__(self):
        """Started; stopped and its data removed on leaving."""
        self.start()
        return self

    def __exit__(self, *_):
        self.stop()
        shutil.rmtree(self.data, ignore_errors=True)

    def keys(self, prefix: str) -> list:
        """The keys under `prefix`, through etcd's JSON gateway."""
        b64 = lambda b: base64.b64encode(b).decode()
        end = prefix.encode()[:-1] + bytes([prefix.encode()[-1] + 1])
        with self.http(timeout=5) as http:
            r = http.post("/v3/kv/range", json={"key": b64(prefix.encode()), "range_end": b64(end),
                                                "keys_only": True})
        r.raise_for_status()
        return [base64.b64decode(kv["key"]).decode() for kv in r.json().get("kvs", [])]


@pytest.fixture(scope="module")
def etcd_url():
    with EtcdServer() as etcd:
        yield etcd.url


@pytest.fixture
def own_etcd():
    """An etcd of the test's own, for tests that stop it."""
    with EtcdServer() as etcd:
        yield etcd


def start_worker(etcd_url, prefix, lease_ttl=LEASE_TTL_S, extra=()):
    return subprocess.Popen([str(bin_path("caravan-worker")), "--etcd-endpoints", etcd_url,
                             "--etcd-prefix", prefix, "--etcd-lease-ttl", str(lease_ttl),
                             "--listen", "127.0.0.1:0", *map(str, extra)],
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


def test_a_spare_in_etcd_takes_a_dead_ranks_place_before_its_lease_expires(etcd_url, checkpoint):
    """Workers under 30 s leases, a third one a spare (`caravanctl status`, /metrics). Rank 1 is
    SIGKILLed mid-stream: the failed step shows it dead, so the group is formed with the spare
    well before the dead worker's lease expires, and the stream ends as without the fault."""
    worker_ttl = 30
    prefix = f"/caravan-test-{uuid.uuid4().hex[:8]}"
    coordinator = Coordinator(["--model", checkpoint, "--tp", 2, "--etcd-endpoints", etcd_url, "--etcd-prefix", prefix,
                               "--etcd-lease-ttl", LEASE_TTL_S, "--grpc-addr", "127.0.0.1:0", "--port", 0])
    workers = [start_worker(etcd_url, prefix, lease_ttl=worker_ttl) for _ in range(2)]
    try:
        url = coordinator.wait_ready()
        workers.append(start_worker(etcd_url, prefix, lease_ttl=worker_ttl))
        before = wait_for_spares(url, 1)
        group, spare = [w["id"] for w in before["workers"]], before["spares"][0]
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        prompt, max_tokens = "Once upon a time", 300
        expected = client.completions.create(model=checkpoint.name, prompt=prompt, max_tokens=max_tokens,
                                             temperature=0, extra_body={"ignore_eos": True}).choices[0].text
        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
            assert metrics(http)["caravan_workers_spare"] == 1
            rank1_port = int(before["workers"][1]["address"].rsplit(":", 1)[1])
            victim = listening_pid([w.pid for w in workers], rank1_port)
            stream = client.completions.create(model=checkpoint.name, prompt=prompt, max_tokens=max_tokens,
                                               temperature=0, stream=True, extra_body={"ignore_eos": True})
            chunks = []
            for chunk in stream:
                chunks.append(chunk)
                if len(chunks) == 5:
                    os.kill(victim, signal.SIGKILL)
            wait_for_status(http, "/health", 200, READY_TIMEOUT_S)
            assert "".join(c.choices[0].text for c in chunks) == expected
            assert chunks[-1].choices[0].finish_reason == "length"
            # From the failed step to the next group taking the stream over, as the coordinator
            # measured it (a wall clock here would also count the rest of the stream's tokens).
            wait_for_metric(http, "caravan_recovery_seconds_count", lambda n: n >= 1)
            took = metrics(http)["caravan_recovery_seconds_sum"]
            assert took < worker_ttl / 2, f"the group was formed {took:.1f}s after the failure: it waited for the lease"
            after = ctl_status(url)
            assert [w["id"] for w in after["workers"]] == [group[0], spare], (before, after)
            assert metrics(http)["caravan_recovery_seconds_count"] == 1
    finally:
        coordinator.stop()
        for w in workers:
            if w.poll() is None:
                w.kill()
            w.wait()


def test_etcd_restart_under_load_loses_nothing(own_etcd, checkpoint, reference):
    ttl = 6
    prefix = f"/caravan-test-{uuid.uuid4().hex[:8]}"
    leader = Coordinator(["--model", checkpoint, "--tp", 2, "--etcd-endpoints", own_etcd.url, "--etcd-prefix", prefix,
                          "--etcd-lease-ttl", ttl, "--grpc-addr", "127.0.0.1:0", "--port", 0])
    workers = [start_worker(own_etcd.url, prefix, ttl) for _ in range(2)]
    load = None
    try:
        url = leader.wait_ready()
        load = Load(url, checkpoint.name, reference["completions"])
        load.wait_for(3, TIMEOUT_S)
        own_etcd.stop()
        own_etcd.start()
        restarted = len(load.results)
        # Load goes on for longer than a lease TTL after the restart: a leader or worker that
        # mishandled the restart would have lost its lease by then.
        load.wait_for(restarted + 3, TIMEOUT_S)
        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
            deadline = time.monotonic() + 2 * ttl
            while time.monotonic() < deadline:
                assert http.get("/health").status_code == 200, http.get("/health").text
                time.sleep(0.5)  # sampling health over two TTLs; no synchronisation rides on this
        results = load.finish()
        load = None
        failed = [(r["prompt"][:30], str(e)) for r, _, _, e in results if e is not None]
        assert not failed, f"{len(failed)} of {len(results)} requests failed across the etcd restart: {failed[:3]}"
        wrong = [r["prompt"][:30] for r, text, finish, _ in results if text != r["text"] or finish is None]
        assert not wrong, f"{len(wrong)} of {len(results)} streams differ from transformers: {wrong[:3]}"
        assert len(results) > restarted
        assert leader.proc.poll() is None and ctl_status(url)["ready"]
        assert "lost the leadership" not in leader.stderr()
        assert len(own_etcd.keys(prefix + "/workers/")) == 2, own_etcd.keys(prefix)
    finally:
        if load is not None:
            load.finish()
        leader.stop()
        for w in workers:
            w.kill()
            w.wait()


def test_etcd_outage_longer_than_the_lease_steps_the_leader_down_then_it_leads_again(
        own_etcd, checkpoint, reference):
    ttl = 2
    prefix = f"/caravan-test-{uuid.uuid4().hex[:8]}"
    # Two sequences at a time, so six long streams take far longer than the lease.
    leader = Coordinator(["--model", checkpoint, "--tp", 2, "--etcd-endpoints", own_etcd.url, "--etcd-prefix", prefix,
                          "--etcd-lease-ttl", ttl, "--grpc-addr", "127.0.0.1:0", "--port", 0,
                          "--max-batch-size", 2])
    workers = [start_worker(own_etcd.url, prefix, ttl) for _ in range(2)]
    try:
        url = leader.wait_ready()
        ref = reference["completions"][0]
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        outcomes, lock, first_chunk = [], threading.Lock(), threading.Event()

        def stream():
            chunks, finish, error = 0, None, None
            try:
                for chunk in client.completions.create(model=checkpoint.name, prompt="Once upon a time",
                                                       max_tokens=400, temperature=0, stream=True,
                                                       extra_body={"ignore_eos": True}):
                    chunks += 1
                    first_chunk.set()
                    finish = chunk.choices[0].finish_reason or finish
            except Exception as e:  # noqa: BLE001 - any way a stream can end counts
                error = e
            with lock:
                outcomes.append((chunks, finish, error))

        threads = [threading.Thread(target=stream) for _ in range(6)]
        for t in threads:
            t.start()
        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
            assert first_chunk.wait(TIMEOUT_S), "no stream started"
            own_etcd.stop()
            stopped_at = time.monotonic()
            health = wait_for_status(http, "/health", 503, ttl + 3)
            assert health.json()["reason"].startswith("standby"), health.text
            for t in threads:
                t.join(TIMEOUT_S)
            # Every stream finished before the step-down or ended with an explicit error event;
            # with 6 x 400 tokens two at a time, some were cut by it.
            assert len(outcomes) == 6
            silent = [o for o in outcomes if o[2] is None and o[1] != "length"]
            assert not silent, f"streams that ended with neither a finish nor an error: {silent}"
            errors = [o for o in outcomes if o[2] is not None]
            assert errors, f"no stream was ended by the step-down: {outcomes}"
            assert all(isinstance(e, openai.APIError) for _, _, e in errors), [repr(e) for _, _, e in errors]
            assert time.monotonic() - stopped_at < TIMEOUT_S
            refused = http.post("/v1/completions", json={"model": checkpoint.name, "prompt": "Hi", "max_tokens": 2})
            assert refused.status_code == 503 and refused.json()["error"]["message"], refused.text

            own_etcd.start()
            wait_for_status(http, "/health", 200, READY_TIMEOUT_S)
            assert greedy_text(client, checkpoint.name, ref) == ref["text"]
            assert leader.proc.poll() is None and all(w.poll() is None for w in workers)
    finally:
        leader.stop()
        for w in workers:
            w.kill()
            w.wait()


def test_a_draining_leader_keeps_the_lead_until_drained_then_hands_it_over(own_etcd, checkpoint, reference):
    """SIGTERM on the leader: its streams finish on its workers (a standby must not take them
    mid-drain), then it revokes its lease so the standby leads at once, not a TTL later."""
    ttl = 10
    prefix = f"/caravan-test-{uuid.uuid4().hex[:8]}"
    common = ["--model", checkpoint, "--tp", 2, "--etcd-endpoints", own_etcd.url, "--etcd-prefix", prefix,
              "--etcd-lease-ttl", ttl, "--grpc-addr", "127.0.0.1:0", "--max-batch-size", 1]
    port_a, port_b = free_port(), free_port()
    leader = Coordinator([*common, "--port", port_a, "--drain-timeout", 120])
    workers = [start_worker(own_etcd.url, prefix) for _ in range(2)]
    standby = None
    try:
        url_a = leader.wait_ready()
        standby = Coordinator([*common, "--port", port_b])
        url_b = f"http://127.0.0.1:{port_b}"
        client = openai.OpenAI(base_url=url_a + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        outcomes, lock, first_chunk = [], threading.Lock(), threading.Event()

        def stream():
            finish, error = None, None
            try:
                for chunk in client.completions.create(model=checkpoint.name, prompt="Once upon a time",
                                                       max_tokens=250, temperature=0, stream=True,
                                                       extra_body={"ignore_eos": True}):
                    first_chunk.set()
                    finish = chunk.choices[0].finish_reason or finish
            except Exception as e:  # noqa: BLE001 - any way a stream can end counts
                error = e
            with lock:
                outcomes.append((finish, error))

        # One sequence at a time: three long streams take longer than a TTL to drain.
        threads = [threading.Thread(target=stream) for _ in range(3)]
        for t in threads:
            t.start()
        with httpx.Client(base_url=url_b, timeout=TIMEOUT_S) as http_b:
            health = wait_for_status(http_b, "/health", 503, READY_TIMEOUT_S)
            assert health.json()["reason"].startswith("standby"), health.text
            assert first_chunk.wait(TIMEOUT_S), "no stream started"
            leader.proc.send_signal(signal.SIGTERM)
            for t in threads:
                t.join(TIMEOUT_S)
            assert outcomes == [("length", None)] * 3, outcomes
            drained = time.monotonic()
            leader.proc.wait(TIMEOUT_S)
            exited = time.monotonic()
            assert exited - drained < 5, "the leader did not exit once drained"
            wait_for_status(http_b, "/health", 200, READY_TIMEOUT_S)
            took = time.monotonic() - exited
            assert took < ttl - 2, f"the standby led {took:.1f}s after the leader exited: the lease was not revoked"
            assert greedy_matches(url_b, checkpoint.name, reference["completions"][0])
    finally:
        leader.stop()
        if standby is not None:
            standby.stop()
        for w in workers:
            w.kill()
            w.wait()


def test_forwarding_standbys_serve_through_the_leader(etcd_url, checkpoint, reference):
    """--forward-to-leader: a standby answers completions (streamed or not), /health and the status
    pages through the leader, so it is ready exactly when the leader is; models and metrics stay
    its own; a request already forwarded once is never forwarded again. Once the leader dies the
    standby leads and serves itself; a new standby forwards to it, and a drain lets the forwarded
    stream in flight finish."""
    prefix = f"/caravan-test-{uuid.uuid4().hex[:8]}"
    common = ["--model", checkpoint, "--tp", 2, "--etcd-endpoints", etcd_url, "--etcd-prefix", prefix,
              "--etcd-lease-ttl", LEASE_TTL_S, "--grpc-addr", "127.0.0.1:0", "--forward-to-leader"]
    port_a, port_b, port_c = free_port(), free_port(), free_port()
    leader = Coordinator([*common, "--port", port_a])
    workers = [start_worker(etcd_url, prefix) for _ in range(2)]
    standby = third = None
    ref = reference["completions"][0]
    try:
        url_a = leader.wait_ready()
        standby = Coordinator([*common, "--port", port_b])
        url_b = f"http://127.0.0.1:{port_b}"
        with httpx.Client(base_url=url_b, timeout=TIMEOUT_S) as http_b:
            # Ready through the leader: /health is the leader's 200, and so is the status.
            wait_for_status(http_b, "/health", 200, READY_TIMEOUT_S)
            status = ctl_status(url_b)
            assert status["ready"] and [w["health"] for w in status["workers"]] == ["ready", "ready"], status
            assert greedy_matches(url_b, checkpoint.name, ref)
            client = openai.OpenAI(base_url=url_b + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
            streamed = "".join(c.choices[0].text for c in client.completions.create(
                model=checkpoint.name, prompt=ref["prompt"], max_tokens=len(ref["gen_ids"]), temperature=0,
                stream=True))
            assert streamed == ref["text"]
            assert http_b.get("/v1/models").json()["data"][0]["id"] == checkpoint.name
            # Its own metrics: not leading (caravan_ready 0), the forwarded requests counted.
            mine = metrics(http_b)
            assert mine["caravan_ready"] == 0 and mine["caravan_forwarded_requests_total"] >= 4, mine
            assert mine["caravan_forwarded_requests_in_flight"] == 0, mine
            # Forwarded once already: answered here, not sent on again.
            looped = http_b.get("/health", headers={"x-caravan-forwarded-by": "http://elsewhere"})
            assert looped.status_code == 503 and looped.json()["reason"].startswith("standby"), looped.text

            # The leader dies: the standby leads and serves itself.
            leader.proc.send_signal(signal.SIGKILL)
            leader.proc.wait()
            wait_for_status(http_b, "/health", 200, TAKEOVER_DEADLINE_S + READY_TIMEOUT_S)
            assert metrics(http_b)["caravan_ready"] == 1
            assert greedy_matches(url_b, checkpoint.name, ref)

        # A new standby forwards to the new leader; drained mid-stream, it lets the stream finish.
        third = Coordinator([*common, "--port", port_c, "--drain-timeout", 60])
        url_c = f"http://127.0.0.1:{port_c}"
        with httpx.Client(base_url=url_c, timeout=TIMEOUT_S) as http_c:
            wait_for_status(http_c, "/health", 200, READY_TIMEOUT_S)
            client = openai.OpenAI(base_url=url_c + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
            chunks = client.completions.create(model=checkpoint.name, prompt="Once upon a time", max_tokens=200,
                                               temperature=0, stream=True, extra_body={"ignore_eos": True})
            first = next(iter(chunks))
            assert metrics(http_c)["caravan_forwarded_requests_in_flight"] == 1
            third.proc.send_signal(signal.SIGTERM)
            finish = first.choices[0].finish_reason
            for chunk in chunks:
                finish = chunk.choices[0].finish_reason or finish
            assert finish == "length"
            assert third.proc.wait(TIMEOUT_S) == 0
    finally:
        for c in (leader, standby, third):
            if c is not None:
                c.stop()
        for w in workers:
            if w.poll() is None:
                w.kill()
            w.wait()
