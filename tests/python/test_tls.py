"""Mutual TLS between the coordinator and the workers, with certificates issued here by openssl.

- A coordinator and two remote workers, each with its own certificate from the cluster CA, serve
  the transformers reference text; so do local workers, which inherit the coordinator's files.
- A worker whose certificate another CA signed, and a worker without TLS, cannot register: each
  exits with an error, the coordinator lists no worker and stays 503, and a valid worker
  registering afterwards is served normally.
- Nothing reaches a worker's gRPC service without a certificate from the cluster CA: a TLS client
  with no certificate, or with one from another CA, is refused, while the coordinator's
  certificate gets the HTTP/2 server preface (the positive control).

The TCP ring between the workers is authenticated with a per-formation secret handed out over
this channel; `ops/src/comm/tcp_ring.rs` tests that a process without it cannot join.

Run: .venv/bin/python -m pytest tests/python/test_tls.py  (after `cargo build --workspace --bins`)
"""
import socket
import ssl
import subprocess
from pathlib import Path

import httpx
import openai
import pytest

from conftest import READY_TIMEOUT_S, Coordinator, bin_path, free_port, greedy_text, wait_for_status

TIMEOUT_S = 60.0
SERVER_NAME = "caravan"


def openssl(*args, cwd):
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"openssl {' '.join(args)}: {proc.stderr}"


def make_ca(folder: Path, name: str):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)


def make_node(folder: Path, ca: str, name: str, san: str = f"DNS:{SERVER_NAME}") -> dict:
    (folder / "node.ext").write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                                     "keyUsage=critical,digitalSignature\n"
                                     "extendedKeyUsage=serverAuth,clientAuth\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", "node.ext", cwd=folder)
    return {"cert": folder / f"{name}.crt", "key": folder / f"{name}.key"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The cluster CA with certificates for a coordinator and two workers, and an impostor's CA."""
    folder = tmp_path_factory.mktemp("pki")
    make_ca(folder, "cluster-ca")
    make_ca(folder, "other-ca")
    nodes = {name: make_node(folder, "cluster-ca", name) for name in ("coordinator", "worker-0", "worker-1")}
    nodes["impostor"] = make_node(folder, "other-ca", "impostor")
    return {"ca": folder / "cluster-ca.crt", "other_ca": folder / "other-ca.crt", **nodes}


def tls_args(pki, node, ca=None):
    return ["--tls-cert", pki[node]["cert"], "--tls-key", pki[node]["key"], "--tls-ca", ca or pki["ca"]]


def worker(args, grpc_port=None):
    listen = f"127.0.0.1:{grpc_port or 0}"
    return subprocess.Popen([str(bin_path("caravan-worker")), "--listen", listen, *map(str, args)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def coordinator(checkpoint, pki, tp, grpc_port, http_port=0):
    return Coordinator(["--model", checkpoint, "--tp", tp, "--host", "127.0.0.1", "--port", http_port,
                        "--grpc-addr", f"127.0.0.1:{grpc_port}", *tls_args(pki, "coordinator")])


def test_a_mutual_tls_cluster_serves(checkpoint, reference, pki):
    grpc_port, worker_port = free_port(), free_port()
    coord = coordinator(checkpoint, pki, 2, grpc_port)
    workers = []
    try:
        url_for_workers = f"https://127.0.0.1:{grpc_port}"
        workers = [worker(["--coordinator", url_for_workers, *tls_args(pki, "worker-0")], worker_port),
                   worker(["--coordinator", url_for_workers, *tls_args(pki, "worker-1")])]
        url = coord.wait_ready()
        ref = reference["completions"][0]
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        assert greedy_text(client, checkpoint.name, ref) == ref["text"]

        # The worker's gRPC port answers only certificates from the cluster CA.
        assert _h2_preface_from(worker_port, pki["ca"], pki["coordinator"]), \
            "the coordinator's certificate should reach the worker"
        assert not _h2_preface_from(worker_port, pki["ca"], None)
        assert not _h2_preface_from(worker_port, pki["ca"], pki["impostor"])
        # The group still serves after the refused connections.
        assert greedy_text(client, checkpoint.name, ref) == ref["text"]
    finally:
        coord.stop()
        for w in workers:
            w.kill()
            w.wait()


def _h2_preface_from(port: int, ca: Path, identity) -> bool:
    """Whether a TLS client with `identity` (or none) gets an HTTP/2 SETTINGS frame from `port`."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    if identity:
        context.load_cert_chain(str(identity["cert"]), str(identity["key"]))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
                tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
                frame = tls.recv(9)
                # A SETTINGS frame: 24-bit length, then type 4.
                return len(frame) >= 4 and frame[3] == 4
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return False


def test_local_workers_inherit_the_certificates(checkpoint, reference, pki):
    coord = Coordinator(["--model", checkpoint, "--tp", 2, "--local-workers", "--host", "127.0.0.1", "--port", 0,
                         *tls_args(pki, "coordinator")])
    try:
        url = coord.wait_ready()
        ref = reference["completions"][1]
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        assert greedy_text(client, checkpoint.name, ref) == ref["text"]
    finally:
        coord.stop()


@pytest.mark.parametrize("kind", ["certificate from another CA", "no TLS"])
def test_a_worker_without_a_valid_certificate_cannot_register(checkpoint, reference, pki, kind):
    grpc_port, http_port = free_port(), free_port()
    coord = coordinator(checkpoint, pki, 1, grpc_port, http_port)
    bad = good = None
    try:
        if kind == "no TLS":
            bad = worker(["--coordinator", f"http://127.0.0.1:{grpc_port}"])
        else:
            # The impostor trusts the cluster CA (its certificate is public) but is not signed by it.
            bad = worker(["--coordinator", f"https://127.0.0.1:{grpc_port}", *tls_args(pki, "impostor")])
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=TIMEOUT_S) as http:
            # HTTP is up before any worker registers.
            wait_for_status(http, "/health", 503, READY_TIMEOUT_S)
            code = bad.wait(timeout=READY_TIMEOUT_S)
            stderr = bad.stderr.read()
            assert code != 0 and "coordinator" in stderr, stderr
            # Refused at the door: not in the registry, and nothing to serve with.
            assert http.get("/admin/workers").json()["workers"] == []
            assert http.get("/health").status_code == 503

            good = worker(["--coordinator", f"https://127.0.0.1:{grpc_port}", *tls_args(pki, "worker-0")])
            wait_for_status(http, "/health", 200, READY_TIMEOUT_S)
            client = openai.OpenAI(base_url=str(http.base_url) + "/v1", api_key="unused", timeout=TIMEOUT_S,
                                   max_retries=0)
            ref = reference["completions"][0]
            assert greedy_text(client, checkpoint.name, ref) == ref["text"]
    finally:
        coord.stop()
        for w in (bad, good):
            if w is not None:
                w.kill()
                w.wait()
