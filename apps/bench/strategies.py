"""Decoding strategies on a real model, side by side in one process: plain,
lookup, self-speculative at each exit, adaptive, and the early-exit trade-off.

    .venv/bin/python apps/bench/strategies.py                       # SmolLM2-135M int4, exits 8,15,20,24,28
    .venv/bin/python apps/bench/strategies.py --quick

For each prompt set (apps/bench/prompts/*.json) and strategy: wall-clock
tokens/s against plain decoding in the same round (interleaved), acceptance,
tokens per verification, and whether the tokens equal plain greedy (lossless
strategies must; a divergence is reported with the top-2 logit gap of the
plain model at that position: a near-tie, or a bug). Also per-exit raw top-1
agreement with the final layer, and early exit's depth/agreement per
threshold. Writes build/bench/strategies.json and docs/early-exit.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import edgeinfer

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ROOT / "apps" / "bench" / "prompts"
BUILD = ROOT / "build" / "bench"


def ensure_package(alias: str, precision: str, exits: list[int], accuracy_level: int, adapters: bool = False) -> Path:
    pkg = BUILD / f"{alias}-{precision}-a{accuracy_level}-{'adapters' if adapters else 'exits'}"
    if not (pkg / "edgeinfer.json").exists():
        subprocess.run([str(ROOT / ".venv" / "bin" / "edgeinfer"), "export", alias, "-o", str(pkg), "--precision",
                        precision, "--exits", ",".join(map(str, exits)), "--accuracy-level", str(accuracy_level),
                        "--force", *(["--exit-adapters"] if adapters else [])], check=True)
    return pkg


def prompt_for(model, text: str):
    """Chat messages where the package has a chat template (instruct models), else plain text."""
    return [{"role": "user", "content": text}] if model.tokenizer.chat_template else text


def run(model, msgs, n, strategy="plain", **opts):
    model.reset()
    t = time.perf_counter()
    res = model.complete(msgs, max_new_tokens=n, ignore_eos=True, strategy=strategy, **opts)
    # Whole-generation throughput: speculative strategies emit in bursts, so time all but TTFT.
    return res, (res.new_tokens - 1) / max(1e-9, res.total_s - res.ttft_s), time.perf_counter() - t


def divergence_gap(model, msgs, plain_tokens, other_tokens) -> tuple[int, float] | None:
    i = next((i for i, (a, b) in enumerate(zip(plain_tokens, other_tokens)) if a != b), None)
    if i is None:
        return None
    model.reset()
    ids = model.encode(msgs) + plain_tokens[:i]
    logits = model.decoder.forward(ids, logits_to_keep=1)[-1]
    top2 = np.sort(logits)[-2:]
    return i, float(top2[1] - top2[0])


def exit_agreement(model, sets, n) -> dict:
    """Raw top-1 agreement of each exit with the final layer, teacher-forced on plain greedy text."""
    agree = {layer: 0 for layer in model.decoder.exits}
    total = 0
    for prompts in sets.values():
        for p in prompts:
            msgs = prompt_for(model, p)
            res, _, _ = run(model, msgs, n)
            seq = model.encode(msgs) + res.tokens[:-1]
            model.reset()
            model.decoder.forward(seq[:-n], logits_to_keep=1)
            final = model.decoder.forward(seq[-n:], logits_to_keep=n).argmax(-1)
            for layer, stages in model.decoder.exits.items():
                model.reset()
                model.decoder.forward(seq[:-n], logits_to_keep=1, stages=stages)
                ex = model.decoder.forward(seq[-n:], logits_to_keep=n, stages=stages).argmax(-1)
                agree[layer] += int((ex == final).sum())
            total += n
    return {str(k): v / total for k, v in sorted(agree.items())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alias", default="smollm2-135m")
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--exits", default="8,15,20,24,28")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--accuracy-level", type=int, default=4)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--adapters", action="store_true", help="export (and measure) with fitted exit adapters")
    ap.add_argument("--markdown", default=None,
                    help="default: docs/early-exit-a{accuracy level}.md (-adapters.md with --adapters)")
    args = ap.parse_args(argv)
    exits = [int(x) for x in args.exits.split(",")]
    pkg = ensure_package(args.alias, args.precision, exits, args.accuracy_level, args.adapters)
    model = edgeinfer.load(pkg, threads=args.threads)
    sets = {name: json.loads((PROMPTS / f"{name}.json").read_text()) for name in ("chat", "editing")}
    if args.quick:
        sets = {k: v[:2] for k, v in sets.items()}
        args.new_tokens = 32
    n = args.new_tokens
    configs = [("lookup", {"draft_len": 8}), ("adaptive", {})]
    configs += [("self-speculative", {"exit_layer": e, "draft_len": 3}) for e in exits[-2:]]
    report = {"package": str(pkg), "new_tokens": n, "threads": args.threads, "sets": {}, "adapters": args.adapters,
              "accuracy_level": args.accuracy_level, "model": model.name, "precision": args.precision,
              "num_layers": model.decoder.stages[-1].last}
    for name, prompts in sets.items():
        rows = {f"{s} {json.dumps(o, sort_keys=True)}": {"ratios": [], "stats": [], "mismatch": []}
                for s, o in configs}
        plain_tps = []
        for p in prompts:
            msgs = prompt_for(model, p)
            base, tps, _ = run(model, msgs, n)
            plain_tps.append(tps)
            for s, o in configs:
                key = f"{s} {json.dumps(o, sort_keys=True)}"
                res, tps_s, _ = run(model, msgs, n, s, **o)
                _, tps_b, _ = run(model, msgs, n)  # plain again, right after: ratio to the mean of both
                rows[key]["ratios"].append(tps_s / ((tps + tps_b) / 2))
                rows[key]["stats"].append(res.stats)
                gap = divergence_gap(model, msgs, base.tokens, res.tokens)
                if gap:
                    rows[key]["mismatch"].append({"prompt": p[:40], "position": gap[0], "top2_gap": gap[1]})
        summary = {}
        for key, r in rows.items():
            st = r["stats"]
            acc = [x.get("acceptance_rate") for x in st if x.get("acceptance_rate") is not None]
            tpv = [x.get("tokens_per_verify") for x in st if x.get("tokens_per_verify") is not None]
            summary[key] = {"speedup_median": statistics.median(r["ratios"]), "speedups": r["ratios"],
                            "acceptance_rate": statistics.mean(acc) if acc else None,
                            "tokens_per_verify": statistics.mean(tpv) if tpv else None,
                            "lossless_prompts": len(prompts) - len(r["mismatch"]), "prompts": len(prompts),
                            "mismatches": r["mismatch"]}
        report["sets"][name] = {"plain_tok_s": statistics.median(plain_tps), "strategies": summary}
        print(name, json.dumps(summary, indent=1), file=sys.stderr, flush=True)
    report["verify_cost"] = verify_cost(model)
    report["exit_agreement"] = exit_agreement(model, {k: v[:3] for k, v in sets.items()}, min(n, 32))
    report["early_exit"] = early_exit_sweep(model, sets["chat"][:4], n)
    BUILD.mkdir(parents=True, exist_ok=True)
    default = args.alias == "smollm2-135m" and args.precision == "int4"
    stem = f"strategies{'' if default else f'-{args.alias}-{args.precision}'}-a{args.accuracy_level}"
    (BUILD / f"{stem}{'-adapters' if args.adapters else ''}.json").write_text(
        json.dumps(report, indent=1))
    md = markdown(report, exits)
    suffix = "-adapters" if args.adapters else ""
    Path(args.markdown or ROOT / "docs" / f"early-exit-a{args.accuracy_level}{suffix}.md").write_text(md)
    print(md)
    return 0


def verify_cost(model, rows=(2, 3, 5, 9, 17), repeats=7) -> dict:
    """Time of one full-depth pass over N positions ÷ one single-token step (median of REPEATS, after
    a 64-token prefix): what verifying N - 1 drafted tokens costs. Lookup and self-speculation pay
    only when tokens per verification exceed it."""
    dec = model.decoder
    ids = model.encode("The quick brown fox jumps over the lazy dog. " * 16)

    def seconds(n: int) -> float:
        times = []
        for _ in range(repeats):
            dec.reset()
            dec.forward(ids[:64], logits_to_keep=1)
            t = time.perf_counter()
            dec.forward(ids[64:64 + n], logits_to_keep=n)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    one = seconds(1)
    out = {str(n): seconds(n) / one for n in rows}
    model.reset()
    return out


def early_exit_sweep(model, prompts, n) -> list[dict]:
    rows = []
    for thr in (1.0, 0.95, 0.9, 0.8, 0.6, 0.4):
        agree = total = 0
        depth = []
        ratios = []
        for p in prompts:
            msgs = prompt_for(model, p)
            base, tps, _ = run(model, msgs, n)
            res, tps_e, _ = run(model, msgs, n, "early-exit", threshold=thr)
            agree += sum(a == b for a, b in zip(base.tokens, res.tokens))
            total += len(base.tokens)
            depth.append(res.stats.get("average_depth_fraction", 1.0))
            ratios.append(tps_e / tps)
        rows.append({"threshold": thr, "agreement": agree / total, "average_depth_fraction": statistics.mean(depth),
                     "speedup": statistics.median(ratios)})
    return rows


def markdown(rep: dict, exits: list[int], out_name: str = "") -> str:
    lines = ["# Early exit and speculative decoding: measured", "",
             f"Generated by `.venv/bin/python apps/bench/strategies.py` on {time.strftime('%Y-%m-%d')}: package "
             f"`{Path(rep['package']).name}` ({rep['model']} {rep.get('precision', 'int4')}, MatMulNBits accuracy "
             f"level {rep['accuracy_level']}, exits after layers {exits} of {rep['num_layers']}), "
             f"{rep['threads']} threads, greedy, {rep['new_tokens']} new tokens per prompt (EOS ignored). "
             "Speed-up = strategy tokens/s ÷ the mean of plain runs right before and after it on the same prompt "
             "(same process, interleaved); median over prompts.", ""]
    for name, s in rep["sets"].items():
        lines += [f"## Prompt set `{name}` (plain: {s['plain_tok_s']:.0f} tok/s median)", "",
                  "| strategy | speed-up vs plain | acceptance | tokens / verification | identical to plain |",
                  "|---|---|---|---|---|"]
        for key, r in s["strategies"].items():
            acc = "–" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
            tpv = "–" if r["tokens_per_verify"] is None else f"{r['tokens_per_verify']:.2f}"
            mm = "; ".join(f"pos {m['position']} gap {m['top2_gap']:.3f}" for m in r["mismatches"])
            lines.append(f"| {key} | **{r['speedup_median']:.2f}×** | {acc} | {tpv} | "
                         f"{r['lossless_prompts']}/{r['prompts']}{' (' + mm + ')' if mm else ''} |")
        lines.append("")
    if rep.get("verify_cost"):
        lines += ["## Cost of verification", "",
                  "One full-depth pass over N positions (the fed token + N − 1 drafts) ÷ one single-token step: "
                  "a strategy gains only where its tokens per verification exceed this.", "",
                  "| positions | cost (steps) |", "|---|---|"]
        lines += [f"| {n} | {c:.2f} |" for n, c in rep["verify_cost"].items()]
        lines.append("")
    kind = "Adapted exits (fitted adapters)" if rep.get("adapters") else "Raw exits"
    lines += [f"## {kind}: top-1 agreement with the final layer (teacher-forced on plain greedy text)", "",
              "| exit after layer | agreement |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in rep["exit_agreement"].items()]
    lines += ["", "## Early exit (lossy): threshold sweep on chat prompts", "",
              "| max-prob threshold | token agreement with plain greedy | average depth | speed-up |",
              "|---|---|---|---|"]
    lines += [f"| {r['threshold']} | {r['agreement']:.2f} | {r['average_depth_fraction']:.2f} | "
              f"{r['speedup']:.2f}× |" for r in rep["early_exit"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
