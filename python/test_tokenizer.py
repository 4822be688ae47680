"""Checks a Llama 2 tokenizer folder built by python/build_tokenizer.py.

    CARAVAN_TOKENIZER_DIR=models/llama2-tokenizer .venv/bin/python -m pytest -q python/test_tokenizer.py

The expected ids are Llama 2's own: the test cases of llama-tokenizer-js (whose defaultTests check its
encoder against Meta's tokenizer), and its README's "Hello world!" example. A missing or unset folder is
a failure, not a skip.
"""
import json
import os

import pytest

# encode(text) with BOS; from llama-tokenizer-js 1.2.2 (defaultTests and README).
KNOWN = [
    ("Hello world", [1, 15043, 3186]),
    ("Hello world!", [1, 15043, 3186, 29991]),
    ("grabbed", [1, 2646, 1327, 287]),
    (" grabbed", [1, 29871, 2646, 1327, 287]),
    ("           grabbed", [1, 9651, 2646, 1327, 287]),
    ("\n", [1, 29871, 13]),
    (" \n", [1, 259, 13]),
    ("\ttabs\t\t\t\tout here", [1, 29871, 12, 21175, 12, 12, 12, 12, 449, 1244]),
    ("ax\n####\nboo", [1, 4853, 13, 4136, 13, 833, 29877]),
    ("镇", [1, 29871, 30411]),
    ("🦙", [1, 29871, 243, 162, 169, 156]),
    ("🦙Ꙋ", [1, 29871, 243, 162, 169, 156, 237, 156, 141]),
    ("Ꙋ🦙", [1, 29871, 237, 156, 141, 243, 162, 169, 156]),
]

ROUND_TRIPS = [
    "Hello world",
    "grüße 日本語 🦙",
    "  two leading spaces,  doubled  inside, trailing ",
    "tabs\tand\nnewlines\n\n",
    "emoji 🦙🤖👍🏽 and Ꙋ",
    "Привет, мир! 안녕하세요 مرحبا",
    "x",
]


@pytest.fixture(scope="module")
def folder():
    path = os.environ.get("CARAVAN_TOKENIZER_DIR")
    if not path:
        pytest.fail("CARAVAN_TOKENIZER_DIR is not set; build one with python/build_tokenizer.py --out DIR")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        pytest.fail(f"{path}/tokenizer.json is missing; run python/build_tokenizer.py --out {path}")
    return path


@pytest.fixture(scope="module")
def tok(folder):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))


def test_shape(folder, tok):
    assert tok.get_vocab_size() == 32000
    assert [tok.id_to_token(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert tok.token_to_id("<0x0A>") == 13 and tok.token_to_id("\u2581") == 29871
    with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
        model = json.load(f)["model"]
    assert model["type"] == "BPE" and model["byte_fallback"] and model["fuse_unk"]
    assert len(model["merges"]) == 61249
    with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert config["add_bos_token"] is True


@pytest.mark.parametrize("text,ids", KNOWN, ids=[repr(t)[:24] for t, _ in KNOWN])
def test_known_encoding(tok, text, ids):
    assert tok.encode(text).ids == ids
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_package_cases(folder, tok):
    """All of the package's testCase(...) calls, including its long multilingual paragraph."""
    path = os.path.join(folder, "llama_tokenizer_js_cases.json")
    if not os.path.isfile(path):
        pytest.fail(f"{path} is missing; rebuild with python/build_tokenizer.py --force")
    with open(path, encoding="utf-8") as f:
        cases = json.load(f)["cases"]
    assert len(cases) >= 12
    bad = [c["text"][:40] for c in cases if tok.encode(c["text"]).ids != c["ids"]]
    assert not bad, f"mismatched encodings: {bad}"


@pytest.mark.parametrize("text", ROUND_TRIPS)
def test_round_trip(tok, text):
    ids = tok.encode(text).ids
    assert ids[0] == 1 and 1 not in ids[1:]
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_decode_only(tok):
    # The package's decode tests that map onto HF's decode (BOS skipped, leading space stripped).
    assert tok.decode([1, 2646, 1327, 287], skip_special_tokens=True) == "grabbed"
    assert tok.decode([2646, 1327, 287], skip_special_tokens=True) == "grabbed"
    assert tok.decode([1, 15043, 3186, 2], skip_special_tokens=False) == "<s> Hello world</s>"
