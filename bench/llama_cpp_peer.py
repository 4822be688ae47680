#!/usr/bin/env python3
"""llama.cpp as a peer for Caravan's CPU benchmark: build it, convert a checkpoint, run llama-bench.

llama.cpp's source comes from the sdist of `llama-cpp-python` on PyPI (it vendors llama.cpp under
vendor/llama.cpp), since the package registries are the only network this project's machines
reach. Everything lands under .tools/llama-cpp/ (git-ignored):

  llama_cpp_python-<ver>.tar.gz      the sdist (`pip download --no-binary :all:`)
  llama_cpp_python-<ver>/            unpacked; vendor/llama.cpp is the source used
  build-<ver>/bin/llama-bench        CPU-only, static, -march=native (GGML_NATIVE) Release build
  gguf/<checkpoint>-<outtype>.gguf   converted checkpoints

Steps, each idempotent (a stamp file or the output's age decides whether to redo it):
  ensure_built()  download + unpack + cmake build of llama-bench; needs cmake (Debian: `cmake`)
                  and a C++ compiler; returns the folder holding llama-bench.
  convert()       Hugging Face Llama checkpoint -> GGUF (f32, f16 or bf16) with the source's own
                  convert_hf_to_gguf.py and its bundled gguf-py (first on PYTHONPATH; the PyPI
                  `gguf` package is not used). Needs torch, numpy, transformers, safetensors,
                  pyyaml, tqdm and sentencepiece: with no tokenizer.model the converter still
                  imports sentencepiece before falling back to tokenizer.json (LlamaHfVocab).
  run_bench()     `llama-bench -o json`; prefill (pp) and decode (tg) tokens/s, mean and stddev.
                  llama-bench measures decode from an empty context (its tgN test).
  available()     whether all of this can work here, with the reason when not, so that a caller
                  can skip the peer with a message.

Usage: bench/llama_cpp_peer.py [--checkpoint models/bench-150m-llama2] [--threads 2]
                               [--outtype f32,f16] [--prompt-tokens 512] [--gen-tokens 64]
Prints a Markdown table; progress goes to stderr.
"""
import argparse
import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TOOLS_DIR = REPO / ".tools" / "llama-cpp"
# Pinned: the newest llama-cpp-python on PyPI when this peer was added.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",  # deprecated and ignored by this llama.cpp; kept for older pins
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",  # the server's web UI would be fetched from a hub
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
]
BUILD_TARGETS = ["llama-bench", "llama-quantize"]
BUILD_JOBS = 2  # the machine has 2 cores, shared
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# Python modules convert_hf_to_gguf.py (and gguf-py) import for a Llama checkpoint.
CONVERTER_MODULES = {"torch": "torch", "numpy": "numpy", "transformers": "transformers",
                     "safetensors": "safetensors", "yaml": "pyyaml", "tqdm": "tqdm",
                     "sentencepiece": "sentencepiece"}


def log(msg):
    print(f"[llama.cpp] {msg}", file=sys.stderr, flush=True)


def _python():
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _run(cmd, **kw):
    log("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


@contextlib.contextmanager
def _locked(tools_dir):
    """Serializes concurrent calls (two benchmark runs) on one tools folder."""
    tools_dir.mkdir(parents=True, exist_ok=True)
    with open(tools_dir / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _paths(tools_dir):
    tools_dir = Path(tools_dir)
    src_root = tools_dir / SDIST_NAME
    build = tools_dir / f"build-{LLAMA_CPP_PYTHON_VERSION}"
    return {
        "tarball": tools_dir / f"{SDIST_NAME}.tar.gz",
        "src_root": src_root,
        "src": src_root / "vendor" / "llama.cpp",
        "build": build,
        "bin": build / "bin",
        "stamp": build / "caravan-build-stamp.json",
    }


def _stamp_wanted():
    return {"llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, "cmake_flags": CMAKE_FLAGS,
            "targets": BUILD_TARGETS}


def _built_bin(tools_dir):
    """The folder with llama-bench when a finished build with today's flags is there, else None."""
    p = _paths(tools_dir)
    try:
        stamp = json.loads(p["stamp"].read_text())
    except (OSError, ValueError):
        return None
    if {k: stamp.get(k) for k in _stamp_wanted()} != _stamp_wanted():
        return None
    return p["bin"] if os.access(p["bin"] / "llama-bench", os.X_OK) else None


def _tool_version(cmd):
    """First line of `cmd --version`, or None when the tool is missing or broken."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return (out.stdout.strip().splitlines() or ["?"])[0]


def _check_toolchain():
    """Raises RuntimeError naming what to install when cmake or a C++ compiler is missing."""
    missing = []
    if _tool_version(["cmake", "--version"]) is None:
        missing.append("cmake (Debian package `cmake`: apt-get install -y cmake)")
    if _tool_version(["c++", "--version"]) is None:
        missing.append("a C++ compiler as `c++` (Debian package `g++`: apt-get install -y g++)")
    if missing:
        raise RuntimeError("cannot build llama.cpp: missing " + "; ".join(missing))


def _missing_converter_modules():
    return [pkg for mod, pkg in CONVERTER_MODULES.items() if importlib.util.find_spec(mod) is None]


def available(tools_dir=DEFAULT_TOOLS_DIR, need_convert=True):
    """(True, description) when the peer can run here, else (False, reason).

    Builds nothing and touches no network: it checks for an existing build or for cmake and a C++
    compiler, and (need_convert) for the Python packages the GGUF converter imports.
    """
    tools_dir = Path(tools_dir)
    reasons = []
    have_bin = _built_bin(tools_dir)
    if have_bin is None:
        try:
            _check_toolchain()
        except RuntimeError as e:
            reasons.append(str(e))
    if need_convert:
        missing = _missing_converter_modules()
        if missing:
            reasons.append("the GGUF converter needs Python packages not installed in "
                           f"{sys.executable}: {', '.join(missing)}")
    if reasons:
        return False, "; ".join(reasons)
    if have_bin is not None:
        return True, f"llama.cpp (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}) built in {have_bin}"
    return True, (f"llama.cpp (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}) can be built: "
                  "the first run downloads the sdist from PyPI and compiles for several minutes")


def _ensure_source(tools_dir):
    """Downloads and unpacks the sdist (caller holds the lock); returns vendor/llama.cpp."""
    p = _paths(tools_dir)
    marker = p["src_root"] / ".caravan-unpacked"
    if marker.exists() and (p["src"] / "CMakeLists.txt").exists():
        return p["src"]
    if not p["tarball"].exists():
        log(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} sdist from PyPI "
            "(pip prepares its metadata too: a few minutes)")
        _run([_python(), "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              "--disable-pip-version-check", "-d", p["tarball"].parent,
              f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"], stdout=sys.stderr)
        if not p["tarball"].exists():
            raise RuntimeError(f"pip download did not produce {p['tarball']}")
    log(f"unpacking {p['tarball'].name}")
    tmp = p["tarball"].parent / f".unpack-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(p["tarball"]) as tar:
        tar.extractall(tmp, filter="data")
    if not (tmp / SDIST_NAME / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"{p['tarball'].name} has no vendor/llama.cpp/CMakeLists.txt")
    shutil.rmtree(p["src_root"], ignore_errors=True)
    (tmp / SDIST_NAME).rename(p["src_root"])
    shutil.rmtree(tmp, ignore_errors=True)
    marker.write_text(LLAMA_CPP_PYTHON_VERSION + "\n")
    return p["src"]


def source_dir(tools_dir=DEFAULT_TOOLS_DIR):
    """vendor/llama.cpp of the pinned sdist, downloaded and unpacked if needed."""
    tools_dir = Path(tools_dir)
    with _locked(tools_dir):
        return _ensure_source(tools_dir)


def ensure_built(tools_dir=DEFAULT_TOOLS_DIR):
    """Builds llama-bench once (idempotent, stamped); returns the folder holding the binary."""
    tools_dir = Path(tools_dir)
    done = _built_bin(tools_dir)
    if done is not None:
        return done
    with _locked(tools_dir):
        done = _built_bin(tools_dir)  # another process may have finished while we waited
        if done is not None:
            return done
        _check_toolchain()
        log(_tool_version(["cmake", "--version"]) + "; " + _tool_version(["c++", "--version"]))
        src = _ensure_source(tools_dir)
        p = _paths(tools_dir)
        p["stamp"].unlink(missing_ok=True)
        env = dict(os.environ)
        # The sdist ships vendor/llama.cpp's submodule git dir, so build-info reports the real
        # llama.cpp commit; the ceiling keeps git from ever reaching Caravan's own repository.
        env["GIT_CEILING_DIRECTORIES"] = str(tools_dir.resolve())
        t0 = time.monotonic()
        log(f"configuring {src}")
        _run(["cmake", "-S", src, "-B", p["build"], *CMAKE_FLAGS], env=env, stdout=sys.stderr)
        log(f"building {', '.join(BUILD_TARGETS)} with -j{BUILD_JOBS} (10-20 minutes on 2 cores)")
        _run(["cmake", "--build", p["build"], "--config", "Release", "-j", str(BUILD_JOBS),
              "--target", *BUILD_TARGETS], env=env, stdout=sys.stderr)
        if not os.access(p["bin"] / "llama-bench", os.X_OK):
            raise RuntimeError(f"build finished but {p['bin'] / 'llama-bench'} is missing")
        elapsed = time.monotonic() - t0
        p["stamp"].write_text(json.dumps({**_stamp_wanted(), "build_seconds": round(elapsed, 1),
                                          "built_at": time.strftime("%Y-%m-%dT%H:%M:%S")},
                                         indent=2) + "\n")
        log(f"built in {elapsed:.0f} s: {p['bin'] / 'llama-bench'}")
        return p["bin"]


def _converter_env(src):
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(src / "gguf-py")] + [x for x in env.get("PYTHONPATH", "").split(os.pathsep) if x])
    env["HF_HUB_OFFLINE"] = "1"  # local folders only: never reach for a hub
    env["TRANSFORMERS_OFFLINE"] = "1"
    return env


def convert(checkpoint_dir, outtype, tools_dir=DEFAULT_TOOLS_DIR):
    """Converts a Hugging Face Llama checkpoint to tools_dir/gguf/<name>-<outtype>.gguf.

    Idempotent: an output newer than every file of the checkpoint is reused.
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}")
    ckpt = Path(checkpoint_dir).resolve()
    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt} is not a Hugging Face checkpoint (no config.json)")
    tools_dir = Path(tools_dir)
    out = tools_dir / "gguf" / f"{ckpt.name}-{outtype}.gguf"
    newest_input = max(f.stat().st_mtime for f in ckpt.iterdir() if f.is_file())
    if out.exists() and out.stat().st_mtime >= newest_input:
        return out
    missing = _missing_converter_modules()
    if missing:
        raise RuntimeError("convert_hf_to_gguf.py needs these Python packages in "
                           f"{sys.executable}: {', '.join(missing)}")
    src = source_dir(tools_dir)
    env = _converter_env(src)
    python = sys.executable  # the interpreter whose packages were checked above
    # The converter must import gguf-py from this source, never a `gguf` from site-packages.
    where = subprocess.run([python, "-c", "import gguf; print(gguf.__file__)"], env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to((src / "gguf-py").resolve()):
        raise RuntimeError(f"gguf resolves to {where}, not to {src / 'gguf-py'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    log(f"converting {ckpt.name} to GGUF {outtype}")
    t0 = time.monotonic()
    try:
        _run([python, src / "convert_hf_to_gguf.py", ckpt, "--outtype", outtype, "--outfile", tmp,
              "--model-name", ckpt.name], env=env, stdout=sys.stderr, stderr=sys.stderr)
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"wrote {out} ({out.stat().st_size / 2**20:.0f} MiB) in {time.monotonic() - t0:.0f} s")
    return out


QUANTIZE_TYPES = {"q4_0": "Q4_0"}  # what llama-quantize makes from the f16 GGUF


def quantize(checkpoint_dir, qtype, tools_dir=DEFAULT_TOOLS_DIR):
    """tools_dir/gguf/<name>-<qtype>.gguf made by llama-quantize from the f16 GGUF (as llama.cpp's
    users make Q4_0: its default keeps the output matrix wider, Q6_K). Idempotent like convert."""
    if qtype not in QUANTIZE_TYPES:
        raise ValueError(f"qtype must be one of {', '.join(QUANTIZE_TYPES)}, not {qtype!r}")
    f16 = convert(checkpoint_dir, "f16", tools_dir)
    out = f16.with_name(f16.name.replace("-f16.gguf", f"-{qtype}.gguf"))
    if out.exists() and out.stat().st_mtime >= f16.stat().st_mtime:
        return out
    tool = ensure_built(tools_dir) / "llama-quantize"
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    log(f"quantizing {f16.name} to {QUANTIZE_TYPES[qtype]}")
    try:
        _run([tool, f16, tmp, QUANTIZE_TYPES[qtype]], stdout=sys.stderr, stderr=sys.stderr)
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def run_bench(gguf, threads, prompt_tokens=512, gen_tokens=64, repetitions=3,
              tools_dir=DEFAULT_TOOLS_DIR, timeout=3600, binary=None):
    """Runs llama-bench on a GGUF; returns tokens/s for prefill (ppN) and decode (tgN).

    Keys: prefill_tps, prefill_tps_stddev, decode_tps, decode_tps_stddev (None for a test that was
    not run, e.g. prompt_tokens=0), prefill_error (why prefill has no figure when llama-bench
    crashed in it, else None), plus threads, prompt_tokens, gen_tokens, repetitions, model_type
    (e.g. "llama ?B F16"), model_size, model_n_params, build_commit, build_number, cpu_info,
    backends, and raw (llama-bench's JSON records, with each repetition's samples).

    llama-bench 0.3.36 segfaults in quantized prefill on some CPUs (exit 139 on Q8_0/Q4_0/Q4_1
    with -p 512) while its decode runs: a crash with a prompt is recorded in prefill_error and
    decode is measured again alone (-p 0), so one peer's crash does not end a whole benchmark.
    Any other failure raises. `binary` replaces the built llama-bench (tests).
    """
    bench = Path(binary) if binary else ensure_built(tools_dir) / "llama-bench"
    proc = _llama_bench(bench, gguf, threads, prompt_tokens, gen_tokens, repetitions, timeout)
    prefill_error = None
    if prompt_tokens > 0 and _crashed(proc.returncode):
        prefill_error = f"llama-bench crashed in pp{prompt_tokens} ({_exit_status(proc.returncode)})"
        log(f"{prefill_error}; measuring decode alone (-p 0)")
        prompt_tokens = 0
        proc = _llama_bench(bench, gguf, threads, prompt_tokens, gen_tokens, repetitions, timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench {_exit_status(proc.returncode)}: {proc.stderr[-2000:]}")
    records = json.loads(proc.stdout)
    result = {"threads": threads, "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
              "repetitions": repetitions, "prefill_tps": None, "prefill_tps_stddev": None,
              "decode_tps": None, "decode_tps_stddev": None, "prefill_error": prefill_error,
              "raw": records}
    for rec in records:
        if rec.get("n_prompt", 0) > 0 and rec.get("n_gen", 0) == 0:
            key = "prefill"
        elif rec.get("n_gen", 0) > 0 and rec.get("n_prompt", 0) == 0:
            key = "decode"
        else:
            continue
        result[f"{key}_tps"] = rec.get("avg_ts")
        result[f"{key}_tps_stddev"] = rec.get("stddev_ts")
        for k in ("model_type", "model_size", "model_n_params", "build_commit", "build_number",
                  "cpu_info", "backends"):
            if k in rec:
                result.setdefault(k, rec[k])
    return result


def _llama_bench(bench, gguf, threads, prompt_tokens, gen_tokens, repetitions, timeout):
    cmd = [bench, "-m", Path(gguf), "-t", threads, "-p", prompt_tokens, "-n", gen_tokens,
           "-r", repetitions, "-o", "json"]
    log("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)


def _crashed(returncode):
    """Whether a process ended by a signal: negative from subprocess, or a shell's 128 + N."""
    return returncode < 0 or returncode > 128


def _exit_status(returncode):
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return f"exit {returncode}"


def prefill_cell(result, digits=0):
    """A table cell for a peer's prefill: its tok/s, "-" when not measured, or the crash."""
    if result.get("prefill_error"):
        return result["prefill_error"]
    tps = result.get("prefill_tps", result.get("prefill"))
    return "-" if tps is None else f"{tps:.{digits}f}"


def _fmt(mean, std):
    if mean is None:
        return "-"
    return f"{mean:.1f} ± {std:.1f}" if std is not None else f"{mean:.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="models/bench-150m-llama2",
                    help="Hugging Face Llama checkpoint folder (relative to the repository root)")
    ap.add_argument("--threads", default="2", help="thread counts, comma-separated")
    ap.add_argument("--outtype", default="f32,f16", help=f"comma-separated, of {', '.join(OUTTYPES)}")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--tools-dir", type=Path, default=DEFAULT_TOOLS_DIR)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    outtypes = [t.strip() for t in args.outtype.split(",") if t.strip()]
    for t in outtypes:
        if t not in OUTTYPES:
            ap.error(f"--outtype {t}: must be one of {', '.join(OUTTYPES)}")
    thread_counts = [int(t) for t in args.threads.split(",")]

    ok, reason = available(args.tools_dir)
    if not ok:
        log(f"skipping the llama.cpp peer: {reason}")
        return 2
    log(reason)

    ckpt = Path(args.checkpoint)
    if not ckpt.is_absolute():
        ckpt = REPO / ckpt
    if not (ckpt / "config.json").is_file() and ckpt.name.endswith("-llama2"):
        preset = ckpt.name[: -len("-llama2")]
        log(f"{ckpt} missing: generating preset {preset}")
        _run([_python(), "python/make_checkpoint.py", "--preset", preset, "--out", ckpt,
              "--tokenizer", "models/llama2-tokenizer"], cwd=REPO, stdout=sys.stderr)

    ensure_built(args.tools_dir)
    rows = []
    for outtype in outtypes:
        gguf = convert(ckpt, outtype, args.tools_dir)
        for threads in thread_counts:
            r = run_bench(gguf, threads, args.prompt_tokens, args.gen_tokens, args.repetitions,
                          args.tools_dir)
            r["outtype"] = outtype
            rows.append(r)
            log(f"{outtype} t={threads}: prefill {_fmt(r['prefill_tps'], r['prefill_tps_stddev'])}"
                f" tok/s, decode {_fmt(r['decode_tps'], r['decode_tps_stddev'])} tok/s")

    print(f"| engine | weights | threads | prefill {args.prompt_tokens} (tok/s) "
          f"| decode {args.gen_tokens} (tok/s) |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| llama.cpp | {r['outtype']} | {r['threads']} "
              f"| {_fmt(r['prefill_tps'], r['prefill_tps_stddev'])} "
              f"| {_fmt(r['decode_tps'], r['decode_tps_stddev'])} |")
    commit = rows[0].get("build_commit", "?") if rows else "?"
    print(f"\nllama.cpp {commit} from llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}, CPU backend; "
          f"mean ± stddev of {args.repetitions} llama-bench repetitions; {ckpt.name}.")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
