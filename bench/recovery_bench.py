#!/usr/bin/env python3
"""How long clients pause when a rank dies: SIGKILL of rank 1 of a TP-2 cluster while 8 streams
run (the serving fixture, `--local-workers`), with the worker restarted by the coordinator and
with a spare taking the rank (`--local-spares 1`).

Measured per kill: the kill to `/health` 200 again (polled), and `caravan_recovery_seconds` (the
group's failure to the next group taking over the requests in flight). Every stream must end
without an error, or the run fails. Prints min / median / max over the trials.

Run: CARAVAN_TOKENIZER_DIR=models/llama2-tokenizer .venv/bin/python bench/recovery_bench.py [--trials 3]
(after `cargo build --workspace --bins` and one test run, which builds fixtures/serving).
"""
import argparse
import os
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "python"))

import httpx  # noqa: E402
import openai  # noqa: E402

import test_cluster as cluster  # noqa: E402
from conftest import (READY_TIMEOUT_S, Coordinator, children, ctl_status, listening_pid, metrics,  # noqa: E402
                      wait_for_metric, wait_for_spares, wait_for_status)


def one_kill(checkpoint: Path, spares: int) -> tuple:
    args = ["--model", checkpoint, "--tp", 2, "--local-workers", "--port", 0]
    if spares:
        args += ["--local-spares", spares]
    coordinator = Coordinator(args)
    try:
        url = coordinator.wait_ready()
        if spares:
            wait_for_spares(url, spares)
        rank1_port = int(ctl_status(url)["workers"][1]["address"].rsplit(":", 1)[1])
        victim = listening_pid(children(coordinator.proc.pid), rank1_port)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0)
        outs, threads = cluster.start_streams(client, checkpoint.name)
        cluster.wait_for_chunks(outs, threads, 5)
        with httpx.Client(base_url=url, timeout=60) as http:
            killed = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            # With a spare the pause can be shorter than a poll of /health: the recovery is seen
            # in its metric (observed when the new group takes the requests over).
            wait_for_metric(http, "caravan_recovery_seconds_count", lambda v: v >= 1, READY_TIMEOUT_S)
            wait_for_status(http, "/health", 200, READY_TIMEOUT_S)
            paused = time.monotonic() - killed
            for t in threads:
                t.join(600)
            errors = [o.get("error", "not finished after 600 s") for o in outs if "finish" not in o]
            if errors:
                sys.exit(f"streams failed across the kill: {errors}")
            return paused, metrics(http)["caravan_recovery_seconds_sum"]
    finally:
        coordinator.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "fixtures" / "serving")
    args = parser.parse_args()
    print("| how the dead rank is replaced | kill → /health 200 (min / median / max) | caravan_recovery_seconds |")
    print("|---|---|---|")
    for spares, how in ((0, "the coordinator restarts the local worker"), (1, "a registered spare takes the rank")):
        runs = []
        for trial in range(args.trials):
            runs.append(one_kill(args.checkpoint, spares))
            print(f"  {how}: trial {trial + 1}/{args.trials}: {runs[-1][0]:.2f} s", file=sys.stderr, flush=True)
        cells = [" / ".join(f"{f(v):.2f}" for f in (min, statistics.median, max)) + " s"
                 for v in zip(*runs)]
        print(f"| {how} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
