"""Multi-host groups on one machine: each worker in its own network namespace with its own IP,
joined by veth pairs to a bridge (the coordinator's side), so the TCP ring and gRPC cross real
interfaces. Needs root (or passwordless sudo) for `ip netns`.

- Two "hosts" form one TP-2 group over the ring and serve the transformers reference.
- A partition in the middle of a stream ends it with an explicit error within about one
  collective timeout, not a hang; /health turns 503; when the partition heals, the worker
  registers again and the group is formed again. Two kinds of partition:
  - `link`: host 1's link goes down; its peers' collectives time out.
  - `coordinator-route`: host 1 cannot reach the coordinator but still reaches its peers, so every
    collective completes and only host 1's answers are lost; the coordinator gives up on it one
    collective timeout after its peers answer.
"""
import os
import subprocess
import time
import uuid

import httpx
import openai
import pytest

from conftest import READY_TIMEOUT_S, Coordinator, greedy_text, bin_path, ctl_status, free_port, wait_for_status

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
                               "--collective-timeout", COLLECTIVE_TIMEOUT_S])
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

            # Cut host 1 off in the middle of a stream.
            stream = client.completions.create(model=checkpoint.name, prompt="Once upon a time", max_tokens=400,
                                               temperature=0, stream=True, extra_body={"ignore_eos": True})
            error, chunks, cut_at = None, 0, None
            try:
                for _ in stream:
                    chunks += 1
                    if chunks == 1:
                        hosts.cut(1, partition, cut=True)
                        cut_at = time.monotonic()
            except openai.APIError as e:
                error = e
            assert error is not None, f"the stream ended without an error after {chunks} chunks"
            took = time.monotonic() - cut_at
            assert took < COLLECTIVE_TIMEOUT_S + 5, f"the error took {took:.1f}s: a hang, not a timeout"
            # Whichever notices first: the collective ("step failed: rank 0 (…): collective
            # all_reduce timed out after 3000 ms waiting for rank 1"), the coordinator ("rank 1 (…)
            # timed out: no answer to the step within 3s of rank 0's") or the health probe ("the
            # worker group stopped: rank 1 unreachable: no answer within 2 s").
            assert ("timed out" in str(error) or "unreachable" in str(error)) and "rank" in str(error), str(error)
            wait_for_status(http, "/health", 503, 5)
            assert not ctl_status(url)["ready"]

            # The partition heals: host 1 registers again and the group is formed again.
            hosts.cut(1, partition, cut=False)
            wait_for_status(http, "/health", 200, READY_TIMEOUT_S)
            assert greedy_text(client, checkpoint.name, ref) == ref["text"]
    finally:
        coordinator.stop()
        for w in workers:
            w.kill()
            w.wait()
