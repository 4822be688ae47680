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
from safetensors import safe_open
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
    if (src / "caravan-checkpoint.json").exists():
        # make_checkpoint.py's up-to-date stamp describes the input's shape, not the output's.
        assert not (out / "caravan-checkpoint.json").exists()

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and report["shards"] == len(shards), shards
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            assert set(f.keys()) == {n for n, s in index["weight_map"].items() if s == shard}, shard
        # --max-shard-size 4MB: at most 4e6 bytes of tensors per shard, unless one tensor is bigger.
        data = os.path.getsize(out / shard) - _header_bytes(out / shard)
        assert data <= 4_000_000 or len(index_entries(index, shard)) == 1, (shard, data)
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


def index_entries(index: dict, shard: str) -> list:
    return [n for n, s in index["weight_map"].items() if s == shard]


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
    # Not a terminal: progress comes as lines, ending at 100%.
    progress = [l for l in proc.stderr.splitlines() if l.startswith("converting:")]
    assert len(progress) >= 5 and "100%" in progress[-1], proc.stderr
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


def test_a_missing_input_is_refused(tmp_path):
    proc = caravanctl("convert", "--kv-heads", 2, tmp_path / "absent", tmp_path / "out", check=False)
    assert proc.returncode == 1 and "absent is not a folder" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


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


GIB = 1 << 30


def hand_calculation(tp: int, replicas: int, link: tuple) -> dict:
    """docs/SCALING.md's arithmetic for Llama-2-70B in bf16 on A100-80GB (0.9 of memory, 2 GiB
    reserve, 4096-token context), written from the published shape and datasheet figures."""
    h, layers, q, kv, d, mlp, vocab, b = 8192, 80, 64, 8, 128, 28672, 32000, 2
    hbm, flops = 2039e9, 312e12
    alpha, beta = link
    params = layers * (2 * (q // tp) * d * h + 2 * max(kv // tp, 1) * d * h + 3 * h * (mlp // tp) + 2 * h) \
        + 2 * (vocab // tp) * h + h  # embedding and LM head split by vocabulary rows
    weights = params * b
    kv_token = 2 * layers * max(kv // tp, 1) * d * b
    tokens = (int(0.9 * 80 * GIB) - weights - 2 * GIB) // kv_token
    seqs = tokens // 4096
    share = (tp - 1) / tp
    n_allreduce = 2 * layers + 1  # o_proj and down_proj in every layer, and the embedding

    def collectives(batch):
        return n_allreduce * (alpha + 2 * share * batch * h * b / beta) + (alpha + share * batch * vocab * b / beta)

    def step(batch, context):
        memory = (weights + batch * context * kv_token) / hbm
        return max(memory, 2 * params * batch / flops) + collectives(batch)

    return {
        "weight_bytes_per_gpu": weights, "kv_bytes_per_token_per_gpu": kv_token, "kv_cache_tokens": tokens,
        "sequences_per_group": seqs, "allreduce_bytes_per_token_per_layer": 2 * h * b,
        "allreduce_bytes_per_token": n_allreduce * h * b, "allreduces_per_step": n_allreduce,
        "allgather_bytes_per_token": vocab * b,
        "ring_bytes_sent_per_gpu_per_token": (2 * n_allreduce * h * b + vocab * b) * (tp - 1) // tp,
        "collectives_ms_per_token": collectives(1) * 1e3, "decode_ms_per_token": step(1, 0) * 1e3,
        "decode_ms_per_token_full_context": step(1, 4096) * 1e3,
        "cluster_tokens_per_s": replicas * seqs / step(seqs, 4096),
    }


NVLINK3, NETWORK_200G = (25e-6, 300e9), (50e-6, 200e9 / 8)


@pytest.mark.parametrize("nodes, gpus, tp8_link, best, documented", [
    # The figures printed in docs/SCALING.md's tables for these two clusters.
    (1, 8, NVLINK3, (8, 1), {2: (37_743, 9, 37.89), 4: (496_479, 121, 20.98), 8: (1_413_951, 345, 12.52)}),
    (2, 4, NETWORK_200G, (4, 2), {2: (37_743, 9, 37.89), 4: (496_479, 121, 20.98), 8: (1_413_951, 345, 16.75)}),
], ids=["8xA100-80GB", "2x4xA100-80GB"])
def test_plan_matches_the_hand_calculation(nodes, gpus, tp8_link, best, documented):
    plan = json.loads(caravanctl("--json", "plan", "--model", "llama-2-70b", "--nodes", nodes, "--gpus-per-node",
                                 gpus, "--gpu", "a100-80gb", "--dtype", "bf16", "--context", 4096).stdout)
    layouts = {l["tp"]: l for l in plan["layouts"]}
    assert sorted(layouts) == [1, 2, 4, 8]
    assert "does not fit" in layouts[1]["problem"] and layouts[1]["problem"].count("128.5 GiB") == 1
    for tp, (tokens, seqs, ms) in documented.items():
        layout = layouts[tp]
        assert layout["problem"] is None, layout
        link = tp8_link if tp == 8 else NVLINK3
        want = hand_calculation(tp, nodes * gpus // tp, link)
        got = layout["estimate"]
        for key, value in want.items():
            if isinstance(value, int):
                assert got[key] == value, (tp, key)
            else:
                assert got[key] == pytest.approx(value, rel=1e-9), (tp, key)
        assert (got["kv_cache_tokens"], got["sequences_per_group"]) == (tokens, seqs)
        assert got["decode_ms_per_token"] == pytest.approx(ms, abs=0.005), tp
    assert layouts[8]["nodes_per_group"] == (2 if nodes == 2 else 1)
    assert layouts[8]["estimate"]["weight_bytes_per_gpu"] == 17_246_470_144
    assert layouts[8]["estimate"]["allreduce_bytes_per_token"] == 2_637_824
    chosen = plan["layouts"][plan["recommended"]]
    assert (chosen["tp"], chosen["replicas"]) == best, plan["reason"]


def test_plan_refuses_what_it_cannot_answer():
    proc = caravanctl("plan", "--model", "llama-2-70b", "--gpus-per-node", 8, "--gpu", "v100", check=False)
    assert proc.returncode != 0 and "known: a100-40gb" in proc.stderr, proc.stderr
    proc = caravanctl("plan", "--model", "llama-2-70b", "--gpus-per-node", 2, "--gpu", "a10-24gb", check=False)
    assert proc.returncode != 0 and "no layout fits" in proc.stdout, proc.stdout
    # Three GPUs: the reason names each layout's own problem, sharding as well as memory.
    proc = caravanctl("plan", "--model", "llama-2-70b", "--gpus-per-node", 3, "--gpu", "a100-80gb", check=False)
    assert proc.returncode == 1, proc.stdout
    reason = proc.stdout.split("recommended: ")[1]
    assert "TP 1: does not fit" in reason and "TP 3: num_attention_heads 64 is not divisible by the tensor-parallel size 3" in reason, reason
    for args, message in ((("--gpus-per-node", 0), "--gpus-per-node must be at least 1"),
                          (("--gpus-per-node", 8, "--nodes", 0), "--nodes must be at least 1"),
                          (("--gpus-per-node", 8, "--context", 8192), "exceeds the model's context")):
        proc = caravanctl("plan", "--model", "llama-2-70b", "--gpu", "a100-80gb", *args, check=False)
        assert proc.returncode == 1 and message in proc.stderr and "panicked" not in proc.stderr, proc.stderr
