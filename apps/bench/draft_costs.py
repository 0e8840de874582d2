"""The draft-and-verify cost model, measured: what speculative decoding can reach on this machine.

    .venv/bin/python apps/bench/draft_costs.py --big qwen2.5-coder-1.5b --little qwen2.5-coder-0.5b
    .venv/bin/python apps/bench/draft_costs.py --big qwen2.5-coder-1.5b --little qwen2.5-coder-0.5b --quick

1. Costs, interleaved (rounds of: one little step, one big step, one big pass over r = 2..R rows), medians:
   the draft cost per token and the verification cost as a function of rows.
2. An agreement trace on the prompts (apps/bench/prompts/qwen_pair.json): the big model's greedy output,
   and the little model's greedy choice and top probability at every position given the big model's own
   prefix, which is exactly what decides acceptance in greedy speculative decoding.
3. The model (edgeinfer/strategies/cost_model.py): acceptance per draft position, the speedup of every fixed
   draft length (replayed on the trace: exact for greedy decoding), the oracle ceiling (every round drafts
   exactly what will be accepted), the per-step rule of the speculative strategy replayed on the trace, and
   the same on a phone-class 8-core CPU (memory and arithmetic speed ratios given by --phone-*; the memory
   ratio by default from this machine's read bandwidth, measured, against a phone's ~55 GB/s).

Writes build/bench/draft_costs-LABEL.json (the trace too, so --replay re-analyses without the models).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from edgeinfer.strategies.calibration import measure_pair_costs  # noqa: E402
from edgeinfer.strategies.cost_model import (  # noqa: E402
    CostModel,
    OnlineCosts,
    run_lengths,
    simulate,
)
from edgeinfer.strategies.pair import drafting_head  # noqa: E402
from edgeinfer.strategies.speculative import PROBE_EVERY  # noqa: E402

BUILD = ROOT / "build" / "bench"
PHONE_READ_GBS = 55.0  # a phone-class SoC's LPDDR5X read bandwidth (8-core, 2024-25 flagship class)
PROMPTS = ROOT / "apps" / "bench" / "prompts" / "qwen_pair.json"


def softmax_stats(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(argmax, top probability, entropy in nats) of every row."""
    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    p = np.exp(x)
    s = p.sum(-1, keepdims=True)
    p /= s
    ent = -(p * np.where(p > 0, np.log(np.maximum(p, 1e-300)), 0.0)).sum(-1)
    return logits.argmax(-1), p.max(-1), ent


def measure_costs(big, little, ids: list[int], max_rows: int, repeats: int) -> dict:
    """Medians of: a little step, a big pass over r = 1..MAX_ROWS rows, interleaved (calibration's measure)."""
    draft_s, verify_s = measure_pair_costs(big.decoder, little.decoder, ids, max_rows, repeats)
    return {"draft_s": draft_s, "verify_s": verify_s, "context": len(ids), "repeats": repeats}


def big_continuations(big, prompts: list[str], new_tokens: int, earlier: dict | None = None) -> list[dict]:
    """Per prompt: the big model's greedy tokens (from EARLIER, a prompt -> tokens map of an earlier run, when
    it has them), and its entropy and top-2 margin at each of them."""
    out = []
    for i, text in enumerate(prompts):
        ids = big.encode([{"role": "user", "content": text}])
        tokens = (earlier or {}).get(text)
        if tokens is None:
            tokens = big.complete(ids, max_new_tokens=new_tokens, ignore_eos=True).tokens
        res = type("Greedy", (), {"tokens": tokens[:new_tokens]})
        big.reset()
        bo = big.decoder.forward(ids + res.tokens[:-1], logits_to_keep=len(res.tokens))
        big.reset()
        b_arg, _, b_ent = softmax_stats(bo)
        srt = np.sort(bo, -1)
        out.append({"prompt": text, "ids": ids, "big": res.tokens, "big_entropy": b_ent.tolist(),
                    "big_margin": (srt[:, -1] - srt[:, -2]).tolist(), "logits": bo,
                    "big_batched_argmax_agrees": float((b_arg == np.array(res.tokens)).mean())})
        print(f"[{i + 1}/{len(prompts)}] big: {text[:50]!r}", file=sys.stderr, flush=True)
    return out


def little_logits(little, ids: list[int], tokens: list[int]) -> np.ndarray:
    """The little model's logits at each of the big model's TOKENS given the big model's prefix (after IDS),
    through its drafting head if it has one."""
    little.reset()
    little.decoder.set_exit_context(ids)  # a VocabTrim head also scores the prompt's tokens
    out = little.decoder.forward(ids + tokens[:-1], logits_to_keep=len(tokens), stages=drafting_head(little.decoder))
    little.reset()
    return out


def agreement_trace(little, conts: list[dict]) -> list[dict]:
    """Per prompt: the little model's argmax, top probability and entropy at each of the big model's tokens
    given the big model's prefix (through its drafting head if it has one), and the big model's
    log-probability of the little model's token (what EAD/BiLD calibration replays)."""
    out = []
    for c in conts:
        lo = little_logits(little, c["ids"], c["big"])
        l_arg, l_top, l_ent = softmax_stats(lo)
        x = c["logits"].astype(np.float64) - c["logits"].max(-1, keepdims=True)
        logz = np.log(np.exp(x).sum(-1))
        out.append({**{k: v for k, v in c.items() if k not in ("logits", "ids")}, "prompt_tokens": len(c["ids"]),
                    "little": l_arg.tolist(), "little_top": l_top.tolist(), "little_entropy": l_ent.tolist(),
                    "big_logprob_of_little": (x[np.arange(len(l_arg)), l_arg] - logz).tolist()})
    return out


def phone_memory_ratio() -> tuple[float, float]:
    """(a phone's read bandwidth over this machine's, this machine's in GB/s), the latter measured now."""
    from compare import memory_bandwidth_gbs

    here = memory_bandwidth_gbs()
    return PHONE_READ_GBS / here, here


def analyse(costs: dict, trace: list[dict], max_k: int, phone: tuple[float, float]) -> dict:
    agree_per = [[a == b for a, b in zip(t["big"], t["little"])] for t in trace]
    # acceptance per position over all prompts (runs never cross a prompt's end)
    counts = np.zeros((max_k, 2))
    for ag in agree_per:
        runs = run_lengths(ag)
        for j in range(1, max_k + 1):
            counts[j - 1] += [sum(r >= j for r in runs), sum(r >= j - 1 for r in runs)]
    alpha = (counts[:, 0] / np.maximum(counts[:, 1], 1)).tolist()
    model = CostModel(costs["draft_s"], {int(r): s for r, s in costs["verify_s"].items()}, alpha)
    rep = {"agreement": float(np.mean([a for ag in agree_per for a in ag])), "acceptance_by_position": alpha,
           "cost_model": model.to_dict()}

    def replay(m: CostModel) -> dict:
        fixed = {}
        for k in range(1, max_k + 1):
            tok = sec = 0.0
            for ag in agree_per:
                a, b = simulate(ag, m, k)
                tok, sec = tok + a, sec + b
            fixed[k] = tok * m.verify(1) / sec
        tok = sec = 0.0
        for ag in agree_per:
            runs = run_lengths(ag)
            a, b = simulate(ag, m, lambda t, runs=runs: min(runs[t], 16))
            tok, sec = tok + a, sec + b
        oracle = tok * m.verify(1) / sec
        policy = replay_policy(trace, m, max_k)
        best_k = max(fixed, key=fixed.get)
        return {"fixed": fixed, "best_fixed_k": best_k, "best_fixed": fixed[best_k], "oracle": oracle,
                "per_step_rule": policy, "model_best": model_best(m, max_k)}

    rep["here"] = replay(model)
    mem, comp = phone
    rep["phone"] = {}
    for c in sorted({comp / 2, comp, comp * 2}):  # the arithmetic ratio is the uncertain one: a band around it
        phone_model = model.project(mem, c)
        rep["phone"][f"memory {mem:g}x, compute {c:g}x"] = {"memory_ratio": mem, "compute_ratio": c,
                                                             "cost_model": phone_model.to_dict(),
                                                             **replay(phone_model)}
    return rep


def model_best(m: CostModel, max_k: int) -> dict:
    k, s = m.best(max_k)
    return {"k": k, "speedup": s}


def replay_policy(trace: list[dict], m: CostModel, max_k: int) -> dict:
    """The speculative strategy's per-step rule (OnlineCosts.keep_drafting, learning its acceptance map as it
    goes, timings from the model, a one-draft probe after PROBE_EVERY rounds without drafts) replayed on the
    trace. Drafts past the first disagreement take the little model's confidence at that position given the
    big prefix: an approximation (they are rejected anyway; only the decision to stop drafting depends on
    them)."""
    online = OnlineCosts(max_k=max_k, prior=m)
    tokens = seconds = drafted = 0
    for t in trace:
        agree = [a == b for a, b in zip(t["big"], t["little"])]
        conf = t["little_top"]
        pos = idle = 0
        while pos < len(agree):
            confs: list[float] = []
            probe = idle >= PROBE_EVERY
            while (online.keep_drafting(confs) or (probe and not confs)) and pos + len(confs) < len(agree):
                confs.append(conf[pos + len(confs)])
            k = len(confs)
            idle = 0 if k else idle + 1
            acc = 0
            while acc < k and agree[pos + acc]:
                acc += 1
            online.record_acceptance(confs, acc)
            seconds += m.round_s(k) if k else m.verify(1)
            tokens += acc + 1
            drafted += k
            pos += acc + 1
    return {"speedup": tokens * m.verify(1) / seconds, "mean_draft_len": drafted / max(1, tokens)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big", default="qwen2.5-coder-1.5b")
    ap.add_argument("--little", default="qwen2.5-coder-0.5b", help="little packages, comma-separated")
    ap.add_argument("--label", default="qwen-pair")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-rows", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--max-k", type=int, default=8)
    ap.add_argument("--phone-memory", type=float, default=None,
                    help="a phone's read bandwidth over this machine's (default: ~55 GB/s of LPDDR5X over this "
                         "machine's read bandwidth, measured at the start)")
    ap.add_argument("--phone-compute", type=float, default=2.0,
                    help="a phone's int8 arithmetic over this machine's 2 threads (default 2.0: 8 cores, 1+5 big "
                         "and mid with SDOT + 2 small, against 2 AVX-512 VNNI server cores)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--replay", type=Path, default=None, help="re-analyse an earlier run's JSON")
    ap.add_argument("--continuations", type=Path, default=None,
                    help="take the big model's greedy continuations from an earlier run's JSON (same big model)")
    args = ap.parse_args(argv)
    if args.replay:
        reps = [json.loads(args.replay.read_text())]
    else:
        import edgeinfer

        prompts = json.loads(PROMPTS.read_text())[: 3 if args.quick else args.prompts]
        load0 = os.getloadavg()[0]
        big = edgeinfer.load(args.big, threads=args.threads)
        littles = [edgeinfer.load(p, threads=args.threads) for p in args.little.split(",")]
        earlier = ({r["prompt"]: r["big"] for r in json.loads(args.continuations.read_text())["trace"]}
                   if args.continuations else None)
        conts = big_continuations(big, prompts, 16 if args.quick else args.new_tokens, earlier)
        ids = conts[0]["ids"] + conts[0]["big"][:32]
        reps = []
        for path, little in zip(args.little.split(","), littles):
            costs = measure_costs(big, little, ids, args.max_rows, 4 if args.quick else args.repeats)
            verify = ", ".join(f"{r}:{1e3 * s:.0f}" for r, s in costs["verify_s"].items())
            print(f"{path}: draft {1e3 * costs['draft_s']:.1f} ms, verify {verify}", file=sys.stderr, flush=True)
            reps.append({"date": datetime.datetime.now().isoformat(timespec="minutes"), "big": args.big,
                         "little": path, "threads": args.threads, "loadavg_start": load0,
                         "loadavg_end": os.getloadavg()[0], "costs": costs, "trace": agreement_trace(little, conts),
                         "command": "apps/bench/draft_costs.py " + " ".join(argv if argv is not None else
                                                                             sys.argv[1:])})
    if args.phone_memory is None and not all("phone_memory" in rep for rep in reps):
        args.phone_memory, read_gbs = phone_memory_ratio()  # a replay keeps the ratio of the machine it measured
        print(f"read bandwidth {read_gbs:.1f} GB/s: a phone's {PHONE_READ_GBS:.0f} GB/s is x{args.phone_memory:.2f}",
              file=sys.stderr)
    for rep in reps:
        rep["phone_memory"] = args.phone_memory or rep["phone_memory"]
        rep["analysis"] = analyse(rep["costs"], rep["trace"], args.max_k, (rep["phone_memory"], args.phone_compute))
        BUILD.mkdir(parents=True, exist_ok=True)
        out = args.replay or BUILD / f"draft_costs-{args.label}-{Path(rep['little']).name}.json"
        out.write_text(json.dumps(rep))
        print_report(rep)
    return 0


def print_report(rep: dict) -> None:
    a = rep["analysis"]
    c = rep["costs"]
    print(f"{rep['big']} verified, {rep['little']} drafting, {rep['threads']} threads, load {rep['loadavg_start']:.1f}"
          f"->{rep['loadavg_end']:.1f}")
    print(f"draft {1e3 * c['draft_s']:.1f} ms/token; verify (rows: ms) "
          + ", ".join(f"{r}: {1e3 * s:.0f}" for r, s in c["verify_s"].items()))
    print(f"agreement {a['agreement']:.3f}; acceptance by position " + " ".join(f"{x:.2f}"
                                                                               for x in a["acceptance_by_position"]))
    for where, r in [("here", a["here"]), *a["phone"].items()]:
        print(f"[{where}] fixed k: " + " ".join(f"{k}:{s:.2f}" for k, s in r["fixed"].items())
              + f" | best fixed k={r['best_fixed_k']} {r['best_fixed']:.2f}x | oracle {r['oracle']:.2f}x | "
              f"per-step rule {r['per_step_rule']['speedup']:.2f}x | closed form best k={r['model_best']['k']} "
              f"{r['model_best']['speedup']:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
