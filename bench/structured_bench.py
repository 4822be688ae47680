#!/usr/bin/env python3
"""The cost of structured outputs: the coordinator's time computing llguidance token masks per
step, against the step's own wall time, at 32 concurrent constrained streams, with the same 32
streams unconstrained measured in the same run as the peer.

Model: SmolLM2-135M-Instruct (scripts/setup.sh), TP 1, which answers the JSON-schema chat below
in valid JSON (a random-weight model would wander until max_tokens). Each of the 32 chats asks
for a JSON object of a small schema, sampled (temperature 0.7, its own seed), up to 48 tokens.
Figures come from /metrics: caravan_structured_output_mask_seconds_total, caravan_step_seconds_total
and caravan_steps_total, as differences over each run.

Usage: bench/structured_bench.py [--streams 32] [--bin-dir target/release]
(the binaries are built in release unless --bin-dir names a folder that has them). Prints a
Markdown table for docs/BENCHMARKS.md.
"""
import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_bench import REPO, Coordinator, log  # noqa: E402

MODEL_DIR = REPO / "models" / "smollm2-135m-instruct"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                           "country": {"type": "string", "maxLength": 30},
                                           "population": {"type": "integer"}},
          "required": ["city", "country", "population"], "additionalProperties": False}
CITIES = ["France", "Italy", "Spain", "Japan", "Peru", "Kenya", "Canada", "Norway"]


def metrics(url):
    values = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def run(url, model, streams, constrained):
    def one(i):
        body = {"model": model, "max_tokens": 48, "temperature": 0.7, "seed": i,
                "messages": [{"role": "user", "content": f"What is the capital of {CITIES[i % len(CITIES)]}? "
                                                         "Answer in JSON with the city, country and population."}]}
        if constrained:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "capital", "schema": SCHEMA}}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        return r.json()["choices"][0]

    before = metrics(url)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        choices = list(pool.map(one, range(streams)))
    wall = time.perf_counter() - t0
    after = metrics(url)
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    valid = 0
    for c in choices:
        try:
            valid += set(json.loads(c["message"]["content"])) == set(SCHEMA["properties"])
        except ValueError:
            pass
    steps = delta["caravan_steps_total"]
    return {"steps": steps, "step_ms": 1000 * delta["caravan_step_seconds_total"] / steps,
            "mask_ms": 1000 * delta["caravan_structured_output_mask_seconds_total"] / steps,
            "tokens": delta["caravan_generation_tokens_total"], "wall": wall, "valid": valid}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--bin-dir", type=Path, default=REPO / "target" / "release")
    args = ap.parse_args()
    if not (MODEL_DIR / "config.json").is_file():
        sys.exit(f"{MODEL_DIR} is missing: run scripts/setup.sh first")
    if not (args.bin_dir / "caravan-coordinator").is_file():
        log("building release binaries")
        subprocess.run(["cargo", "build", "--quiet", "--release", "--bins"], cwd=REPO, check=True)
    os.environ["CARAVAN_BIN_DIR"] = str(args.bin_dir.resolve())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    coordinator = Coordinator(["--model", MODEL_DIR, "--tp", 1, "--local-workers", "--port", 0,
                               "--max-batch-size", args.streams])
    try:
        url = coordinator.wait_ready()
        run(url, MODEL_DIR.name, 2, True)  # warm-up
        rows = {}
        for constrained in (False, True):
            log(f"{args.streams} streams, {'constrained' if constrained else 'free'}")
            rows[constrained] = run(url, MODEL_DIR.name, args.streams, constrained)
    finally:
        coordinator.stop()
    free, json_rows = rows[False], rows[True]
    lines = [f"SmolLM2-135M-Instruct, TP 1, {args.streams} concurrent chats, binaries from "
             f"`{args.bin_dir.relative_to(REPO) if args.bin_dir.is_relative_to(REPO) else args.bin_dir}`, commit {commit}, "
             f"{time.strftime('%Y-%m-%d')}. Command: `.venv/bin/python bench/structured_bench.py`.", "",
             "| streams | steps | step ms (wall, mean) | mask ms per step | mask / step | tokens | valid JSON |",
             "|---|---|---|---|---|---|---|"]
    for name, r in (("free", free), ("json_schema", json_rows)):
        lines.append(f"| {name} | {r['steps']:.0f} | {r['step_ms']:.2f} | {r['mask_ms']:.3f} "
                     f"| {100 * r['mask_ms'] / r['step_ms']:.2f}% | {r['tokens']:.0f} | {r['valid']} of {args.streams} |")
    lines += ["", f"Constrained step time / free step time: {json_rows['step_ms'] / free['step_ms']:.2f}x "
                  f"(the mask is applied on the workers, inside the step)."]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
