"""The command line every benchmark runner shares (edgeinfer's and the peers'),
so that the comparison drives them all the same way. Plain Python: each runner
imports it from its own folder, under its own virtual environment."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse_args(description: str, model_help: str, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True, help=model_help)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-ids-file", type=Path, help="prompt token ids: JSON list or whitespace separated")
    src.add_argument("--prompt", help="prompt text, tokenized by the engine")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to --prompt")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    return p.parse_args(argv)


def read_ids(path: Path) -> list[int]:
    """Token ids from a file holding a JSON list or plain integers."""
    text = path.read_text().strip()
    if text.startswith("["):
        return [int(t) for t in json.loads(text)]
    return [int(t) for t in text.replace(",", " ").split()]


def amx_cpu() -> bool:
    """Whether this CPU has AMX tiles: there llama.cpp 0.3.36's AMX/repacked weight buffers crash (SIGSEGV in
    ggml_backend_amx_mul_mat, SIGILL in llama-server), so the peers run on its plain CPU buffers; elsewhere
    llama.cpp keeps its repacked weights, its fastest CPU kernels (e.g. 1.33x on Qwen2.5-Coder-1.5B Q4_K_M
    on an AVX-512 EPYC)."""
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def llama_server_weight_args() -> list[str]:
    """llama-server's weight-buffer flags for this CPU: ``--no-repack`` only where repacking crashes."""
    return ["--no-repack"] if amx_cpu() else []
