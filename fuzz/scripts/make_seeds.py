"""Writes the fuzz targets' seed inputs (fuzz/seeds/<target>/): small valid inputs the fuzzer
mutates from. Run from the repository root: python3 fuzz/scripts/make_seeds.py"""
import json
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "seeds"


def varint(n):
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number, wire, payload):
    key = varint(number << 3 | wire)
    if wire == 5:  # fixed32: a float
        return key + struct.pack("<f", payload)
    return key + (varint(payload) if wire == 0 else varint(len(payload)) + payload)


def packed(values):
    return b"".join(varint(v) for v in values)


# Greedy sampling, complete (top_p = 1, repetition_penalty = 1): ranks apply what is sent and
# refuse values outside their ranges.
GREEDY = field(2, 5, 1.0) + field(10, 5, 1.0)


def sequence(seq_id, tokens, start, blocks, sample=True):
    """A sequence admitted in this step (field 5, greedy sampling), so a rank that has not seen
    it before takes `blocks` as its whole table."""
    return (field(1, 0, seq_id) + field(2, 2, packed(tokens)) + field(3, 0, start)
            + field(4, 2, packed(blocks)) + field(5, 2, GREEDY) + field(6, 0, int(sample)))


def step(step_id, sequences):
    return field(1, 0, step_id) + b"".join(field(2, 2, s) for s in sequences)


def write(target, name, data):
    d = ROOT / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


# step_plan: 3 bytes of limits (max positions 1 + 16a, block size b % 33, blocks c), then a step.
limits = bytes([32, 16, 64])  # 513 positions, blocks of 16, 64 blocks
write("step_plan", "prefill", limits + step(0, [sequence(1, [1, 450, 4996, 310], 0, [0])]))
write("step_plan", "decode-batch", limits + step(7, [sequence(1, [29889], 20, [0, 1]),
                                                     sequence(2, [263], 3, [2])]))
write("step_plan", "mixed-chunk", limits + step(9, [sequence(3, list(range(5, 40)), 16, [4, 5, 6, 7], False),
                                                    sequence(1, [29889], 21, [0, 1])]))

# request: HTTP bodies of both endpoints.
write("request", "completion", json.dumps({"model": "m", "prompt": "Once upon a time", "max_tokens": 16,
                                           "temperature": 0.7, "top_p": 0.9, "stop": ["\n", "."], "seed": 3,
                                           "logprobs": 2, "stream": True,
                                           "stream_options": {"include_usage": True}}))
write("request", "completion-ids", json.dumps({"model": "m", "prompt": [1, 450, 4996], "top_k": 40,
                                               "presence_penalty": 0.5, "ignore_eos": True}))
write("request", "chat", json.dumps({"model": "m", "messages": [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Tell me a story."}],
    "max_completion_tokens": 32, "logprobs": True, "top_logprobs": 3, "tools": [], "user": "u"}))

# chat_template: messages as role byte (0 system, 1 user, 2 assistant, else other) + content, split by 0xFF.
write("chat_template", "system-user", b"\x00Be brief.\xff\x01Hi there\xff")
write("chat_template", "three-turns", b"\x01Hi\xff\x02Hello! How can I help?\xff\x01A story, please.")

# detokenize: byte 0 = prompt length (mod 8), then little-endian u16 token ids (mod the vocabulary).
def ids(*tokens):
    return b"".join(t.to_bytes(2, "little") for t in tokens)


write("detokenize", "words", bytes([2]) + ids(1, 450, 4996, 17354, 1701, 29916))
write("detokenize", "byte-fallback", bytes([0]) + ids(1, 450, 198, 172, 29871, 13, 450))  # "The" + é (two byte tokens)
