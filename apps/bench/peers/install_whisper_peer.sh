#!/usr/bin/env bash
# Install faster-whisper (CTranslate2) in its own venv, .venv-peers/whisper, as the
# peer of apps/bench/whisper.py. It reads the same CTranslate2 folder that the
# whisper-tiny.en alias exports from. Idempotent; --force rebuilds.
set -euo pipefail
cd "$(dirname "$0")/../../.."
VENV=.venv-peers/whisper
PYTHON="${PYTHON:-python3}"
[ "${1:-}" = "--force" ] && rm -rf "$VENV"
if [ -f "$VENV/.installed" ]; then
  echo "$VENV is installed"; exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q "faster-whisper==1.2.*" "ctranslate2==4.*"
touch "$VENV/.installed"
echo "installed faster-whisper in $VENV"
