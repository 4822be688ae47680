"""Structured outputs on the served path (real coordinator and workers), through the official
`openai` client and plain HTTP:

- Golden: greedy decoding under each constraint (a regex, choices, a JSON schema, a Lark grammar)
  equals transformers' greedy decoding of the same weights under llguidance's Python matcher for
  the same grammar (the random-weight fixture at TP 1 and 2: the mask is computed on the
  coordinator and applied on every rank).
- Sampled choices (n = 8, temperature 1) all satisfy their constraint; constrained and free
  requests share a batch and the free ones are unchanged.
- SmolLM2-135M-Instruct (a trained model, TP 1) answers a chat with `response_format`
  `json_schema` (and `json_object`) as parseable JSON of the schema's shape.
- Bad schemas, grammars and shapes are 400s that name the field; the server goes on serving.
"""
import concurrent.futures
import json
import re

import llguidance
import llguidance.hf
import llguidance.torch
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import GREEDY_MARGIN, SMOLLM2_DIR, Coordinator, continuation_text
from test_batching import Served

PROMPT = "The old lighthouse keeper climbed the stairs and"
EOS = 2
COMPACT = {"whitespace_flexible": False}  # the server's default for JSON schemas


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def served(request, checkpoint):
    s = Served(checkpoint, tp=request.param)
    yield s
    s.close()


@pytest.fixture(scope="module")
def hf(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return model, tokenizer, llguidance.hf.from_tokenizer(tokenizer)


def lark_choices(choices):
    return "start: " + " | ".join(json.dumps(c) for c in choices)


def hf_constrained_greedy(hf, ids, grammar, max_tokens):
    """transformers' greedy tokens under llguidance's matcher (EOS included when chosen), and how
    many follow steps whose top-2 allowed logits differ by at least GREEDY_MARGIN."""
    model, _, lltok = hf
    matcher = llguidance.LLMatcher(lltok, grammar)
    assert not matcher.is_error(), matcher.get_error()
    mask = llguidance.torch.allocate_token_bitmask(1, lltok.vocab_size)
    tokens, safe, near_tie = [], 0, False
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids + tokens])).logits[0, -1:].float().clone()
            llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
            llguidance.torch.apply_token_bitmask_inplace(logits, mask)
            top = torch.topk(logits[0], 2)
            if not near_tie and (top.values[1] == float("-inf") or top.values[0] - top.values[1] >= GREEDY_MARGIN):
                safe += 1
            else:
                near_tie = True
            token = int(top.indices[0])
            tokens.append(token)
            if token == EOS:
                break
            assert matcher.consume_token(token), matcher.get_error()
            if matcher.is_stopped():
                break
    return tokens, safe


CASES = {
    "regex": ({"guided_regex": r"[0-9]{3}-[0-9]{4}"},
              lambda: llguidance.LLMatcher.grammar_from_regex(r"[0-9]{3}-[0-9]{4}")),
    "choice": ({"guided_choice": ["yes", "no", "maybe so"]},
               lambda: llguidance.LLMatcher.grammar_from_lark(lark_choices(["yes", "no", "maybe so"]))),
    "json_schema": ({"response_format": {"type": "json_schema", "json_schema": {"name": "flag", "schema": {
        "type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 99}},
        "required": ["ok", "n"], "additionalProperties": False}}}},
        lambda: llguidance.LLMatcher.grammar_from_json_schema(
            {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 99}},
             "required": ["ok", "n"], "additionalProperties": False}, defaults=COMPACT)),
    "lark": ({"guided_grammar": 'start: greeting " " name\ngreeting: "hello" | "hi"\nname: /[a-z]{1,6}/'},
             lambda: llguidance.LLMatcher.grammar_from_lark(
                 'start: greeting " " name\ngreeting: "hello" | "hi"\nname: /[a-z]{1,6}/')),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_under_a_constraint_equals_transformers_under_llguidance(served, hf, case):
    fields, grammar = CASES[case]
    _, tokenizer, _ = hf
    ids = tokenizer(PROMPT).input_ids
    tokens, safe = hf_constrained_greedy(hf, ids, grammar(), 24)
    out = served.http.post("/v1/completions", json={"model": served.model, "prompt": PROMPT, "max_tokens": 24,
                                                    "temperature": 0, **fields}).json()
    choice = out["choices"][0]
    assert safe >= 2, f"transformers' margins are too thin to compare ({safe})"
    want = continuation_text(tokenizer, ids, [t for t in tokens[:safe] if t != EOS])
    assert choice["text"].startswith(want), (choice["text"], want, tokens)
    if safe == len(tokens):
        # Every step was clear: the whole output, and it ended where the grammar did.
        assert choice["text"] == continuation_text(tokenizer, ids, [t for t in tokens if t != EOS])
        assert choice["finish_reason"] == "stop", choice


def check(case, text):
    if case == "regex":
        return re.fullmatch(r"[0-9]{3}-[0-9]{4}", text) is not None
    if case == "choice":
        return text in ("yes", "no", "maybe so")
    if case == "json_schema":
        value = json.loads(text)
        return set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and isinstance(value["n"], int)
    return re.fullmatch(r"(hello|hi) [a-z]{1,6}", text) is not None


@pytest.mark.parametrize("case", list(CASES))
def test_sampled_choices_all_satisfy_the_constraint(served, case):
    fields, _ = CASES[case]
    out = served.http.post("/v1/completions", json={"model": served.model, "prompt": PROMPT, "max_tokens": 40,
                                                    "temperature": 1.0, "seed": 3, "n": 8, **fields}).json()
    bad = [c["text"] for c in out["choices"] if c["finish_reason"] != "stop" or not check(case, c["text"])]
    assert not bad and len(out["choices"]) == 8, bad


def test_constrained_and_free_requests_share_a_batch(served):
    free = {"model": served.model, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
    alone = served.http.post("/v1/completions", json=free).json()["choices"][0]["text"]
    constrained = {"model": served.model, "prompt": PROMPT, "max_tokens": 24, "temperature": 0.8, "seed": 1,
                   **CASES["json_schema"][0]}
    bodies = [free if i % 2 else {**constrained, "seed": i} for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda b: served.http.post("/v1/completions", json=b).json(), bodies))
    for i, r in enumerate(results):
        text = r["choices"][0]["text"]
        if i % 2:
            assert text == alone, (i, text, alone)
        else:
            assert check("json_schema", text), (i, text)


def test_chat_takes_response_format_and_vllms_structured_outputs(served):
    client = served.client
    messages = [{"role": "user", "content": "Answer yes or no."}]
    resp = client.chat.completions.create(model=served.model, messages=messages, max_tokens=8, temperature=0,
                                          extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert resp.choices[0].message.content in ("yes", "no"), resp
    resp = client.chat.completions.create(model=served.model, messages=messages, max_tokens=8, temperature=0,
                                          extra_body={"guided_regex": "(yes|no)!"})
    assert resp.choices[0].message.content in ("yes!", "no!"), resp


@pytest.mark.parametrize("fields,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a"], "guided_regex": "b"}, "guided_choice"),
    ({"structured_outputs": {"xml": "<a/>"}}, "structured_outputs"),
])
def test_bad_constraints_are_400s(served, fields, param):
    r = served.http.post("/v1/completions", json={"model": served.model, "prompt": PROMPT, "max_tokens": 4,
                                                  **fields})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
    ok = served.http.post("/v1/completions", json={"model": served.model, "prompt": PROMPT, "max_tokens": 2})
    assert ok.status_code == 200


@pytest.fixture(scope="module")
def smollm2_client(smollm2):
    coordinator = Coordinator(["--model", SMOLLM2_DIR, "--tp", 1, "--local-workers", "--host", "127.0.0.1",
                               "--port", 0])
    url = coordinator.wait_ready()
    yield openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=300, max_retries=0)
    coordinator.stop()


def test_a_trained_model_answers_in_the_schemas_json(smollm2_client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                               "country": {"type": "string", "maxLength": 40}},
              "required": ["city", "country"], "additionalProperties": False}
    messages = [{"role": "user", "content": "What is the capital of France? Answer in JSON with the city "
                                            "and the country."}]
    resp = smollm2_client.chat.completions.create(
        model=SMOLLM2_DIR.name, messages=messages, max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema,
                                                                "strict": True}})
    choice = resp.choices[0]
    assert choice.finish_reason == "stop", choice
    value = json.loads(choice.message.content)
    assert set(value) == {"city", "country"}, value
    assert "Paris" in value["city"], value
    resp = smollm2_client.chat.completions.create(model=SMOLLM2_DIR.name, messages=messages, max_tokens=60,
                                           temperature=0, response_format={"type": "json_object"})
    assert resp.choices[0].finish_reason == "stop", resp
    assert isinstance(json.loads(resp.choices[0].message.content), dict), resp
