"""lm-evaluation-harness against the served API, with its own `hf` model on the same weights in
transformers as the reference, on small tasks committed in tests/data/lm_eval (real coordinator
and workers):

- Loglikelihood (multiple choice): `local-completions` scores each choice with `echo`,
  `logprobs` and `max_tokens: 1`, batching prompts as arrays of token ids. SmolLM2-135M-Instruct
  at TP 1 and the random-weight fixture at TP 2: every choice's log-likelihood within 1e-3, the
  same greedy flags, the same accuracy (and the trained model gets most facts right).
- generate_until: `local-completions` (greedy, stop at the end of the line) and
  `local-chat-completions` (the folder's chat template on both sides) give exactly the answers
  `hf` gives (SmolLM2 at TP 1 and 3), hence the same exact-match score.
"""
import os

import pytest

from conftest import REPO, SMOLLM2_DIR, Coordinator

LL_TOL = 1e-3
TASK_DIR = REPO / "tests" / "data" / "lm_eval"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """The committed task, its data file named by absolute path (datasets resolves relative
    paths against the working directory)."""
    out = tmp_path_factory.mktemp("lm_eval_tasks")
    for task, data in (("caravan_facts", "facts.jsonl"), ("caravan_answers", "answers.jsonl")):
        yaml = (TASK_DIR / f"{task}.yaml").read_text()
        (out / f"{task}.yaml").write_text(yaml.replace(f"test: {data}", f"test: {TASK_DIR / data}"))
    return out


def evaluate(model, model_args, task_dir, task, metric, **options):
    """(score, per-document responses) of one lm-eval run."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import lm_eval
    from lm_eval.tasks import TaskManager
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task],
                                  task_manager=TaskManager(include_path=str(task_dir)), batch_size=4,
                                  log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                  **options)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return out["results"][task][f"{metric},none"], [s["resps"] for s in samples]


def start(model_dir, tp):
    coordinator = Coordinator(["--model", model_dir, "--tp", tp, "--local-workers", "--host", "127.0.0.1",
                               "--port", 0])
    return coordinator, coordinator.wait_ready()


# Both sides tokenize with the checkpoint's tokenizer, so the served and the reference scores
# are of the same token ids; Llama 2's prompts start with BOS (SmolLM2's tokenizer adds none).
def bos(model_dir):
    return f"add_bos_token={model_dir != SMOLLM2_DIR}"


def api_args(model_dir, url, endpoint):
    return (f"model={model_dir.name},base_url={url}/v1/{endpoint},tokenizer={model_dir},"
            f"tokenizer_backend=huggingface,num_concurrent=1,max_retries=1,{bos(model_dir)}")


def hf_args(model_dir):
    return f"pretrained={model_dir},dtype=float32,device=cpu,{bos(model_dir)}"


@pytest.mark.parametrize("tp", [1, 2], ids=["smollm2-tp1", "fixture-tp2"])
def test_lm_eval_loglikelihoods_through_the_api_equal_transformers(task_dir, request, tp):
    model_dir = request.getfixturevalue("smollm2" if tp == 1 else "checkpoint")
    coordinator, url = start(model_dir, tp)
    try:
        served_acc, served_resps = evaluate("local-completions", api_args(model_dir, url, "completions"),
                                            task_dir, "caravan_facts", "acc")
    finally:
        coordinator.stop()
    hf_acc, hf_resps = evaluate("hf", hf_args(model_dir), task_dir,
                                "caravan_facts", "acc")
    # Per document: (log-likelihood, is_greedy) of each choice.
    served = [[tuple(r[0]) for r in doc] for doc in served_resps]
    hf = [[tuple(r[0]) for r in doc] for doc in hf_resps]
    assert len(served) == len(hf) == 12
    problems = []
    for doc, (ours, theirs) in enumerate(zip(served, hf)):
        for choice, ((ll, greedy), (hf_ll, hf_greedy)) in enumerate(zip(ours, theirs)):
            if abs(ll - hf_ll) > LL_TOL or greedy != hf_greedy:
                problems.append(f"doc {doc} choice {choice}: ({ll:.5f}, {greedy}) vs transformers "
                                f"({hf_ll:.5f}, {hf_greedy})")
    assert not problems, "\n".join(problems)
    assert served_acc == hf_acc
    if model_dir == SMOLLM2_DIR:
        assert served_acc >= 0.75, served_acc


# SmolLM2's 9 heads split 1, 3 or 9 ways: TP 3 is its multi-rank case.
@pytest.mark.parametrize("tp", [1, 3], ids=["tp1", "tp3"])
@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_lm_eval_generations_through_the_api_equal_transformers(task_dir, smollm2, endpoint, tp):
    chat = endpoint != "completions"
    coordinator, url = start(SMOLLM2_DIR, tp)
    try:
        served_score, served_resps = evaluate(
            "local-chat-completions" if chat else "local-completions", api_args(SMOLLM2_DIR, url, endpoint),
            task_dir, "caravan_answers", "exact_match", apply_chat_template=chat)
    finally:
        coordinator.stop()
    hf_score, hf_resps = evaluate("hf", hf_args(SMOLLM2_DIR), task_dir,
                                  "caravan_answers", "exact_match", apply_chat_template=chat)
    served_texts = [doc[0][0] for doc in served_resps]
    hf_texts = [doc[0][0] for doc in hf_resps]
    assert served_texts == hf_texts
    assert served_score == hf_score
    assert any(t.strip() for t in served_texts), served_texts
