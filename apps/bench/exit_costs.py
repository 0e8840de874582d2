"""Early exit and self-speculation at 1.5B: exit agreement per layer, the cost model's prediction, then the
measured lossless speedup, for exit heads with the full vocabulary, VocabTrim-trimmed heads and adapters.

    .venv/bin/python apps/bench/exit_costs.py --package build/bench/q15-exits --label full
    .venv/bin/python apps/bench/exit_costs.py --package build/bench/q15-exits-trim8k --label trim8k

1. Agreement (teacher-forced): along the big model's greedy continuations of apps/bench/prompts/qwen_pair.json,
   the share of positions where an exit's argmax equals the full model's token, per exit layer, and the
   acceptance per draft position it implies.
2. Costs (interleaved medians): a plain step; a draft at each exit (the stages before it, one row, plus the
   exit head); verifying k drafts (the remaining stages over the k pending rows, plus the LM head).
3. Prediction, written before any self-speculative run: a self-speculative round of k drafts at exit L costs
   k·draft(L) + rest(L, k) and yields 1 + Σ_{i<k} Π_{j≤i} α_j tokens (no bonus token: the last draft is
   not fed), against one plain step per token; the best (L, k), and the oracle ceiling.
4. Measurement: the self-speculative strategy at the predicted best (L, k) against plain decoding, interleaved
   per prompt, with the greedy tokens compared (lossless).

Writes build/bench/exit_costs-LABEL.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from edgeinfer.strategies.cost_model import CostModel, run_lengths  # noqa: E402

BUILD = ROOT / "build" / "bench"
PROMPTS = ROOT / "apps" / "bench" / "prompts" / "qwen_pair.json"


def continuations(model, prompts: list[str], new_tokens: int, trace: Path | None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, the model's greedy tokens) per prompt: from an earlier draft_costs.py trace of the same
    model if given, else generated now."""
    if trace is not None:
        rows = json.loads(trace.read_text())["trace"]
        by_prompt = {r["prompt"]: r["big"] for r in rows}
        return [(model.encode([{"role": "user", "content": p}]), by_prompt[p][:new_tokens]) for p in prompts]
    out = []
    for p in prompts:
        ids = model.encode([{"role": "user", "content": p}])
        out.append((ids, model.complete(ids, max_new_tokens=new_tokens, ignore_eos=True).tokens))
    return out


def agreement(model, conts) -> dict[int, dict]:
    """Per exit layer: top-1 agreement with the full model's tokens and acceptance per draft position."""
    dec = model.decoder
    out = {}
    for layer, stages in sorted(dec.exits.items()):
        agree_all, counts = [], np.zeros((8, 2))
        for ids, toks in conts:
            dec.reset()
            dec.set_exit_context(ids)  # a VocabTrim exit head also scores the prompt's tokens
            exit_top = dec.forward(ids + toks[:-1], logits_to_keep=len(toks), stages=stages).argmax(-1)
            dec.reset()
            agree = [int(a) == b for a, b in zip(exit_top, toks)]
            agree_all += agree
            runs = run_lengths(agree)
            for j in range(1, 9):
                counts[j - 1] += [sum(r >= j for r in runs), sum(r >= j - 1 for r in runs)]
        out[layer] = {"agreement": float(np.mean(agree_all)),
                      "acceptance_by_position": (counts[:, 0] / np.maximum(counts[:, 1], 1)).tolist(),
                      "trace": agree_all}
        print(f"exit {layer}: agreement {out[layer]['agreement']:.3f}", file=sys.stderr, flush=True)
    return out


def costs(model, ids: list[int], max_k: int, repeats: int) -> dict:
    """Medians (seconds): a plain step; per exit, a draft (stages before it + exit head, one row) and the
    verification of k = 1..MAX_K drafts (the remaining stages over k pending rows + LM head)."""
    dec = model.decoder
    dec.reset()
    dec.set_exit_context(ids)
    dec.forward(ids, logits_to_keep=1)
    n = len(ids)
    toks = (ids * max_k)[-max_k:]
    samples: dict[str, list[float]] = {"plain": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        dec.step(toks[0])
        samples["plain"].append(time.perf_counter() - t0)
        dec.truncate(n)
        for layer, stages in sorted(dec.exits.items()):
            for k in range(1, max_k + 1):
                t0 = time.perf_counter()
                for t in toks[:k]:
                    dec.exit_logits(dec.step_partial(t, stages)[None], stages)
                t1 = time.perf_counter()
                dec.catch_up(logits_to_keep=k)
                t2 = time.perf_counter()
                samples.setdefault(f"draft{layer}", []).append((t1 - t0) / k)
                samples.setdefault(f"verify{layer}/{k}", []).append(t2 - t1)
                dec.truncate(n)
    dec.reset()
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"plain_s": med["plain"],
            "exits": {layer: {"draft_s": med[f"draft{layer}"],
                              "verify_s": {k: med[f"verify{layer}/{k}"] for k in range(1, max_k + 1)}}
                      for layer in sorted(dec.exits)}}


def replay_self(trace: list[bool], c: dict, plain: float, draft_len) -> float:
    """Speedup over plain steps of self-speculative rounds of DRAFT_LEN(t) drafts replayed on an agreement
    TRACE with costs C (draft_s, verify_s per k): a rejection yields the accepted drafts and the correction,
    a fully accepted round its k drafts (the last draft is never fed, so no bonus token)."""
    runs = run_lengths(trace)
    t = tokens = 0
    seconds = 0.0
    while t < len(trace):
        k = draft_len(t)
        m = min(runs[t], k)
        got = m + 1 if m < k else k
        seconds += k * c["draft_s"] + c["verify_s"][k]
        tokens += got
        t += got
    return tokens * plain / seconds


def predict(agree: dict, cost: dict, max_k: int) -> dict:
    """Per exit: the modelled speedup of every draft length k, replayed on the agreement trace (exact for
    greedy), the best, and the oracle (every round drafts exactly what will be accepted, capped at MAX_K)."""
    out = {}
    for layer, a in agree.items():
        c = cost["exits"][layer]
        plain = cost["plain_s"]
        trace = a["trace"]
        runs = run_lengths(trace)
        # k = 1 is left out: a round of one draft yields exactly one token, never more than a plain step
        fixed = {k: replay_self(trace, c, plain, lambda t, k=k: k) for k in range(2, max_k + 1)}
        best = max(fixed, key=fixed.get)
        oracle = replay_self(trace, c, plain, lambda t, runs=runs: max(1, min(runs[t] + 1, max_k)))
        model = CostModel(c["draft_s"], {1: plain, **{k + 1: c["verify_s"][k] for k in c["verify_s"]}},
                          a["acceptance_by_position"])
        out[layer] = {"fixed": fixed, "best_k": best, "best": fixed[best], "oracle": oracle,
                      "draft_over_plain": c["draft_s"] / plain, "cost_model": model.to_dict()}
        print(f"exit {layer}: draft {c['draft_s'] / plain:.2f} of a plain step, agreement {a['agreement']:.2f}; "
              f"predicted best k={best} {fixed[best]:.2f}x, oracle {oracle:.2f}x", file=sys.stderr, flush=True)
    return out


def measure(model, conts, layer: int, k: int, new_tokens: int) -> dict:
    """Self-speculative at (LAYER, K) against plain decoding, interleaved, from empty caches."""
    ratios, same, stats = [], 0, []
    for ids, _ in conts:
        model.reset()
        t0 = time.perf_counter()
        plain = model.complete(ids, max_new_tokens=new_tokens, ignore_eos=True)
        t1 = time.perf_counter()
        model.reset()
        spec = model.complete(ids, max_new_tokens=new_tokens, ignore_eos=True, strategy="self-speculative",
                              exit_layer=layer, draft_len=k)
        t2 = time.perf_counter()
        ratios.append((t1 - t0) / (t2 - t1))
        same += spec.tokens == plain.tokens
        stats.append({k_: spec.stats.get(k_) for k_ in ("acceptance_rate", "tokens_per_verify")})
        print(f"  {ratios[-1]:.2f}x identical={spec.tokens == plain.tokens} {stats[-1]}", file=sys.stderr,
              flush=True)
    return {"layer": layer, "k": k, "speedup_median": float(np.median(ratios)), "ratios": ratios,
            "identical": same, "prompts": len(conts), "stats": stats}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", required=True)
    ap.add_argument("--label", required=True)
    ap.add_argument("--trace", type=Path, default=None, help="a draft_costs.py JSON of the same big model")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--measure-prompts", type=int, default=8)
    ap.add_argument("--max-k", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import edgeinfer

    load0 = os.getloadavg()[0]
    model = edgeinfer.load(args.package, threads=args.threads)
    prompts = json.loads(PROMPTS.read_text())[: args.prompts]
    conts = continuations(model, prompts, args.new_tokens, args.trace)
    agree = agreement(model, conts)
    cost = costs(model, conts[0][0] + conts[0][1][:32], args.max_k, args.repeats)
    pred = predict(agree, cost, args.max_k)
    layer = max(pred, key=lambda L: pred[L]["best"])
    rep = {"date": datetime.datetime.now().isoformat(timespec="minutes"), "package": args.package,
           "label": args.label, "threads": args.threads, "loadavg_start": load0,
           "agreement": {L: {k: v for k, v in a.items() if k != "trace"} for L, a in agree.items()},
           "costs": cost, "prediction": pred, "predicted_best": {"layer": layer, "k": pred[layer]["best_k"],
                                                                "speedup": pred[layer]["best"]}}
    BUILD.mkdir(parents=True, exist_ok=True)
    out = BUILD / f"exit_costs-{args.label}.json"
    out.write_text(json.dumps(rep, indent=1))  # the prediction is on disk before anything is measured
    print(f"predicted: exit {layer}, k={pred[layer]['best_k']}: {pred[layer]['best']:.2f}x", flush=True)
    rep["measured"] = measure(model, conts[: args.measure_prompts], layer, pred[layer]["best_k"], args.new_tokens)
    rep["loadavg_end"] = os.getloadavg()[0]
    out.write_text(json.dumps(rep, indent=1))
    m = rep["measured"]
    print(f"measured: {m['speedup_median']:.2f}x (median of {m['prompts']}), identical {m['identical']}/"
          f"{m['prompts']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
