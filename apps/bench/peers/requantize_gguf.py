"""Requantize a GGUF file with llama.cpp's own quantizer (the int8 llama.cpp peer).

Run with the llama.cpp peer venv:

    .venv-peers/llamacpp/bin/python apps/bench/peers/requantize_gguf.py IN.gguf OUT.gguf --type Q8_0

MODELS.md's SmolLM2 ships only as Q4_1, so its Q8_0 peer is requantized from
Q4_1: the weights carry Q4_1's rounding, but the file has Q8_0's layout and
size, which is what decode speed depends on. The output is written to a
temporary name and renamed, so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import os
import sys

import llama_cpp

TYPES = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--type", default="Q8_0", choices=sorted(TYPES))
    args = ap.parse_args()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = TYPES[args.type]
    params.allow_requantize = True
    params.nthread = len(os.sched_getaffinity(0))
    tmp = args.dst + ".partial"
    rc = llama_cpp.llama_model_quantize(args.src.encode(), tmp.encode(), params)
    if rc != 0:
        if os.path.exists(tmp):
            os.remove(tmp)
        print(f"llama.cpp could not requantize {args.src} to {args.type} (code {rc}).", file=sys.stderr)
        return 1
    os.replace(tmp, args.dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
