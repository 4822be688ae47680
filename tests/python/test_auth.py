"""API keys on the HTTP API, against a real coordinator and worker.

- With --api-key and --api-key-file, both keys work through the official openai client; a wrong
  key is an `AuthenticationError` (401, code invalid_api_key) and no key is a 401 JSON error with
  `WWW-Authenticate: Bearer`, on the API, the admin endpoints, health and metrics alike; the
  server keeps serving afterwards; `caravanctl` works with the key and fails without it.
- With --public-health-and-metrics, /health and /metrics answer without a key (probes,
  Prometheus) while everything else still needs one.

Run: .venv/bin/python -m pytest tests/python/test_auth.py  (after `cargo build --workspace --bins`)
"""
import subprocess

import httpx
import openai
import pytest

from conftest import Coordinator, bin_path, greedy_text

KEY_FLAG, KEY_FILE = "sk-caravan-flag-0123456789", "sk-caravan-file-9876543210"
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def keyed(checkpoint, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(f"# one key per line\n{KEY_FILE}\n")
    coordinator = Coordinator(["--model", checkpoint, "--tp", 1, "--local-workers", "--host", "127.0.0.1",
                               "--port", 0, "--api-key", KEY_FLAG, "--api-key-file", keys])
    try:
        yield coordinator.wait_ready()
    finally:
        coordinator.stop()


def client(url, key):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, timeout=TIMEOUT_S, max_retries=0)


def test_every_configured_key_is_accepted(keyed, checkpoint, reference):
    ref = reference["completions"][0]
    for key in (KEY_FLAG, KEY_FILE):
        assert greedy_text(client(keyed, key), checkpoint.name, ref) == ref["text"]


def test_a_wrong_key_is_refused_and_the_server_keeps_serving(keyed, checkpoint, reference):
    ref = reference["completions"][0]
    for wrong in ("sk-wrong", KEY_FLAG[:-1], KEY_FLAG + "0"):
        with pytest.raises(openai.AuthenticationError) as err:
            client(keyed, wrong).completions.create(model=checkpoint.name, prompt="Hi", max_tokens=2)
        assert err.value.status_code == 401
        assert err.value.body["code"] == "invalid_api_key", err.value.body
    assert greedy_text(client(keyed, KEY_FLAG), checkpoint.name, ref) == ref["text"]


@pytest.mark.parametrize("method, path", [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                                          ("GET", "/v1/models"), ("GET", "/health"), ("GET", "/metrics"),
                                          ("GET", "/admin/status"), ("POST", "/admin/drain"),
                                          ("GET", "/no/such/path")])
def test_no_key_no_access(keyed, method, path):
    resp = httpx.request(method, keyed + path, json={}, timeout=TIMEOUT_S)
    assert resp.status_code == 401, resp.text
    assert resp.headers["www-authenticate"] == "Bearer"
    assert resp.json()["error"]["code"] == "invalid_api_key"
    assert "Authorization" in resp.json()["error"]["message"]
    # Not a Bearer credential at all.
    resp = httpx.request(method, keyed + path, json={}, headers={"Authorization": f"Basic {KEY_FLAG}"},
                         timeout=TIMEOUT_S)
    assert resp.status_code == 401, resp.text


def test_caravanctl_sends_the_key(keyed, tmp_path):
    ctl = [str(bin_path("caravanctl")), "--url", keyed, "--json", "status"]
    ok = subprocess.run(ctl + ["--api-key", KEY_FLAG], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and '"ready": true' in ok.stdout, ok.stderr
    # --api-key-file sends the file's first key, as the chart's preStop drain does.
    keys = tmp_path / "keys"
    keys.write_text(f"# comment\n{KEY_FILE}\nsk-unused\n")
    ok = subprocess.run(ctl + ["--api-key-file", keys], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and '"ready": true' in ok.stdout, ok.stderr
    refused = subprocess.run(ctl, capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "HTTP 401" in refused.stderr, refused.stderr


def test_health_and_metrics_can_stay_public(checkpoint):
    coordinator = Coordinator(["--model", checkpoint, "--tp", 1, "--local-workers", "--host", "127.0.0.1",
                               "--port", 0, "--api-key", KEY_FLAG, "--public-health-and-metrics"])
    try:
        url = coordinator.wait_ready()
        assert httpx.get(url + "/health").status_code == 200
        metrics = httpx.get(url + "/metrics")
        assert metrics.status_code == 200 and "caravan_requests_total" in metrics.text
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/admin/status").status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY_FLAG}"}).status_code == 200
    finally:
        coordinator.stop()
