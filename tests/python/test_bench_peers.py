"""The benchmarks' llama.cpp peer survives a llama-bench that crashes in prefill.

llama-bench 0.3.36 segfaults in quantized prefill on some CPUs while its decode runs; a crash must
not end a whole benchmark (bench/smollm2_bench.py used to abort). These runs put a stand-in for
the llama-bench binary in front of `run_bench`: it crashes (by a signal, or with a shell's exit
139) when asked for a prompt, and prints llama-bench's JSON otherwise. Nothing here builds
llama.cpp; its real runs are the benchmarks themselves.
"""
import json
import stat
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import llama_cpp_peer  # noqa: E402

DECODE = {"n_prompt": 0, "n_gen": 16, "avg_ts": 123.4, "stddev_ts": 1.5, "model_type": "llama ?B Q8_0"}
PREFILL = {"n_prompt": 512, "n_gen": 0, "avg_ts": 987.6, "stddev_ts": 2.5, "model_type": "llama ?B Q8_0"}


def stand_in(tmp_path: Path, on_prompt: str) -> Path:
    """A llama-bench that runs `on_prompt` (shell) when -p is not 0, and prints the JSON records
    of the tests it was asked for."""
    script = tmp_path / "llama-bench"
    script.write_text(f"""#!/bin/sh
prompt=0; gen=0
while [ $# -gt 0 ]; do
  case "$1" in -p) prompt=$2; shift;; -n) gen=$2; shift;; esac
  shift
done
if [ "$prompt" != 0 ]; then {on_prompt}; fi
records=""
[ "$prompt" != 0 ] && records='{json.dumps(PREFILL)}'
[ "$gen" != 0 ] && records="${{records:+$records,}}"'{json.dumps(DECODE)}'
echo "[$records]"
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def bench(binary: Path, prompt_tokens=512):
    return llama_cpp_peer.run_bench("model.gguf", 2, prompt_tokens=prompt_tokens, gen_tokens=16,
                                    repetitions=1, binary=binary)


def test_a_run_that_works_gives_both_figures(tmp_path):
    r = bench(stand_in(tmp_path, on_prompt=":"))
    assert (r["prefill_tps"], r["decode_tps"], r["prefill_error"]) == (987.6, 123.4, None)
    assert llama_cpp_peer.prefill_cell(r) == "988"


@pytest.mark.parametrize("crash, status", [("kill -SEGV $$", "killed by signal 11"),
                                           ("exit 139", "exit 139")])
def test_a_prefill_crash_is_recorded_and_decode_still_measured(tmp_path, crash, status):
    r = bench(stand_in(tmp_path, on_prompt=crash))
    assert r["prefill_tps"] is None
    assert r["decode_tps"] == 123.4, "decode is measured again alone"
    assert r["prompt_tokens"] == 0
    assert r["prefill_error"] == f"llama-bench crashed in pp512 ({status})"
    assert llama_cpp_peer.prefill_cell(r) == r["prefill_error"], "the table shows the crash"


def test_other_failures_still_raise(tmp_path):
    with pytest.raises(RuntimeError, match="exit 3"):
        bench(stand_in(tmp_path, on_prompt="exit 3"))
    # A crash with no prompt leaves nothing to measure: it raises too.
    crashing = tmp_path / "crashing"
    crashing.write_text("#!/bin/sh\nkill -SEGV $$\n")
    crashing.chmod(0o755)
    with pytest.raises(RuntimeError, match="killed by signal 11"):
        bench(crashing, prompt_tokens=0)
