#!/usr/bin/env bash
# Make .venv-openvino: edgeinfer's runtime on onnxruntime-openvino (OpenVINOExecutionProvider).
#
# onnxruntime-openvino ships its own `onnxruntime` module (a different version from the
# plain onnxruntime package in .venv), so the two cannot share a virtual environment.
# This venv holds only what the runtime needs (numpy, tokenizers, jinja2) plus
# onnxruntime-openvino, and edgeinfer itself installed without its dependencies.
# Packages are exported in .venv (the exporter needs torch); this venv runs them:
#   .venv-openvino/bin/edgeinfer run PACKAGE "prompt" --provider openvino
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv-openvino}"
OPENVINO_VERSION="${OPENVINO_VERSION:-1.24.1}"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "onnxruntime-openvino==$OPENVINO_VERSION" "numpy>=1.24" "tokenizers>=0.20" \
    "jinja2>=3.1" "pytest>=8"
"$VENV/bin/python" -m pip install -q --no-deps -e .
"$VENV/bin/python" -c "import onnxruntime as ort; assert 'OpenVINOExecutionProvider' in ort.get_available_providers(); \
print('ok:', ort.__version__, ort.get_available_providers())"
