#!/usr/bin/env bash
# Install the benchmark peers, each in a virtual environment of its own:
#   .venv-peers/genai     onnxruntime-genai 0.18 + its model builder (transformers 5.x, torch CPU)
#   .venv-peers/llamacpp  llama-cpp-python (compiles llama.cpp from source, ~8 min on 2 cores)
# Idempotent: a venv whose marker file exists is left alone. Delete the venv
# folder (or pass --force) to rebuild it.
#
# Usage: apps/bench/peers/install_peers.sh [--force] [genai] [llamacpp]
#   (no engine named = both). PYTHON=... picks the base interpreter (default python3).
set -euo pipefail

cd "$(dirname "$0")/../../.."
ROOT="$(pwd)"
PEERS="$ROOT/.venv-peers"
PYTHON="${PYTHON:-python3}"

# Versions of the peers we compare against. torch is ALWAYS pinned: an
# unpinned torch pulls a multi-GB CUDA build.
GENAI_PKGS=(
  "onnxruntime-genai==0.18.*"
  "onnx-ir"
  "onnx"
  "transformers>=5,<6"
  "torch==2.13.0"
  "safetensors"
  "tqdm"
)
LLAMACPP_VERSION="${LLAMACPP_VERSION:-0.3.36}"

force=0
engines=()
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    genai|llamacpp) engines+=("$arg") ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done
[ ${#engines[@]} -eq 0 ] && engines=(genai llamacpp)

# make_venv NAME: create a fresh .venv-peers/NAME with an up-to-date pip.
make_venv() {
  local dir="$PEERS/$1"
  rm -rf "$dir"
  "$PYTHON" -m venv "$dir"
  "$dir/bin/python" -m pip install --quiet --upgrade pip wheel
}

install_genai() {
  local dir="$PEERS/genai"
  if [ "$force" = 0 ] && [ -f "$dir/.installed" ]; then
    echo "genai: already installed ($dir)"; return
  fi
  echo "genai: creating $dir"
  make_venv genai
  "$dir/bin/python" -m pip install "${GENAI_PKGS[@]}"
  "$dir/bin/python" -c "import onnxruntime_genai as og, onnx_ir, transformers, torch; \
print('onnxruntime-genai', og.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
  "$dir/bin/python" -m pip freeze > "$dir/.installed"
}

install_llamacpp() {
  local dir="$PEERS/llamacpp"
  if [ "$force" = 0 ] && [ -f "$dir/.installed" ]; then
    echo "llamacpp: already installed ($dir)"; return
  fi
  echo "llamacpp: creating $dir (compiles llama.cpp: several minutes)"
  make_venv llamacpp
  # Default CPU build of llama.cpp (GGML_NATIVE on: tuned to this CPU).
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "$dir/bin/python" -m pip install --no-binary llama-cpp-python "llama-cpp-python==$LLAMACPP_VERSION" numpy
  "$dir/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
  "$dir/bin/python" -m pip freeze > "$dir/.installed"
}

mkdir -p "$PEERS"
for e in "${engines[@]}"; do "install_$e"; done
