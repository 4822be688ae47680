"""The offline operator tools of `caravanctl`: `convert` (MHA to GQA by mean pooling) and `plan`.

- Conversion is checked against a mean pool computed here with numpy in float64 from the input
  tensors (the GQA paper's recipe), in float32 and bfloat16, with the output split over several
  shards; every other tensor must be byte-identical and the tokenizer files copied.
- `--kv-heads` equal to the checkpoint's heads reproduces every tensor exactly.
- A converted checkpoint serves through a real coordinator and workers, token for token equal to
  transformers' greedy generation on the same converted folder (GQA at TP 2, and MQA at TP 2, where
  the single KV head is replicated on both ranks).
- Conversion of a 270 MB checkpoint keeps the process's peak RSS under a quarter of the checkpoint:
  tensors are streamed, not loaded together.
- Impossible targets and occupied outputs are refused with a reason, writing nothing.
- `plan` answers for Llama-2-70B from its preset and from a config file, and refuses unknown GPUs.

Run: .venv/bin/python -m pytest tests/python/test_operator_tools.py  (after `cargo build --workspace --bins`)
"""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file

from conftest import FIXTURES, REPO, TOKENIZER_DIR, Coordinator, _python, _run_script, bin_path

MHA_DIR = FIXTURES / "convert-mha"
MHA_BF16_DIR = FIXTURES / "convert-mha-bf16"
HEADS, HEAD_DIM, LAYERS = 8, 32, 4
TIMEOUT_S = 60.0


def caravanctl(*args, check=True):
    proc = subprocess.run([str(bin_path("caravanctl")), *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    if check:
        assert proc.returncode == 0, f"caravanctl {' '.join(map(str, args))} failed:\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def mha_checkpoints():
    """Multi-head (8 KV heads) random checkpoints with the tokenizer, in float32 and bfloat16."""
    _run_script(["python/build_tokenizer.py", "--out", TOKENIZER_DIR])
    for out, dtype in ((MHA_DIR, "float32"), (MHA_BF16_DIR, "bfloat16")):
        _run_script(["python/make_checkpoint.py", "--preset", "tiny-mha", "--dtype", dtype, "--seed", "3",
                     "--tokenizer", TOKENIZER_DIR, "--out", out])
    return {"float32": MHA_DIR, "bfloat16": MHA_BF16_DIR}


def load_folder(folder: Path) -> dict:
    """Every tensor of a (possibly sharded) safetensors checkpoint."""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    tensors = {}
    for name in files:
        tensors.update(load_file(folder / name))
    return tensors


def reference_mean_pool(weight: torch.Tensor, groups: int) -> np.ndarray:
    """The GQA paper's conversion, independently: average consecutive heads, in float64."""
    w = weight.to(torch.float64).numpy()
    heads = w.shape[0] // HEAD_DIM
    return w.reshape(groups, heads // groups, HEAD_DIM, *w.shape[1:]).mean(axis=1) \
        .reshape(groups * HEAD_DIM, *w.shape[1:])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_conversion_mean_pools_kv_heads(mha_checkpoints, tmp_path, dtype):
    src = mha_checkpoints[dtype]
    out = tmp_path / "gqa"
    proc = caravanctl("--json", "convert", "--kv-heads", 2, "--max-shard-size", "4MB", src, out)
    report = json.loads(proc.stdout)
    assert report["kv_heads_before"] == HEADS and report["kv_heads_after"] == 2
    assert report["pooled"] == 2 * LAYERS

    config_in = json.loads((src / "config.json").read_text())
    config_out = json.loads((out / "config.json").read_text())
    assert config_out["num_key_value_heads"] == 2
    assert {k: v for k, v in config_out.items() if k != "num_key_value_heads"} == \
        {k: v for k, v in config_in.items() if k != "num_key_value_heads"}
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and report["shards"] == len(shards), shards
    assert index["metadata"]["total_size"] == sum(
        os.path.getsize(out / s) for s in shards) - sum(_header_bytes(out / s) for s in shards)

    before, after = load_folder(src), load_folder(out)
    assert set(after) == set(before) == set(index["weight_map"])
    pooled = 0
    for name, w_in in before.items():
        w_out = after[name]
        assert w_out.dtype == w_in.dtype, name
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            pooled += 1
            expected = reference_mean_pool(w_in, 2)
            assert tuple(w_out.shape) == expected.shape == (2 * HEAD_DIM, 256), name
            if dtype == "float32":
                np.testing.assert_allclose(w_out.numpy(), expected, rtol=1e-6, atol=1e-8, err_msg=name)
            else:
                # Rounded once from the exact mean: the nearest bfloat16 (ties aside, so within one ulp).
                want = torch.from_numpy(expected).to(torch.bfloat16).float()
                ulp = want.abs().clamp_min(1e-30) * 2.0 ** -7
                assert torch.all((w_out.float() - want).abs() <= ulp), name
            # The pool changed something: heads of a random model differ.
            assert not np.allclose(w_out.to(torch.float64).numpy(),
                                   w_in.to(torch.float64).numpy()[:2 * HEAD_DIM]), name
        else:
            assert torch.equal(w_out, w_in), f"{name} changed"
    assert pooled == 2 * LAYERS


def _header_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_keeping_every_head_reproduces_the_input(mha_checkpoints, tmp_path):
    src = mha_checkpoints["float32"]
    out = tmp_path / "same"
    report = json.loads(caravanctl("--json", "convert", "--kv-heads", HEADS, src, out).stdout)
    assert report["pooled"] == 0
    before, after = load_folder(src), load_folder(out)
    assert set(before) == set(after)
    for name, w in before.items():
        assert torch.equal(after[name], w), name
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_a_converted_checkpoint_serves(mha_checkpoints, tmp_path, kv_heads):
    out = tmp_path / f"llama-kv{kv_heads}"
    caravanctl("convert", "--kv-heads", kv_heads, mha_checkpoints["float32"], out)
    prompt = "The capital of France is"
    max_tokens = 12
    expected = _transformers_greedy(out, prompt, max_tokens)

    coordinator = Coordinator(["--model", out, "--tp", 2, "--local-workers", "--host", "127.0.0.1", "--port", 0])
    try:
        url = coordinator.wait_ready()
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        got = client.completions.create(model=out.name, prompt=prompt, temperature=0, max_tokens=max_tokens)
        assert got.choices[0].text == expected
    finally:
        coordinator.stop()


def _transformers_greedy(folder: Path, prompt: str, max_tokens: int) -> str:
    """Greedy continuation by transformers, in a child process (keeps its threads out of ours)."""
    script = f"""
import sys, torch
from transformers import AutoTokenizer, LlamaForCausalLM
tok = AutoTokenizer.from_pretrained({str(folder)!r})
model = LlamaForCausalLM.from_pretrained({str(folder)!r}, torch_dtype=torch.float32).eval()
assert model.config.num_key_value_heads == len(model.model.layers[0].self_attn.k_proj.weight) // {HEAD_DIM}
ids = tok({prompt!r}).input_ids
out = model.generate(torch.tensor([ids]), max_new_tokens={max_tokens}, do_sample=False,
                     attention_mask=torch.ones(1, len(ids), dtype=torch.long), pad_token_id=0)
gen = out[0, len(ids):].tolist()
full = tok.decode(ids + gen, skip_special_tokens=True)
sys.stdout.write(full[len(tok.decode(ids, skip_special_tokens=True)):])
"""
    proc = subprocess.run([_python(), "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_conversion_streams_instead_of_loading_the_model(tmp_path):
    """A 270 MB float32 checkpoint: the converter's peak RSS stays under a quarter of it."""
    src = tmp_path / "big"
    src.mkdir()
    hidden, heads, layers, mlp = 512, 8, 16, 2048
    rng = np.random.default_rng(0)
    tensors = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            tensors[p + f"self_attn.{proj}_proj.weight"] = rng.standard_normal((hidden, hidden), np.float32)
        tensors[p + "mlp.gate_proj.weight"] = rng.standard_normal((mlp, hidden), np.float32)
        tensors[p + "mlp.up_proj.weight"] = rng.standard_normal((mlp, hidden), np.float32)
        tensors[p + "mlp.down_proj.weight"] = rng.standard_normal((hidden, mlp), np.float32)
        tensors[p + "input_layernorm.weight"] = np.ones(hidden, np.float32)
        tensors[p + "post_attention_layernorm.weight"] = np.ones(hidden, np.float32)
    total = sum(t.nbytes for t in tensors.values())
    assert total > 250e6
    save_file(tensors, str(src / "model.safetensors"))
    del tensors
    (src / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": heads,
        "num_hidden_layers": layers, "intermediate_size": mlp, "vocab_size": 32000}))

    # Measured from a small intermediate process: a child's ru_maxrss starts at its parent's RSS
    # at fork (here, pytest with torch loaded), so the converter must be a grandchild.
    measure = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)")
    proc = subprocess.run([_python(), "-c", measure, str(bin_path("caravanctl")), "convert", "--kv-heads", "2",
                           str(src), str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    peak = int(proc.stdout.split()[-1]) * 1024
    assert peak < total / 4, f"peak RSS {peak / 1e6:.0f} MB for a {total / 1e6:.0f} MB checkpoint"
    written = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    # k and v shrink from 8 heads to 2 in each of 16 layers.
    assert written["metadata"]["total_size"] == total - layers * 2 * (hidden * hidden * 4) * 3 // 4


@pytest.mark.parametrize("kv_heads, reason", [(3, "must divide"), (16, "must divide"), (0, "at least 1")])
def test_impossible_targets_are_refused(mha_checkpoints, tmp_path, kv_heads, reason):
    out = tmp_path / "never"
    proc = caravanctl("convert", "--kv-heads", kv_heads, mha_checkpoints["float32"], out, check=False)
    assert proc.returncode != 0 and reason in proc.stderr, proc.stderr
    assert not out.exists()


def test_an_occupied_output_is_refused(mha_checkpoints, tmp_path):
    out = tmp_path / "occupied"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = caravanctl("convert", "--kv-heads", 2, mha_checkpoints["float32"], out, check=False)
    assert proc.returncode != 0 and "not an empty folder" in proc.stderr, proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


LLAMA_2_70B_CONFIG = {
    # meta-llama/Llama-2-70b-hf config.json (the fields the planner reads and a few it ignores).
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
    "intermediate_size": 28672, "num_attention_heads": 64, "num_hidden_layers": 80, "num_key_value_heads": 8,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "vocab_size": 32000, "tie_word_embeddings": False,
    "torch_dtype": "float16",
}


def test_plan_for_llama_2_70b(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA_2_70B_CONFIG))
    for model in ("llama-2-70b", config, tmp_path):
        plan = json.loads(caravanctl("--json", "plan", "--model", model, "--nodes", 2, "--gpus-per-node", 4,
                                     "--gpu", "a100-80gb").stdout)
        assert plan["model_parameters"] == 68_976_648_192
        best = plan["layouts"][plan["recommended"]]
        assert (best["tp"], best["replicas"]) == (4, 2), plan["reason"]
        assert [l["tp"] for l in plan["layouts"]] == [1, 2, 4, 8]
        assert "does not fit" in plan["layouts"][0]["problem"]
    text = caravanctl("plan", "--model", "llama-2-70b", "--gpus-per-node", 8, "--gpu", "a100-80gb").stdout
    assert "recommended: TP=8 x 1 replica" in text, text


def test_plan_refuses_what_it_cannot_answer():
    proc = caravanctl("plan", "--model", "llama-2-70b", "--gpus-per-node", 8, "--gpu", "v100", check=False)
    assert proc.returncode != 0 and "known: a100-40gb" in proc.stderr, proc.stderr
    proc = caravanctl("plan", "--model", "llama-2-70b", "--gpus-per-node", 2, "--gpu", "a10-24gb", check=False)
    assert proc.returncode != 0 and "no layout fits" in proc.stdout, proc.stdout
