"""Multi-host groups on one machine: each worker in its own network namespace with its own IP,
joined by veth pairs to a bridge (the coordinator's side), so the TCP ring and gRPC cross real
interfaces. Needs root (or passwordless sudo) for `ip netns`.

- Two "hosts" form one TP-2 group over the ring and serve the transformers reference.
- With a spare on a third host, a host cut off mid-stream is replaced without waiting for the
  partition to heal; healed, it registers again as the spare.
- A partition in the middle of a stream fails the group within about one collective timeout, not
  a hang: /health turns 503 "recovering" while the stream stays open; when the partition heals,
  the worker registers again, the group is formed again, and the stream goes on and ends exactly
  as it does without the partition. Two kinds of partition:
  - `link`: host 1's link goes down; its peers' collectives time out.
  - `coordinator-route`: host 1 cannot reach the coordinator but still reaches its peers, so every
    collective completes and only host 1's answers are lost; the coordinator gives up on it one
    collective timeout after its peers answer.
"""
import os
import subprocess
import threading
import uuid

import httpx
import openai
import pytest

from conftest import (READY_TIMEOUT_S, Coordinator, greedy_text, bin_path, ctl_status, free_port, stream_text,
                      wait_for_chunks, wait_for_metric, wait_for_spares, wait_for_status)

TIMEOUT_S = 60.0
COLLECTIVE_TIMEOUT_S = 3


def sh(*cmd):
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    proc = subprocess.run(prefix + list(map(str, cmd)), capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"`{' '.join(map(str, cmd))}` failed: {proc.stderr.strip()} (these tests need root "
                    "or passwordless sudo for ip netns)", pytrace=False)
    return proc.stdout


class Hosts:
    """A bridge with `n` network namespaces hanging off it; host i has IP 10.<a>.<b>.(10+i)."""

    def __init__(self, n):
        tag = uuid.uuid4().hex[:5]
        self.bridge = f"crb{tag}"
        octet = 100 + int(tag, 16) % 100
        self.subnet = f"10.{octet}.{int(tag[:2], 16)}"
        self.gateway = f"{self.subnet}.1"
        self.names, self.links, self.ips = [], [], []
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for i in range(n):
            ns, host_end, ns_end, ip = f"crn{tag}{i}", f"crh{tag}{i}", f"crv{tag}{i}", f"{self.subnet}.{10 + i}"
            sh("ip", "netns", "add", ns)
            self.names.append(ns)
            sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            self.links.append(host_end)
            sh("ip", "link", "set", ns_end, "netns", ns)
            sh("ip", "link", "set", host_end, "master", self.bridge)
            sh("ip", "link", "set", host_end, "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ip}/24", "dev", ns_end)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", ns_end, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
            self.ips.append(ip)

    def run(self, i, cmd):
        prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
        return subprocess.Popen(prefix + ["ip", "netns", "exec", self.names[i], *map(str, cmd)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)

    def link(self, i, up):
        sh("ip", "link", "set", self.links[i], "up" if up else "down")

    def route_to_gateway(self, i, up):
        """Drops (or restores) everything host i sends to the gateway (the coordinator) and
        nothing else."""
        sh("ip", "netns", "exec", self.names[i], "ip", "route", "del" if up else "add", "blackhole",
           f"{self.gateway}/32")

    def cut(self, i, kind, cut):
        if kind == "link":
            self.link(i, up=not cut)
        else:
            self.route_to_gateway(i, up=not cut)

    def close(self):
        for ns in self.names:
            subprocess.run((["sudo", "-n"] if os.geteuid() else []) + ["ip", "netns", "del", ns])
        subprocess.run((["sudo", "-n"] if os.geteuid() else []) + ["ip", "link", "del", self.bridge])


@pytest.fixture(params=[2, 4], ids=["2-hosts", "4-hosts"])
def hosts(request):
    h = Hosts(request.param)
    yield h
    h.close()


@pytest.mark.parametrize("partition", ["link", "coordinator-route"])
def test_hosts_form_a_group_and_survive_a_partition(hosts, partition, checkpoint, reference):
    grpc_port = free_port()
    n = len(hosts.ips)
    coordinator = Coordinator(["--model", checkpoint, "--tp", n, "--host", "127.0.0.1", "--port", 0,
                               "--grpc-addr", f"{hosts.gateway}:{grpc_port}",
                               "--collective-timeout", COLLECTIVE_TIMEOUT_S, "--recovery-timeout", READY_TIMEOUT_S])
    workers = []
    try:
        for i in range(n):
            workers.append(hosts.run(i, [bin_path("caravan-worker"), "--coordinator",
                                         f"http://{hosts.gateway}:{grpc_port}", "--listen", f"{hosts.ips[i]}:0"]))
        url = coordinator.wait_ready()
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        ref = reference["completions"][0]
        assert greedy_text(client, checkpoint.name, ref) == ref["text"]
        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
            status = ctl_status(url)
            assert sorted(w["ring_address"].rsplit(":", 1)[0] for w in status["workers"]) == sorted(hosts.ips), status
            assert status["ready"] and all(w["health"] == "ready" for w in status["workers"]), status

            prompt, max_tokens = "Once upon a time", 400
            expected = client.completions.create(model=checkpoint.name, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 extra_body={"ignore_eos": True}).choices[0].text

            # Cut host 1 off in the middle of a stream.
            out = {}
            thread = threading.Thread(target=stream_text, args=(client, checkpoint.name, prompt, max_tokens, out),
                                      kwargs={"temperature": 0})
            thread.start()
            wait_for_chunks([out], [thread], 1)
            hosts.cut(1, partition, cut=True)
            # Whichever notices first: the collective, the coordinator (no answer within the
            # collective timeout of rank 0's) or the health probe; not a hang.
            health = wait_for_status(http, "/health", 503, COLLECTIVE_TIMEOUT_S + 5)
            reason = health.json()["reason"]
            assert reason.startswith("recovering") and "rank" in reason, reason
            assert ("timed out" in reason or "unreachable" in reason), reason
            assert not ctl_status(url)["ready"]
            assert thread.is_alive() and "error" not in out, f"the stream ended during the partition: {out}"

            # The partition heals: host 1 registers again, the group is formed again, and the
            # stream goes on where it was.
            hosts.cut(1, partition, cut=False)
            wait_for_status(http, "/health", 200, READY_TIMEOUT_S)
            thread.join(TIMEOUT_S)
            assert "error" not in out, repr(out["error"])
            assert out["text"] == expected and out["finish"] == "length"
            assert greedy_text(client, checkpoint.name, ref) == ref["text"]
    finally:
        coordinator.stop()
        for w in workers:
            w.kill()
            w.wait()


@pytest.mark.parametrize("partition", ["link", "coordinator-route"])
def test_a_spare_on_a_third_host_replaces_a_partitioned_rank(partition, checkpoint):
    """TP 2 over hosts 0 and 1, a spare on host 2. Rank 1's host is cut off mid-stream and stays
    cut off: the coordinator forms the group with the spare without waiting for the partition to
    heal (rank 0 keeps its place), and the stream ends exactly as without the partition. When it
    heals, the cut-off host registers again and waits as the new spare."""
    hosts = Hosts(3)
    grpc_port = free_port()
    coordinator = Coordinator(["--model", checkpoint, "--tp", 2, "--host", "127.0.0.1", "--port", 0,
                               "--grpc-addr", f"{hosts.gateway}:{grpc_port}",
                               "--collective-timeout", COLLECTIVE_TIMEOUT_S, "--recovery-timeout", READY_TIMEOUT_S])
    workers = []

    def start_worker(i):
        workers.append(hosts.run(i, [bin_path("caravan-worker"), "--coordinator",
                                     f"http://{hosts.gateway}:{grpc_port}", "--listen", f"{hosts.ips[i]}:0"]))

    def group_hosts(status):
        return [w["ring_address"].rsplit(":", 1)[0] for w in status["workers"]]

    try:
        start_worker(0)
        start_worker(1)
        url = coordinator.wait_ready()
        start_worker(2)
        status = wait_for_spares(url, 1)
        group = group_hosts(status)
        assert sorted(group) == hosts.ips[:2], status
        rank0, victim = group[0], hosts.ips.index(group[1])
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        prompt, max_tokens = "Once upon a time", 400
        expected = client.completions.create(model=checkpoint.name, prompt=prompt, max_tokens=max_tokens,
                                             temperature=0, extra_body={"ignore_eos": True}).choices[0].text
        out = {}
        thread = threading.Thread(target=stream_text, args=(client, checkpoint.name, prompt, max_tokens, out),
                                  kwargs={"temperature": 0})
        thread.start()
        wait_for_chunks([out], [thread], 1)
        with httpx.Client(base_url=url, timeout=TIMEOUT_S) as http:
            hosts.cut(victim, partition, cut=True)
            # The host of rank 1 is still cut off: the spare takes rank 1. The pause can be
            # shorter than a poll of /health, so the recovery is seen in its metric.
            wait_for_metric(http, "caravan_recovery_seconds_count", lambda v: v == 1,
                            COLLECTIVE_TIMEOUT_S + READY_TIMEOUT_S)
            wait_for_status(http, "/health", 200, READY_TIMEOUT_S)
            thread.join(TIMEOUT_S)
            assert "error" not in out, repr(out["error"])
            assert out["text"] == expected and out["finish"] == "length"
            assert group_hosts(ctl_status(url)) == [rank0, hosts.ips[2]]

            hosts.cut(victim, partition, cut=False)
            status = wait_for_spares(url, 1)
            assert group_hosts(status) == [rank0, hosts.ips[2]], status
            registered = http.get("/admin/workers").json()["workers"]
            assert [w["ring_address"].rsplit(":", 1)[0] for w in registered
                    if w["id"] == status["spares"][0]] == [hosts.ips[victim]], registered
    finally:
        coordinator.stop()
        for w in workers:
            w.kill()
            w.wait()
        hosts.close()
