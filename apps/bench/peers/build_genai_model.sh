#!/usr/bin/env bash
# Build an onnxruntime-genai int4 CPU model from a Hugging Face folder with
# the genai builder from .venv-peers/genai (see install_peers.sh).
#
# Usage: apps/bench/peers/build_genai_model.sh HF_DIR OUT [EXTRA_BUILDER_ARGS...]
#   e.g. apps/bench/peers/build_genai_model.sh build/smollm2-hf build/smollm2-genai-int4
# Builder defaults for int4 on cpu: RTN, block 32, accuracy_level 4, symmetric,
# embedding shared with the LM head when the model ties them. Extra arguments go
# to the builder as is (e.g. --extra_options block_size=64, or -p int8 for its int8 build).
# HF_DIR comes from prepare_hf.py (e.g. prepare_hf.py smollm2-135m build/bench/smollm2-hf).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../../.." && pwd)"
GENAI_PY="${GENAI_PY:-$ROOT/.venv-peers/genai/bin/python}"

# build_genai_int4 HF_DIR OUT [ARGS...]: run the builder, cache in a temp dir.
build_genai_int4() {
  local hf_dir="$1" out="$2"; shift 2
  [ -f "$hf_dir/config.json" ] || { echo "no config.json in $hf_dir" >&2; return 1; }
  [ -x "$GENAI_PY" ] || { echo "missing $GENAI_PY: run install_peers.sh genai" >&2; return 1; }
  local cache; cache="$(mktemp -d)"
  trap 'rm -rf "$cache"' RETURN
  mkdir -p "$out"
  # genai_builder.py runs the builder after adapting Gemma-3's transformers-5 config (see its docstring)
  HF_HUB_OFFLINE=1 "$GENAI_PY" "$ROOT/apps/bench/peers/genai_builder.py" \
    -i "$hf_dir" -o "$out" -p int4 -e cpu -c "$cache" "$@"
  ls -l "$out"
}

if [ $# -lt 2 ]; then
  sed -n '5p' "$0" | sed 's/^# //' >&2
  exit 2
fi
build_genai_int4 "$@"
