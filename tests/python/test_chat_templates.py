"""The checkpoint's own chat template, end to end: a folder carrying a Zephyr (TinyLlama-chat),
Vicuna, CodeLlama-Instruct or custom template is served with that template, as transformers'
`apply_chat_template` renders it, and `--chat-template` overrides the folder's.

Each folder is the serving fixture's weights and tokenizer with another template. Token ids come
from `/tokenize` (vLLM's) and from the `usage` of chat completions through the official `openai`
client; both must equal `apply_chat_template`'s. Greedy chat completions must equal transformers'
`generate` on the same ids, compared up to the first step whose top-2 logit margin is below 1e-3
(where f32 summation order may flip a near-tie).
"""
import json
import shutil

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import Coordinator, continuation_text, hf_greedy
from test_openai_api import chat, chat_problems

TIMEOUT_S = 60.0
MIN_COMPARED = 4
GEN_TOKENS = 8

ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
          "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
          "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")

VICUNA = ("{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] | trim + '\n\n' %}"
          "{% set messages = messages[1:] %}{% else %}{% set system_message = '' %}{% endif %}{{ system_message }}"
          "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] | trim + '\n' }}"
          "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] | trim + eos_token + '\n' }}"
          "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

CODELLAMA = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
             "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
             "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
             "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
             "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
             "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
             "{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
             "{{ ' '  + content | trim + ' ' + eos_token }}{% endif %}{% endfor %}")

# What the well-known templates do not exercise: namespace(), Python methods, tojson of request
# JSON (its key order kept), strftime_now, kwargs, and raise_exception with the client's message.
CUSTOM = """{{- bos_token -}}
{%- set ns = namespace(n=0) -%}
Today is {{ strftime_now("%d %B %Y") }}.
{%- if persona is defined %} Persona: {{ persona | tojson }}{% endif %}

{% for message in messages %}
{%- set ns.n = ns.n + 1 -%}
{%- if message.role not in ['system', 'user', 'assistant'] -%}
{{ raise_exception('Unknown role: ' + message.role) }}
{%- endif -%}
[{{ ns.n }}|{{ message.role.upper() }}] {{ message.content.strip() }}{% if message.role == 'assistant' %}{{ eos_token }}{% endif %}

{% endfor %}
{%- if add_generation_prompt %}[{{ ns.n + 1 }}|ASSISTANT]{% endif -%}
"""

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "  You answer briefly.  "},
     {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": " Blue. "},
     {"role": "user", "content": "And another one?\n"}],
    [{"role": "user", "content": "Ünïcödé and emoji 🐫 survive."}],
]


def folder_with_template(base, dest, template=None, jinja=None):
    """The serving fixture's files under `dest`, with `template` as tokenizer_config.json's
    chat_template and/or `jinja` as chat_template.jinja."""
    dest.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "special_tokens_map.json"):
        (dest / name).symlink_to(base / name)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    if template is not None:
        config["chat_template"] = template
    (dest / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (dest / "chat_template.jinja").write_text(jinja)
    return dest


class Served:
    """A coordinator on a folder, with its openai and httpx clients."""

    def __init__(self, folder, tp, extra=()):
        self.folder = folder
        self.coordinator = Coordinator(["--model", folder, "--tp", tp, "--local-workers", "--host", "127.0.0.1",
                                        "--port", "0", *extra])
        self.url = self.coordinator.wait_ready()
        self.model = folder.name
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", timeout=TIMEOUT_S,
                                    max_retries=0)
        self.http = httpx.Client(base_url=self.url, timeout=TIMEOUT_S)

    def tokenize(self, **body):
        resp = self.http.post("/tokenize", json={"model": self.model, **body})
        assert resp.status_code == 200, resp.text
        return resp.json()

    def close(self):
        self.http.close()
        self.coordinator.stop()


@pytest.fixture(scope="module")
def folders(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-templates")
    return {
        "zephyr": folder_with_template(checkpoint, root / "zephyr", template=ZEPHYR),
        # chat_template.jinja wins over tokenizer_config.json's template.
        "vicuna": folder_with_template(checkpoint, root / "vicuna", template=ZEPHYR, jinja=VICUNA),
        # transformers' named templates: "default" is the one used.
        "codellama": folder_with_template(checkpoint, root / "codellama",
                                          template=[{"name": "tool_use", "template": ZEPHYR},
                                                    {"name": "default", "template": CODELLAMA}]),
        "custom": folder_with_template(checkpoint, root / "custom", template=CUSTOM),
    }


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32)
    model.eval()
    return model


def check_conversations(served, tokenizer, hf_model, conversations, generate=True, **template_kwargs):
    """The server's ids and greedy outputs for `conversations` against transformers'."""
    problems = []
    for i, messages in enumerate(conversations):
        want = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)
        if hasattr(want, "input_ids"):
            want = want["input_ids"]
        extra = {"chat_template_kwargs": template_kwargs} if template_kwargs else {}
        got = served.tokenize(messages=messages, **extra)
        if got["tokens"] != want:
            problems.append(f"conversation {i}: /tokenize {got['tokens']} != apply_chat_template {want}\n"
                            f"  transformers renders {tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **template_kwargs)!r}")
            continue
        if got["count"] != len(want):
            problems.append(f"conversation {i}: count {got['count']} for {len(want)} tokens")
        if not generate:
            continue
        resp = served.client.chat.completions.create(model=served.model, messages=messages, temperature=0,
                                                     max_tokens=GEN_TOKENS, extra_body=extra)
        if resp.usage.prompt_tokens != len(want):
            problems.append(f"conversation {i}: usage.prompt_tokens {resp.usage.prompt_tokens} != {len(want)}")
        ref_tokens, safe = hf_greedy(hf_model, want, GEN_TOKENS)
        assert safe >= MIN_COMPARED, f"conversation {i}: only {safe} steps with a safe margin; pick another"
        got_text = resp.choices[0].message.content
        ref_text = continuation_text(tokenizer, want, ref_tokens[:safe])
        if not got_text.startswith(ref_text):
            problems.append(f"conversation {i}: generated {got_text!r}, transformers {ref_text!r} "
                            f"(first {safe} tokens compared)")
    return problems


@pytest.fixture(scope="module")
def zephyr(folders):
    served = Served(folders["zephyr"], 2)
    yield served
    served.close()


def test_folder_template_tp2_equals_transformers(zephyr, folders, hf_model):
    tokenizer = AutoTokenizer.from_pretrained(folders["zephyr"])
    problems = check_conversations(zephyr, tokenizer, hf_model, CONVERSATIONS)
    assert not problems, "\n".join(problems)


def test_generation_prompt_and_continue_final_message(zephyr, folders):
    tokenizer = AutoTokenizer.from_pretrained(folders["zephyr"])
    messages = CONVERSATIONS[1][:3]
    for options in ({"add_generation_prompt": False},
                    {"add_generation_prompt": False, "continue_final_message": True}):
        want = tokenizer.apply_chat_template(messages, **options)
        if hasattr(want, "input_ids"):
            want = want["input_ids"]
        got = zephyr.tokenize(messages=messages, **options)["tokens"]
        assert got == want, f"{options}: {got} != {want}"
        resp = zephyr.client.chat.completions.create(model=zephyr.model, messages=messages, max_tokens=2,
                                                     temperature=0, extra_body=options)
        assert resp.usage.prompt_tokens == len(want), options
    # The two together are refused, as in vLLM.
    resp = zephyr.http.post("/v1/chat/completions", json={
        "model": zephyr.model, "messages": messages, "continue_final_message": True, "max_tokens": 2})
    assert resp.status_code == 400 and "add_generation_prompt" in resp.json()["error"]["message"], resp.text


def test_text_content_parts_are_joined(zephyr):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    joined = [{"role": "user", "content": "Hello\nthere"}]
    assert zephyr.tokenize(messages=parts)["tokens"] == zephyr.tokenize(messages=joined)["tokens"]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    resp = zephyr.http.post("/tokenize", json={"messages": image})
    assert resp.status_code == 400 and "text content parts" in resp.json()["error"]["message"], resp.text


@pytest.mark.parametrize("name", ["vicuna", "codellama"])
def test_other_folder_templates_tp1(folders, hf_model, name):
    tokenizer = AutoTokenizer.from_pretrained(folders[name])
    served = Served(folders[name], 1)
    try:
        problems = check_conversations(served, tokenizer, hf_model, CONVERSATIONS, generate=(name == "vicuna"))
        if name == "codellama":
            # The template's own raise_exception, answered as a 400 with its message.
            resp = served.http.post("/v1/chat/completions", json={
                "model": served.model, "messages": [{"role": "assistant", "content": "x"}]})
            assert resp.status_code == 400, resp.text
            assert resp.json()["error"]["message"] == \
                "Conversation roles must alternate user/assistant/user/assistant/...", resp.text
    finally:
        served.close()
    assert not problems, "\n".join(problems)


def test_custom_template_kwargs_tojson_and_errors(folders, hf_model):
    tokenizer = AutoTokenizer.from_pretrained(folders["custom"])
    served = Served(folders["custom"], 1)
    try:
        persona = {"name": "Ada", "tags": ["b", "a"], "weight": 2.5, "id": 7, "note": "é<&>"}
        problems = check_conversations(served, tokenizer, hf_model, CONVERSATIONS[:2], generate=False,
                                       persona=persona)
        problems += check_conversations(served, tokenizer, hf_model, CONVERSATIONS[:1], generate=False)
        bad = served.http.post("/v1/chat/completions", json={
            "model": served.model, "messages": [{"role": "tool", "content": "x"}]})
        if bad.status_code != 400 or bad.json()["error"]["message"] != "Unknown role: tool":
            problems.append(f"raise_exception: {bad.status_code} {bad.text}")
        reserved = served.http.post("/tokenize", json={
            "messages": CONVERSATIONS[0], "chat_template_kwargs": {"messages": []}})
        if reserved.status_code != 400:
            problems.append(f"chat_template_kwargs setting messages: {reserved.status_code} {reserved.text}")
        # Still serving after the refusals.
        served.client.chat.completions.create(model=served.model, messages=CONVERSATIONS[0], max_tokens=2)
    finally:
        served.close()
    assert not problems, "\n".join(problems)


def test_chat_template_flag_overrides_the_folder(folders, tmp_path):
    path = tmp_path / "chatml.jinja"
    path.write_text(CHATML)
    tokenizer = AutoTokenizer.from_pretrained(folders["zephyr"])
    served = Served(folders["zephyr"], 1, extra=["--chat-template", path])
    try:
        for messages in CONVERSATIONS:
            want = tokenizer.apply_chat_template(messages, add_generation_prompt=True, chat_template=CHATML)
            if hasattr(want, "input_ids"):
                want = want["input_ids"]
            assert served.tokenize(messages=messages)["tokens"] == want
    finally:
        served.close()


def test_a_template_that_does_not_compile_stops_the_start(folders, tmp_path):
    broken = shutil.copytree(folders["zephyr"], tmp_path / "broken", symlinks=True)
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m.content }}"
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    coordinator = Coordinator(["--model", broken, "--tp", 1, "--local-workers", "--port", "0"])
    status = coordinator.proc.wait(timeout=60)
    assert status != 0
    stderr = coordinator.stderr()
    assert "chat template" in stderr and "tokenizer_config.json" in stderr, stderr


def test_tokenize_and_detokenize_prompts(zephyr, folders):
    tokenizer = AutoTokenizer.from_pretrained(folders["zephyr"])
    text = "Hello world, ünïcödé 🐫\nnew line"
    got = zephyr.tokenize(prompt=text, return_token_strs=True)
    want = tokenizer(text).input_ids
    assert got["tokens"] == want
    assert got["token_strs"] == tokenizer.convert_ids_to_tokens(want)
    assert got["max_model_len"] > 0 and got["count"] == len(want)
    assert zephyr.tokenize(prompt=text, add_special_tokens=False)["tokens"] == tokenizer(
        text, add_special_tokens=False).input_ids
    resp = zephyr.http.post("/detokenize", json={"model": zephyr.model, "tokens": want})
    assert resp.status_code == 200, resp.text
    assert resp.json()["prompt"] == tokenizer.decode(want)
    for body, why in [({"tokens": [1, 10 ** 9]}, "outside the vocabulary"),
                      ({"tokens": "hi"}, "Invalid request body")]:
        resp = zephyr.http.post("/detokenize", json=body)
        assert resp.status_code == 400 and why in resp.json()["error"]["message"], resp.text
    resp = zephyr.http.post("/tokenize", json={"prompt": "x", "frobnicate": 1})
    assert resp.status_code == 400, resp.text
    resp = zephyr.http.post("/tokenize", json={"model": "no-such-model", "prompt": "x"})
    assert resp.status_code == 404, resp.text


def test_a_folder_without_tokenizer_config_serves_chats(checkpoint, reference, tmp_path):
    """Only config.json, the weights and tokenizer.json (no tokenizer_config.json, no
    special_tokens_map.json): the built-in Llama 2 template takes BOS and EOS from config.json's
    ids as the tokenizer spells them, so chats, with logprobs and streamed, and structured outputs
    are served, equal to the reference that transformers rendered from the complete folder."""
    folder = tmp_path / "bare"
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).symlink_to(checkpoint / name)
    served = Served(folder, 1)
    try:
        problems = []
        for i, ref in enumerate(reference["chats"]):
            if served.tokenize(messages=ref["messages"])["tokens"] != ref["prompt_ids"]:
                problems.append(f"chat {i}: /tokenize differs from {ref['prompt_ids']}")
            resp = chat(served.client, served.model, ref["messages"], logprobs=True, top_logprobs=2)
            problems += chat_problems(f"chat {i}", resp, ref)
            content = resp.choices[0].logprobs.content
            if len(content) != resp.usage.completion_tokens or any(len(t.top_logprobs) != 2 for t in content):
                problems.append(f"chat {i}: logprobs {content!r}")
            streamed = "".join(c.choices[0].delta.content or "" for c in
                               chat(served.client, served.model, ref["messages"], stream=True) if c.choices)
            if streamed != ref["text"]:
                problems.append(f"chat {i}: streamed {streamed!r} != {ref['text']!r}")
        assert not problems, "\n".join(problems)

        choices = ["yes", "no"]
        resp = chat(served.client, served.model, reference["chats"][0]["messages"],
                    extra_body={"guided_choice": choices})
        assert resp.choices[0].message.content in choices, resp
        schema = {"type": "object", "properties": {"answer": {"enum": choices}}, "required": ["answer"],
                  "additionalProperties": False}
        resp = served.client.chat.completions.create(
            model=served.model, messages=reference["chats"][0]["messages"], max_tokens=32, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
        assert resp.choices[0].finish_reason == "stop", resp
        assert json.loads(resp.choices[0].message.content)["answer"] in choices, resp
    finally:
        served.close()
