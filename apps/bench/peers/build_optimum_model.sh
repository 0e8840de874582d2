#!/usr/bin/env bash
# Export an HF folder to ONNX with optimum (the optimum peer's model), in optimum's own venv
# (.venv-optimum, made by `make setup`: optimum-onnx pins transformers < 4.58).
#   apps/bench/peers/build_optimum_model.sh build/bench/smollm2-hf build/bench/smollm2-optimum
set -euo pipefail
cd "$(dirname "$0")/../../.."
src="$1"; out="$2"
py=.venv-optimum/bin/python
test -x "$py" || { echo "no .venv-optimum: run 'make setup' first" >&2; exit 1; }
tmp="$out.partial"
rm -rf "$tmp"
# transformers 4.57 cannot read a tokenizer saved by 5.x (TokenizersBackend): give it a plain fast tokenizer.
HF_HUB_OFFLINE=1 "$py" - "$src" "$tmp" <<'PY'
import shutil, sys
from pathlib import Path
from optimum.exporters.onnx import main_export
from transformers import PreTrainedTokenizerFast
src, tmp = Path(sys.argv[1]), Path(sys.argv[2])
work = tmp.with_name(tmp.name + "-src")
shutil.rmtree(work, ignore_errors=True)
shutil.copytree(src, work)
tok = PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"))
(work / "tokenizer_config.json").unlink(missing_ok=True)
tok.save_pretrained(work)
main_export(str(work), output=str(tmp), task="text-generation-with-past", device="cpu", do_validation=False)
shutil.rmtree(work)
PY
rm -rf "$out"
mv "$tmp" "$out"
echo "wrote $out"
