"""Benchmark runner for edgeinfer with the peers' CLI (see peers/README.md):
greedy, exactly N new tokens, one JSON line on stdout.

    .venv/bin/python apps/bench/run_edgeinfer.py --model packages/smollm2-135m-int4 \
        --prompt "What is the capital of France?" --chat --new-tokens 128 --threads 2 --repeats 3
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import edgeinfer
from edgeinfer.bench import peak_rss_mb

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from runner_cli import parse_args, read_ids  # noqa: E402


def main(argv=None) -> int:
    args = parse_args(__doc__.splitlines()[0], "edgeinfer package folder", argv)

    t_load = time.perf_counter()
    model = edgeinfer.load(args.model, threads=args.threads)
    load_s = time.perf_counter() - t_load
    if args.prompt_ids_file:
        ids = read_ids(args.prompt_ids_file)
    else:
        ids = model.encode([{"role": "user", "content": args.prompt}] if args.chat else args.prompt)
    runs, tokens = [], None
    for i in range(args.warmup + args.repeats):
        model.reset()
        res = model.complete(ids, max_new_tokens=args.new_tokens, ignore_eos=True)
        if i >= args.warmup:
            runs.append({"ttft_s": res.ttft_s, "decode_tok_s": res.decode_tok_s, "total_s": res.total_s})
            tokens = tokens or res.tokens
    print(f"[edgeinfer] {model.tokenizer.decode(tokens)!r}", file=sys.stderr)
    print(json.dumps({"engine": "edgeinfer", "version": edgeinfer.__version__, "model": args.model,
                      "threads": args.threads, "prompt_tokens": len(ids), "new_tokens": args.new_tokens,
                      "runs": runs, "tokens": tokens, "peak_rss_mb": peak_rss_mb(), "load_s": load_s}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
