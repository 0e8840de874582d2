"""Benchmark peer: onnxruntime-genai 0.18 on a model folder made by its builder, greedy.

Run with the peer venv (apps/bench/peers/install_peers.sh), never edgeinfer's:

    .venv-peers/genai/bin/python apps/bench/peers/run_genai.py \
        --model build/smollm2-genai-int4 \
        --prompt "What is the capital of France?" --chat --new-tokens 128 --threads 2 --repeats 3

Greedy search (do_sample false) with min_length = max_length = prompt + N, so
exactly N new tokens come out whatever EOS says. The thread count goes to the
decoder's ONNX Runtime session (session_options.intra_op_num_threads) through
og.Config.overlay, the genai_config.json on disk stays as built. Per repeat:
ttft_s (append_tokens + the first generate_next_token), decode_tok_s (tokens
2..N over the time after the first), total_s; creating the Generator (its KV
buffers) is timed apart as setup_s. One JSON line goes to stdout at the end.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
from runner_cli import parse_args, read_ids


def load_model(path: str, threads: int) -> og.Model:
    """og.Model on the CPU with `threads` intra-op threads for the decoder session."""
    config = og.Config(path)
    config.clear_providers()  # CPU execution provider
    session = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
    return og.Model(config)


def prompt_ids(model: og.Model, args: argparse.Namespace) -> np.ndarray:
    """Prompt token ids (int32), tokenized by genai's own tokenizer."""
    if args.prompt_ids_file:
        return np.asarray(read_ids(args.prompt_ids_file), dtype=np.int32)
    tokenizer = og.Tokenizer(model)
    text = args.prompt
    if args.chat:
        messages = json.dumps([{"role": "user", "content": args.prompt}])
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return np.asarray(tokenizer.encode(text), dtype=np.int32)


def generate(model: og.Model, ids: np.ndarray, n_new: int, min_capacity: int = 0) -> tuple[dict, list[int]]:
    """One timed greedy generation of exactly n_new tokens with a fresh Generator. The KV cache is
    sized to the prompt + n_new, or MIN_CAPACITY if larger (Gemma-3's sliding-window layers refuse a
    cache smaller than their window)."""
    total = len(ids) + n_new
    t_setup = time.perf_counter()
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, num_beams=1, max_length=max(total, min_capacity), min_length=total)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    gen.generate_next_token()
    out = [int(gen.get_next_tokens()[0])]
    t1 = time.perf_counter()
    for _ in range(n_new - 1):
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    t2 = time.perf_counter()
    if len(out) != n_new or (total >= min_capacity and not gen.is_done()):
        raise RuntimeError(f"expected {n_new} tokens ending at max_length, got {len(out)}")
    decode = (n_new - 1) / (t2 - t1) if n_new > 1 else 0.0
    run = {"ttft_s": t1 - t0, "decode_tok_s": decode, "total_s": t2 - t0, "setup_s": t0 - t_setup}
    return run, out


def main(argv=None) -> int:
    args = parse_args(__doc__.splitlines()[0], "folder with genai_config.json", argv)
    t_load = time.perf_counter()
    model = load_model(args.model, args.threads)
    load_s = time.perf_counter() - t_load
    ids = prompt_ids(model, args)
    config = json.loads((Path(args.model) / "genai_config.json").read_text())
    window = int(config["model"]["decoder"].get("sliding_window", {}).get("window_size", 0))
    for _ in range(args.warmup):
        generate(model, ids, args.new_tokens, window)
    runs, tokens = [], None
    for _ in range(args.repeats):
        run, out = generate(model, ids, args.new_tokens, window)
        runs.append(run)
        tokens = tokens if tokens is not None else out
    text = og.Tokenizer(model).decode(np.asarray(tokens, dtype=np.int32))
    print(f"[onnxruntime-genai] {text!r}", file=sys.stderr)
    print(json.dumps({
        "engine": "onnxruntime-genai",
        "version": og.__version__,
        "model": str(args.model),
        "threads": args.threads,
        "prompt_tokens": int(len(ids)),
        "new_tokens": args.new_tokens,
        "runs": runs,
        "tokens": tokens,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_s": load_s,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
