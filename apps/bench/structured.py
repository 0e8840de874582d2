"""Constrained decoding speed and losslessness on real packages, side by side in one run.

    .venv/bin/python -m apps.bench.structured                     # SmolLM2 (49k vocabulary) and Gemma-3 (262k)
    .venv/bin/python -m apps.bench.structured --rounds 5 --packages packages/smollm2-135m-int4

Per package: the time to build llguidance's tokenizer (once per model) and to compile a schema;
decode tokens/s with a JSON schema against unconstrained decoding of the same number of tokens
(pairs interleaved, order alternating, medians of the per-pair ratios); the share of the time spent
computing masks; and whether lookup (and speculative, with --little) under the schema give exactly
constrained plain greedy's tokens. Greedy, 2 threads unless --threads.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

import edgeinfer
from edgeinfer.bench import peak_rss_mb
from edgeinfer.constraints import compile_constraint

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = [ROOT / "packages" / "smollm2-135m-int4", ROOT / "packages" / "gemma3-270m-int4"]
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "year": {"type": "integer", "minimum": 1800, "maximum": 2100},
        "genre": {"enum": ["drama", "comedy", "science fiction", "documentary", "thriller"]},
        "characters": {"type": "array", "items": {"type": "string", "maxLength": 30}, "minItems": 3, "maxItems": 3},
        "plot": {"type": "string", "maxLength": 200},
    },
    "required": ["title", "year", "genre", "characters", "plot"],
    "additionalProperties": False,
}
PROMPTS = [
    "Invent a film about a lighthouse keeper and describe it as JSON.",
    "Describe a made-up science fiction movie set on Mars as JSON.",
    "Give me a JSON record for an imaginary comedy about two chefs.",
    "Make up a documentary about honey bees and describe it in JSON.",
]


def messages(model, text):
    return [{"role": "user", "content": text}] if model.tokenizer.chat_template else text


def divergence_gap(model, msgs, plain: list[int], other: list[int]) -> float:
    """Masked logit gap between the two tokens where OTHER first leaves PLAIN, from one full forward:
    a near-tie means batched verification's numerics (int4 kernels on several rows), not the mask."""
    i = next(i for i, (a, b) in enumerate(zip(plain + [-1], other + [-2])) if a != b)
    ids = model.encode(msgs)
    model.reset()
    logits = model.decoder.forward(ids + plain[:i], logits_to_keep=1)[-1]
    c = compile_constraint(model.tokenizer, model.decoder.vocab_size, json_schema=SCHEMA)
    allowed = c.start(len(ids)).allowed(ids + plain[:i])
    x = np.where(allowed, logits, -np.inf)
    a, b = plain[i] if i < len(plain) else int(np.argmax(x)), other[i] if i < len(other) else int(np.argmax(x))
    model.reset()
    return abs(float(x[a] - x[b]))


def measure(path: Path, rounds: int, threads: int, little: str | None) -> dict:
    model = edgeinfer.load(path, threads=threads, little=little)
    t0 = time.perf_counter()
    compile_constraint(model.tokenizer, model.decoder.vocab_size, json_schema=SCHEMA)
    first_s = time.perf_counter() - t0  # includes llguidance's tokenizer (once per model)
    compiles = []
    for _ in range(5):
        t0 = time.perf_counter()
        compile_constraint(model.tokenizer, model.decoder.vocab_size, json_schema=SCHEMA)
        compiles.append(time.perf_counter() - t0)
    msgs = messages(model, PROMPTS[0])
    model.complete(msgs, max_new_tokens=8)  # warm-up
    ratios, free_tps, schema_tps, mask_share, new_tokens = [], [], [], [], []
    for r in range(rounds):
        for i, text in enumerate(PROMPTS):
            msgs = messages(model, text)

            def constrained(msgs=msgs):
                model.reset()
                return model.complete(msgs, max_new_tokens=300, json_schema=SCHEMA)

            def free(n, msgs=msgs):
                model.reset()
                return model.complete(msgs, max_new_tokens=n, ignore_eos=True)

            if (r + i) % 2 == 0:
                c = constrained()
                f = free(c.new_tokens)
            else:  # the unconstrained run first: it needs the constrained length, so run one to learn it
                n = constrained().new_tokens
                f = free(n)
                c = constrained()
            if c.new_tokens < 8 or f.decode_tok_s <= 0:
                continue
            ratios.append(c.decode_tok_s / f.decode_tok_s)
            free_tps.append(f.decode_tok_s)
            schema_tps.append(c.decode_tok_s)
            st = c.stats["constraint"]
            mask_share.append(st["mask_s"] / max(1e-9, c.total_s))
            new_tokens.append(c.new_tokens)
    lossless = {}
    strategies = ["lookup"] + (["speculative"] if little else [])
    for strategy in strategies:
        same, gaps = [], []
        for text in PROMPTS:
            msgs = messages(model, text)
            model.reset()
            plain = model.complete(msgs, max_new_tokens=300, json_schema=SCHEMA)
            model.reset()
            fast = model.complete(msgs, max_new_tokens=300, json_schema=SCHEMA, strategy=strategy)
            same.append(fast.tokens == plain.tokens)
            if not same[-1]:
                gaps.append(divergence_gap(model, msgs, plain.tokens, fast.tokens))
        lossless[strategy] = f"{sum(same)}/{len(same)} identical" + (
            " (diverged at masked top-2 gaps " + ", ".join(f"{g:.3f}" for g in gaps) + ")" if gaps else "")
    return {"package": path.name, "vocabulary": model.decoder.vocab_size,
            "precision": model.package.manifest.get("quantization", {}).get("weights", "?"),
            "first_compile_s": first_s, "compile_ms": statistics.median(compiles) * 1e3,
            "free_tok_s": statistics.median(free_tps), "schema_tok_s": statistics.median(schema_tps),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "pairs": len(ratios),
            "mask_share": statistics.median(mask_share), "new_tokens": statistics.median(new_tokens),
            "lossless": lossless, "peak_rss_mb": peak_rss_mb(), "provider": model.target.name}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packages", nargs="+", default=[str(p) for p in DEFAULT])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--little", default=None, help="a little package for the speculative check")
    ap.add_argument("--little-on", type=int, default=-1, help="index in --packages of the big model for --little "
                    "(default: the last)")
    args = ap.parse_args()
    rows = []
    big = args.little_on % len(args.packages)
    for i, p in enumerate(args.packages):
        rows.append(measure(Path(p), args.rounds, args.threads, args.little if i == big else None))
    print(f"greedy, {args.threads} threads, {len(PROMPTS)} chat prompts x {args.rounds} rounds; schema: 5 "
          "properties (bounded strings, integer range, enum, array of 3)")
    print(f"{'package':<22} {'vocab':>7} {'setup+compile':>14} {'compile':>8} {'free tok/s':>11} "
          f"{'schema tok/s':>13} {'ratio (min)':>12} {'mask time':>10} {'tokens':>7}  lossless under the schema")
    for r in rows:
        print(f"{r['package']:<22} {r['vocabulary']:>7} {r['first_compile_s'] * 1e3:>11.0f} ms "
              f"{r['compile_ms']:>5.1f} ms {r['free_tok_s']:>11.1f} {r['schema_tok_s']:>13.1f} "
              f"{r['ratio']:>6.3f} ({r['ratio_min']:.2f}) {r['mask_share'] * 100:>8.2f} % {r['new_tokens']:>7.0f}  "
              + ", ".join(f"{k}: {v}" for k, v in r["lossless"].items()))
    print(f"peak RSS {rows[-1]['peak_rss_mb']:.0f} MB, provider {rows[-1]['provider']}")


if __name__ == "__main__":
    main()
