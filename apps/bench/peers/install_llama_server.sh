#!/usr/bin/env bash
# Build llama.cpp's own HTTP server (llama-server: parallel slots, continuous batching) from the
# same llama.cpp that llama-cpp-python 0.3.36 vendors (the version install_peers.sh compiles), into
#   .venv-peers/llamacpp-server/bin/llama-server
# for apps/bench/batching.py. CPU build, GGML_NATIVE on; ~10 min on 2 cores. Idempotent.
#
# Usage: apps/bench/peers/install_llama_server.sh [--force]
set -euo pipefail

cd "$(dirname "$0")/../../.."
ROOT="$(pwd)"
OUT="$ROOT/.venv-peers/llamacpp-server"
VERSION="${LLAMACPP_VERSION:-0.3.36}"
PYTHON="${PYTHON:-python3}"

if [ "${1:-}" != "--force" ] && [ -x "$OUT/bin/llama-server" ]; then
  echo "llama-server: already built ($OUT/bin/llama-server)"; exit 0
fi
work="$OUT/src"
mkdir -p "$work" "$OUT/bin"
if [ ! -d "$work/llama_cpp_python-$VERSION" ]; then
  "$PYTHON" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$work"
  tar xzf "$work/llama_cpp_python-$VERSION.tar.gz" -C "$work"
fi
src="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null
cmake --build "$src/build" --target llama-server -j "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
cp "$src/build/bin/llama-server" "$OUT/bin/"
# its shared libraries, if the build made them shared
find "$src/build/bin" -name '*.so*' -exec cp -P {} "$OUT/bin/" \; 2>/dev/null || true
"$OUT/bin/llama-server" --version 2>&1 | head -2
