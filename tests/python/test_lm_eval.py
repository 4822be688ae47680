"""lm-evaluation-harness against the served API: its `local-completions` model (which scores
each choice with `echo`, `logprobs` and `max_tokens: 1`, batching prompts as arrays of token ids)
on a small multiple-choice task of plain facts (tests/data/lm_eval), served by a real coordinator
and worker (SmolLM2-135M-Instruct, TP 1), equals lm-evaluation-harness's own `hf` model on the
same weights in transformers: every choice's log-likelihood within 1e-3, the same greedy flags,
the same accuracy; and a trained model gets most of these facts right.
"""
import os

import pytest

from conftest import REPO, Coordinator

LL_TOL = 1e-3
SMOLLM2_DIR = REPO / "models" / "smollm2-135m-instruct"
TASK_DIR = REPO / "tests" / "data" / "lm_eval"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """The committed task, its data file named by absolute path (datasets resolves relative
    paths against the working directory)."""
    out = tmp_path_factory.mktemp("lm_eval_tasks")
    yaml = (TASK_DIR / "caravan_facts.yaml").read_text()
    (out / "caravan_facts.yaml").write_text(yaml.replace("test: facts.jsonl", f"test: {TASK_DIR / 'facts.jsonl'}"))
    return out


def evaluate(model, model_args, task_dir):
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import lm_eval
    from lm_eval.tasks import TaskManager
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["caravan_facts"],
                                  task_manager=TaskManager(include_path=str(task_dir)), batch_size=4,
                                  log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    samples = sorted(out["samples"]["caravan_facts"], key=lambda s: s["doc_id"])
    # Per document: (log-likelihood, is_greedy) of each choice.
    return out["results"]["caravan_facts"]["acc,none"], [[tuple(r[0]) for r in s["resps"]] for s in samples]


def test_lm_eval_loglikelihoods_through_the_api_equal_transformers(task_dir):
    assert (SMOLLM2_DIR / "config.json").is_file(), "scripts/setup.sh makes models/smollm2-135m-instruct"
    coordinator = Coordinator(["--model", SMOLLM2_DIR, "--tp", 1, "--local-workers", "--host", "127.0.0.1",
                               "--port", 0])
    try:
        url = coordinator.wait_ready()
        served_acc, served = evaluate(
            "local-completions",
            f"model={SMOLLM2_DIR.name},base_url={url}/v1/completions,tokenizer={SMOLLM2_DIR},"
            "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1", task_dir)
    finally:
        coordinator.stop()
    hf_acc, hf = evaluate("hf", f"pretrained={SMOLLM2_DIR},dtype=float32,device=cpu", task_dir)
    assert len(served) == len(hf) == 12
    problems = []
    for doc, (ours, theirs) in enumerate(zip(served, hf)):
        for choice, ((ll, greedy), (hf_ll, hf_greedy)) in enumerate(zip(ours, theirs)):
            if abs(ll - hf_ll) > LL_TOL or greedy != hf_greedy:
                problems.append(f"doc {doc} choice {choice}: ({ll:.5f}, {greedy}) vs transformers "
                                f"({hf_ll:.5f}, {hf_greedy})")
    assert not problems, "\n".join(problems)
    assert served_acc == hf_acc
    assert served_acc >= 0.75, served_acc
