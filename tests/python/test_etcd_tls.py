"""TLS to etcd (`--etcd-cacert`, `--etcd-cert`, `--etcd-key`), against a real etcd that serves
HTTPS and requires client certificates (`--client-cert-auth`), with certificates issued here by
openssl.

- A coordinator and a worker with certificates from etcd's CA register, elect, form the group
  and serve the transformers reference text; the worker's key is in etcd.
- A worker that cannot speak TLS to etcd the right way exits at start-up with an error naming
  etcd (and the flag to fix where the mistake is ours to see), and never appears in it: no TLS
  flags against the HTTPS endpoint, etcd's CA but no client certificate, a client certificate
  from another CA, and TLS flags with an http:// URL.

Run: .venv/bin/python -m pytest tests/python/test_etcd_tls.py  (after `cargo build --workspace --bins`)
"""
import uuid

import openai
import pytest

from conftest import READY_TIMEOUT_S, Coordinator, greedy_text
from test_etcd import EtcdServer, start_worker
from test_tls import make_ca, make_node

TIMEOUT_S = 60.0
LEASE_TTL_S = 2


@pytest.fixture(scope="module")
def etcd_pki(tmp_path_factory):
    """etcd's CA, etcd's server certificate (for 127.0.0.1), client certificates for a
    coordinator and a worker, and a client certificate from another CA."""
    folder = tmp_path_factory.mktemp("etcd-pki")
    make_ca(folder, "etcd-ca")
    make_ca(folder, "other-ca")
    pki = {"ca": folder / "etcd-ca.crt",
           "server": make_node(folder, "etcd-ca", "etcd-server", san="IP:127.0.0.1")}
    for name in ("coordinator", "worker"):
        pki[name] = make_node(folder, "etcd-ca", name)
    pki["impostor"] = make_node(folder, "other-ca", "impostor")
    return pki


@pytest.fixture(scope="module")
def tls_etcd(etcd_pki):
    tls = {"cert": etcd_pki["server"]["cert"], "key": etcd_pki["server"]["key"], "ca": etcd_pki["ca"]}
    with EtcdServer(tls=tls) as etcd:
        yield etcd


def etcd_tls_args(pki, node=None):
    args = ["--etcd-cacert", pki["ca"]]
    if node:
        args += ["--etcd-cert", pki[node]["cert"], "--etcd-key", pki[node]["key"]]
    return args


def test_a_cluster_on_an_etcd_with_client_certificates_serves(tls_etcd, etcd_pki, checkpoint, reference):
    prefix = f"/caravan-tls-{uuid.uuid4().hex[:8]}"
    coordinator = Coordinator(["--model", checkpoint, "--tp", 1, "--etcd-endpoints", tls_etcd.url,
                               "--etcd-prefix", prefix, "--etcd-lease-ttl", LEASE_TTL_S,
                               "--grpc-addr", "127.0.0.1:0", *etcd_tls_args(etcd_pki, "coordinator")])
    worker = start_worker(tls_etcd.url, prefix, extra=etcd_tls_args(etcd_pki, "worker"))
    try:
        url = coordinator.wait_ready()
        ref = reference["completions"][0]
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        assert greedy_text(client, checkpoint.name, ref) == ref["text"]
        assert len(tls_etcd.keys(prefix + "/workers/")) == 1, tls_etcd.keys(prefix)
    finally:
        coordinator.stop()
        worker.kill()
        worker.wait()


@pytest.mark.parametrize("kind", ["no TLS flags", "no client certificate", "certificate from another CA",
                                  "http URL"])
def test_a_worker_that_cannot_authenticate_to_etcd_exits_with_an_error(tls_etcd, etcd_pki, kind):
    prefix = f"/caravan-tls-{uuid.uuid4().hex[:8]}"
    # What the error must say besides naming etcd.
    url, extra, says = tls_etcd.url, [], "etcd at"
    if kind == "no TLS flags":
        says = "--etcd-cacert is not given"
    elif kind == "no client certificate":
        extra = etcd_tls_args(etcd_pki)
    elif kind == "certificate from another CA":
        # Trusts etcd's CA (it is public) but is not signed by it.
        extra = etcd_tls_args(etcd_pki, "impostor")
    elif kind == "http URL":
        url = url.replace("https://", "http://")
        extra = etcd_tls_args(etcd_pki, "worker")
        says = "is not https://"
    worker = start_worker(url, prefix, extra=extra)
    try:
        code = worker.wait(timeout=READY_TIMEOUT_S)
        stderr = worker.stderr.read()
        assert code != 0 and "etcd" in stderr and says in stderr, stderr
        assert tls_etcd.keys(prefix + "/workers/") == []
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait()
