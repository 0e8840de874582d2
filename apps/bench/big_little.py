"""Big/little decoding on real weights, side by side in one process.

    .venv/bin/python apps/bench/big_little.py            # 24 prompts, every strategy and threshold
    .venv/bin/python apps/bench/big_little.py --quick    # 3 prompts, fewer thresholds (a minute or two)

The pairs MODELS.md allows on a machine without a model hub: big = SmolLM2-135M
fp32; little = the same model at int8 or int4, or the big package's own first
24 layers + head (an early exit). For every prompt (apps/bench/prompts/big_little.json)
the big model decodes alone, then every strategy, then the big model alone
again: each speed figure is a ratio to the mean of the two plain runs that
bracket it, on the same prompt.

Per strategy and threshold: the share of tokens the big model wrote, wall-clock
tokens/s against the big model alone, the weights read against the big model
alone, agreement with the big model's greedy output (token by token, aligned),
and quality kept = PPL_big(big's own greedy text) / PPL_big(the strategy's text),
where PPL_big is the big model's perplexity of the generated tokens.
Writes build/bench/big_little.json, docs/big-little.md and docs/big-little.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

import edgeinfer

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "bench"
DOCS = ROOT / "docs"
EDGEINFER = str(ROOT / ".venv" / "bin" / "edgeinfer")


def ensure(name: str, *args: str) -> Path:
    pkg = BUILD / name
    if not (pkg / "edgeinfer.json").exists():
        subprocess.run([EDGEINFER, "export", "smollm2-135m", "-o", str(pkg), *args, "--force"], check=True)
    return pkg


def configs(quick: bool) -> list[tuple[str, str, str, dict]]:
    """(label, big, little, strategy options): big 'fp32' or 'exits' (fp32 with exits at 15 and 24),
    little 'int8', 'int4' (packages) or 'exit' (the big package's own exit)."""
    taus = [1.0, 3.0] if quick else [0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0]
    out = [(f"speculative {lit}", "fp32", lit, dict(strategy="speculative")) for lit in ("int8", "int4")]
    out += [("speculative exit24", "exits", "exit", dict(strategy="speculative", exit_layer=24))]
    out += [(f"ead int4 tau={t}", "fp32", "int4", dict(strategy="ead", tau=t)) for t in taus]
    out += [(f"ead int8 tau={t}", "fp32", "int8", dict(strategy="ead", tau=t)) for t in taus[1::2]]
    out += [(f"ead exit24 tau={t}", "exits", "exit", dict(strategy="ead", tau=t, exit_layer=24)) for t in taus]
    bild = [(0.6, 5.0)] if quick else [(0.3, 5.0), (0.6, 5.0), (0.8, 5.0), (0.6, 2.0), (0.6, 8.0)]
    out += [(f"bild int4 fb={f} rb={r}", "fp32", "int4", dict(strategy="bild", fallback_threshold=f,
                                                              rollback_threshold=r)) for f, r in bild]
    out += [("bild int8 fb=0.6 rb=5.0", "fp32", "int8", dict(strategy="bild"))]
    out += [("bild exit24 fb=0.6 rb=5.0", "exits", "exit", dict(strategy="bild", exit_layer=24))]
    return out


def nll(scorer, ids: list[int], out: list[int]) -> float:
    """Sum of -log p_big(out[i] | ids + out[:i])."""
    scorer.reset()
    logits = scorer.decoder.forward(ids + out[:-1], logits_to_keep=len(out)).astype(np.float64)
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(out)), out].sum())


def timed(model, ids, n, **opts):
    t = time.perf_counter()
    res = model.complete(ids, max_new_tokens=n, ignore_eos=True, **opts)
    return res, time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=DOCS, help="folder for big-little.md and big-little.png")
    args = ap.parse_args()
    BUILD.mkdir(parents=True, exist_ok=True)
    prompts = json.loads((ROOT / "apps" / "bench" / "prompts" / "big_little.json").read_text())
    if args.quick:
        prompts = prompts[:3]
    paths = {"fp32": ensure("smollm2-135m-fp32", "--precision", "fp32"),
             "exits": ensure("smollm2-135m-fp32-exits", "--precision", "fp32", "--exits", "15,24"),
             "int8": ensure("smollm2-135m-int8", "--precision", "int8"),
             "int4": ensure("smollm2-135m-int4", "--precision", "int4")}
    littles = {k: edgeinfer.load(paths[k], threads=args.threads) for k in ("int8", "int4")}
    bigs = {"fp32": edgeinfer.load(paths["fp32"], threads=args.threads),
            "exits": edgeinfer.load(paths["exits"], threads=args.threads)}
    scorer = bigs["fp32"]
    cfgs = configs(args.quick)
    rows = {label: {"tokens": 0, "seconds": 0.0, "plain_tokens": 0, "plain_seconds": 0.0, "big": 0, "agree": 0,
                    "nll": 0.0, "ref_nll": 0.0, "exact": 0, "compute": []} for label, *_ in cfgs}
    plain_rate = []
    for i, text in enumerate(prompts):
        ids = scorer.encode([{"role": "user", "content": text}])
        ref, ref_s = timed(scorer, ids, args.new_tokens)
        ref_nll = nll(scorer, ids, ref.tokens)
        results = []
        for label, big, lit, opts in cfgs:
            if lit in littles:
                bigs[big].attach_little(littles[lit])
            results.append((label, *timed(bigs[big], ids, args.new_tokens, **opts)))
        _, end_s = timed(scorer, ids, args.new_tokens)  # plain again: the round is bracketed by the baseline
        plain_s = (ref_s + end_s) / 2
        plain_rate.append(ref.new_tokens / plain_s)
        for label, res, s in results:
            r = rows[label]
            r["tokens"] += res.new_tokens
            r["seconds"] += s
            r["plain_tokens"] += ref.new_tokens
            r["plain_seconds"] += plain_s
            r["big"] += res.stats["tokens"]["big"]
            r["agree"] += sum(a == b for a, b in zip(res.tokens, ref.tokens))
            r["exact"] += res.tokens == ref.tokens
            r["nll"] += nll(scorer, ids, res.tokens)
            r["ref_nll"] += ref_nll
            r["compute"].append(res.stats["compute_vs_big_alone"])
        print(f"[{i + 1}/{len(prompts)}] {text[:50]!r}: plain {plain_rate[-1]:.1f} tok/s "
              f"(start {ref.new_tokens / ref_s:.1f}, end {ref.new_tokens / end_s:.1f})", flush=True)
    table = []
    for label, big, lit, opts in cfgs:
        r = rows[label]
        table.append({
            "strategy": label, "big": big, "little": lit, "options": opts,
            "big_share": r["big"] / r["tokens"],
            "speed_vs_big": (r["tokens"] / r["seconds"]) / (r["plain_tokens"] / r["plain_seconds"]),
            "weights_read_vs_big": float(np.mean(r["compute"])),
            "agreement": r["agree"] / r["tokens"],
            "identical_outputs": r["exact"] / len(prompts),
            "quality_kept": math.exp((r["ref_nll"] - r["nll"]) / r["tokens"]),
            "ppl": math.exp(r["nll"] / r["tokens"]), "ppl_big": math.exp(r["ref_nll"] / r["tokens"]),
        })
    report = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "cpus": len(__import__("os").sched_getaffinity(0)), "prompts": len(prompts),
              "new_tokens": args.new_tokens, "packages": {k: str(v.relative_to(ROOT)) for k, v in paths.items()},
              "big_plain_tok_s_median": float(np.median(plain_rate)), "results": table,
              "command": "apps/bench/big_little.py" + (" --quick" if args.quick else "")}
    (BUILD / "big_little.json").write_text(json.dumps(report, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    write_markdown(report, args.out)
    plot(report, args.out)
    for row in table:
        print(f"{row['strategy']:28s} big {row['big_share']:.2f} speed {row['speed_vs_big']:.2f}x "
              f"quality {row['quality_kept']:.3f} agree {row['agreement']:.2f}")
    return 0


def write_markdown(report: dict, out: Path) -> None:
    lines = [
        "# Big/little decoding on real weights",
        "",
        f"Measured {report['date']} on this machine ({report['cpus']} CPU threads, shared), "
        f"`{report['command']}`: {report['prompts']} chat prompts (apps/bench/prompts/big_little.json), "
        f"{report['new_tokens']} new tokens each, greedy. Big = SmolLM2-135M fp32 "
        f"({report['big_plain_tok_s_median']:.1f} tok/s alone, median); little = the same model int4 "
        "or int8 (`int4`, `int8`) or the big package's own first 24 layers + head (`exit24`, from a "
        "package exported with `--exits 15,24`). On each prompt the big model ran alone, then every "
        "strategy, then alone again: speed is the ratio to the mean of those two plain runs "
        "(noise on this shared machine: ±10–30%).",
        "",
        "*big share*: tokens written by the big model. *weights read*: bytes of weights the forwards read, "
        "over the big model decoding alone. *agreement*: tokens equal to the big model's greedy output at "
        "the same position. *quality kept*: PPL_big(big greedy text) / PPL_big(this text), PPL_big the big "
        "model's perplexity of the generated tokens.",
        "",
        "| strategy | big share | speed vs big | weights read vs big | agreement | identical outputs | "
        "quality kept |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(f"| {r['strategy']} | {r['big_share']:.2f} | {r['speed_vs_big']:.2f}× | "
                     f"{r['weights_read_vs_big']:.2f} | {r['agreement']:.2f} | {r['identical_outputs']:.2f} | "
                     f"{r['quality_kept']:.3f} |")
    lines += ["", "![quality kept vs big-model share](big-little.png)", ""]
    (out / "big-little.md").write_text("\n".join(lines))


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for prefix, marker in (("ead int4", "o-"), ("ead int8", "d-"), ("ead exit24", "s-")):
        pts = sorted((r["big_share"], r["quality_kept"]) for r in report["results"]
                     if r["strategy"].startswith(prefix))
        if pts:
            ax.plot(*zip(*pts), marker, label=f"EAD, little = {prefix.split()[1]} (τ sweep)")
    for r in report["results"]:
        if r["strategy"].startswith(("bild", "speculative")):
            ax.plot(r["big_share"], r["quality_kept"], "^" if r["strategy"].startswith("bild") else "*",
                    markersize=9)
            ax.annotate(r["strategy"], (r["big_share"], r["quality_kept"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.95, color="grey", lw=0.8, ls="--")
    ax.axvline(0.40, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("share of tokens written by the big model")
    ax.set_ylabel("quality kept (PPL_big ratio)")
    ax.set_title("SmolLM2-135M: big fp32, little int8 / int4 / exit 24")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "big-little.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
