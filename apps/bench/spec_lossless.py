"""Is speculative decoding on a real pair exactly the big model's greedy output? Token by token, per prompt.

    .venv/bin/python apps/bench/spec_lossless.py --big build/pkgs/q15-acc0 --little build/bench/qwen2.5-coder-0.5b-int4

Run it on a big package exported with ``--accuracy-level 0`` (float activations: a pass over several rows and
a one-row step compute the same logits up to float rounding) to separate the strategy from the int8-activation
kernels of the default packages, whose one-row and multi-row paths round differently (docs/big-little.md).
For every output that differs: the first differing position and the big model's own top-2 logit margin there
(one-row step). Writes build/bench/spec_lossless-LABEL.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def main(argv=None) -> int:
    import edgeinfer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big", required=True)
    ap.add_argument("--little", required=True)
    ap.add_argument("--label", default="acc0")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=24)
    args = ap.parse_args(argv)
    prompts = json.loads((ROOT / "apps" / "bench" / "prompts" / "qwen_pair.json").read_text())[: args.prompts]
    big = edgeinfer.load(args.big, threads=args.threads, little=args.little)
    rows = []
    for text in prompts:
        ids = big.encode([{"role": "user", "content": text}])
        plain = big.complete(ids, max_new_tokens=args.new_tokens, ignore_eos=True).tokens
        spec = big.complete(ids, max_new_tokens=args.new_tokens, ignore_eos=True, strategy="speculative")
        row = {"prompt": text, "identical": spec.tokens == plain, "acceptance": spec.stats["acceptance_rate"]}
        if spec.tokens != plain:
            j = next(i for i, (a, b) in enumerate(zip(spec.tokens, plain)) if a != b)
            seq = ids + plain[:j]
            big.reset()
            big.decoder.forward(seq[:-1], logits_to_keep=1)
            top2 = np.sort(big.decoder.step(seq[-1]))[-2:]
            big.reset()
            row.update(first_difference=j, margin=float(top2[1] - top2[0]))
        rows.append(row)
        print(f"{'same' if row['identical'] else 'DIFFERS'} {text[:50]!r}" +
              ("" if row["identical"] else f" at {row['first_difference']}, margin {row['margin']:.3f}"), flush=True)
    same = sum(r["identical"] for r in rows)
    out = ROOT / "build" / "bench" / f"spec_lossless-{args.label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"big": args.big, "little": args.little, "new_tokens": args.new_tokens,
                               "identical": same, "prompts": len(rows), "rows": rows}, indent=1))
    print(f"identical on {same} of {len(rows)} prompts", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
