"""Benchmark runner for edgeinfer with the peers' CLI (see peers/README.md):
greedy, exactly N new tokens, one JSON line on stdout.

    .venv/bin/python apps/bench/run_edgeinfer.py --model packages/smollm2-135m-int4 \
        --prompt "What is the capital of France?" --chat --new-tokens 128 --threads 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import edgeinfer
from edgeinfer.bench import peak_rss_mb


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="edgeinfer package folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-ids-file", type=Path)
    src.add_argument("--prompt")
    p.add_argument("--chat", action="store_true")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--strategy", default="plain")
    args = p.parse_args(argv)

    model = edgeinfer.load(args.model, threads=args.threads)
    if args.prompt_ids_file:
        ids = [int(t) for t in json.loads(args.prompt_ids_file.read_text())]
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
                      "runs": runs, "tokens": tokens, "peak_rss_mb": peak_rss_mb()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
