"""`--dtype auto` (the default, as vLLM's): the checkpoint's `torch_dtype` decides the compute
dtype. A float32 checkpoint computes in float32 (its log-probabilities equal an explicit
`--dtype f32` server's exactly), and a float16 one computes in bfloat16 on CPUs (equal to an
explicit `--dtype bf16` server's, and different from float32's). Real coordinator and workers
(TP 2); the log-probabilities of one greedy completion tell the dtypes apart.
"""
import json
import shutil

import httpx
import pytest

from conftest import Coordinator

PROMPT = "The old lighthouse keeper climbed the stairs and"


def logprobs(model_dir, *dtype):
    coordinator = Coordinator(["--model", model_dir, "--tp", 2, "--local-workers", "--port", 0, *dtype])
    try:
        url = coordinator.wait_ready()
        body = {"model": model_dir.name, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": 1,
                "echo": True}
        r = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["logprobs"]["token_logprobs"][1:]
    finally:
        coordinator.stop()


@pytest.fixture(scope="module")
def float16_checkpoint(checkpoint, tmp_path_factory):
    """The serving fixture, its config saying float16 (the weights are float32 on disk either way:
    the workers convert them)."""
    folder = tmp_path_factory.mktemp("f16") / "serving-f16"
    shutil.copytree(checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    key = "dtype" if "dtype" in config else "torch_dtype"  # transformers 5 writes `dtype`
    assert config[key] == "float32"
    config[key] = "float16"
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_auto_takes_the_checkpoints_dtype(checkpoint, float16_checkpoint):
    f32 = logprobs(checkpoint, "--dtype", "f32")
    assert logprobs(checkpoint) == f32, "a float32 checkpoint computes in float32"
    auto16 = logprobs(float16_checkpoint)
    assert auto16 == logprobs(float16_checkpoint, "--dtype", "bf16"), "float16 computes in bfloat16 on CPUs"
    assert auto16 != f32
