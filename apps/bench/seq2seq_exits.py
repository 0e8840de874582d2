"""Early exits in Whisper's decoder: how often each exit agrees with the final layer,
what early exit costs in agreement, and what self-speculative decoding gains in time.

Exports Whisper tiny.en (4 decoder layers) with ``--exits`` (a staged package) and
without (the plain baseline), transcribes the espeak-ng sentences of
``apps/bench/prompts/speech.txt`` and prints, as JSON and a markdown table:

* per exit, teacher-forced top-1 agreement with the final layer over the tokens of
  the plain greedy transcripts;
* early exit at a few thresholds: average depth, token agreement with plain greedy,
  word error rate against the spoken sentences and against the plain transcripts;
* self-speculative decoding per exit and draft length: decoder time against plain
  greedy on the unstaged and on the staged package, all in the same process,
  interleaved over rounds (order alternating), medians; transcripts must be identical.

    python apps/bench/seq2seq_exits.py --exits 1,2,3 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from apps.bench.whisper import SENTENCES, speak, wer  # noqa: E402


def window_features(model, path: Path) -> np.ndarray:
    """Log-mel features of the first (only) 30 s window of PATH, as transcribe() computes them."""
    from edgeinfer.seq2seq.whisper.audio import first_window_features

    return first_window_features(model.audio, path)


def teacher_forced_agreement(model, hidden: np.ndarray, prompt: list[int], tokens: list[int]) -> dict[int, list]:
    """exit layer -> [agreeing positions, positions]: the exit's raw argmax against the final
    layer's at every position that predicts one of TOKENS."""
    from edgeinfer.seq2seq.state import StagedDecoderState

    state = StagedDecoderState(model, model.cross_kv(hidden), 1)
    ids = np.asarray([prompt + tokens[:-1]], np.int64)
    rows = slice(len(prompt) - 1, None)
    by_stage = {}
    out = state.forward(ids, 1)
    by_stage[1] = out
    for s in range(2, len(model.stages)):
        by_stage[s] = state.catch_up(s)
    final = state.catch_up()[0, rows].argmax(-1)
    result = {}
    for layer, stages in sorted(model.exits.items()):
        exit_top = state.exit_logits(by_stage[stages])[0, rows].argmax(-1)
        result[layer] = [int((exit_top == final).sum()), int(final.size)]
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="whisper-tiny.en")
    p.add_argument("--precision", default="int8")
    p.add_argument("--exits", default="1,2,3")
    p.add_argument("--thresholds", default="0.9,0.95,0.99")
    p.add_argument("--draft-lens", default="2,4")
    p.add_argument("--timed-threshold", type=float, default=0.95, help="early-exit threshold of the timed runs")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--files", type=int, default=0, help="use only the first N sentences (0: all)")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "seq2seq-exits")
    args = p.parse_args(argv)

    from edgeinfer.export import export_model

    import edgeinfer

    exits = [int(e) for e in args.exits.split(",")]
    sentences = [s.strip() for s in SENTENCES.read_text().splitlines() if s.strip()]
    if args.files:
        sentences = sentences[:args.files]
    files = speak(sentences, args.work / "audio")
    name = args.source.replace("/", "_")
    plain_pkg = args.work / f"{name}-{args.precision}"
    staged_pkg = args.work / f"{name}-{args.precision}-exits{'-'.join(map(str, exits))}"
    if not (plain_pkg / "edgeinfer.json").exists():
        export_model(args.source, plain_pkg, args.precision, force=True, progress=False)
    if not (staged_pkg / "edgeinfer.json").exists():
        export_model(args.source, staged_pkg, args.precision, exits=exits, force=True, progress=False)
    plain = edgeinfer.load(plain_pkg, threads=args.threads)
    staged = edgeinfer.load(staged_pkg, threads=args.threads)

    feats = [window_features(staged, f) for f in files]
    hiddens = [staged.encode(x) for x in feats]  # the decoder is what differs: encode once
    prompt = staged.decoder_prompt()
    ref_tokens = [plain.generate_ids(x, prompt) for x in feats]
    ref_texts = [_text(plain, t) for t in ref_tokens]
    report = {"source": args.source, "precision": args.precision, "exits": exits, "threads": args.threads,
              "rounds": args.rounds, "files": len(files), "decoder_layers": len(staged.stages) and
              staged.stages[-1].last, "wer_plain": wer(sentences, ref_texts)}

    # 1. teacher-forced agreement per exit
    counts = {e: [0, 0] for e in exits}
    for h, toks in zip(hiddens, ref_tokens):
        for layer, (agree, n) in teacher_forced_agreement(staged, h, prompt, toks).items():
            counts[layer][0] += agree
            counts[layer][1] += n
    report["teacher_forced"] = {str(e): {"agree": a, "positions": n, "top1_agreement": a / n}
                                for e, (a, n) in counts.items()}

    # 2. early exit at thresholds (lossy)
    report["early_exit"] = {}
    for th in [float(t) for t in args.thresholds.split(",")]:
        toks, stats = [], None
        for h in hiddens:
            toks.append(staged.search(h, prompt, False, None, {"strategy": "early-exit", "threshold": th}))
            stats = _merge(stats, staged.strategy_stats)
        same = sum(a == b for r, o in zip(ref_tokens, toks) for a, b in zip(r, o))
        texts = [_text(staged, t) for t in toks]
        report["early_exit"][str(th)] = {
            "average_depth": stats["average_depth"], "exits": stats["exits"], "full": stats["full"],
            "identical_transcripts": sum(a == b for a, b in zip(ref_texts, texts)),
            "token_agreement": same / sum(len(r) for r in ref_tokens),
            "wer_vs_speech": wer(sentences, texts), "wer_vs_plain": wer(ref_texts, texts)}

    # 3. self-speculative against plain greedy, timed, interleaved
    configs = [("plain (unstaged)", plain, {}), ("plain (staged)", staged, {})]
    for e in exits:
        for k in [int(k) for k in args.draft_lens.split(",")]:
            configs.append((f"self-speculative exit {e} k={k}", staged,
                            {"strategy": "self-speculative", "exit_layer": e, "draft_len": k}))
    th = args.timed_threshold  # lossy: timed too, its tokens are not expected to be identical
    configs.append((f"early-exit exits {args.exits} threshold {th}", staged, {"strategy": "early-exit",
                                                                             "threshold": th}))
    configs.append((f"early-exit exit {exits[-1]} threshold {th}", staged,
                    {"strategy": "early-exit", "threshold": th, "exit_layer": exits[-1]}))
    times = {c[0]: [] for c in configs}
    stats_of: dict[str, dict] = {}
    identical = {c[0]: True for c in configs}
    for r in range(args.rounds + 1):  # round 0 warms up, untimed
        order = configs if r % 2 == 0 else configs[::-1]
        for label, model, params in order:
            t0 = time.perf_counter()
            outs, stats = [], None
            for h in hiddens:
                outs.append(model.search(h, prompt, False, None, dict(params)))
                if params:
                    stats = _merge(stats, model.strategy_stats)
            dt = time.perf_counter() - t0
            identical[label] = identical[label] and outs == ref_tokens
            if r:
                times[label].append(dt)
            if stats:
                stats_of[label] = stats
        print(f"round {r}{' (warm-up)' if r == 0 else ''} done", file=sys.stderr)
    base = statistics.median(times["plain (unstaged)"])
    report["decode"] = {label: {"seconds_median": statistics.median(ts), "seconds_all": ts,
                                "speedup_vs_plain_unstaged": base / statistics.median(ts),
                                "identical_tokens": identical[label],
                                **({k: stats_of[label][k] for k in ("acceptance_rate", "tokens_per_verify",
                                                                     "average_depth") if k in stats_of[label]}
                                   if label in stats_of else {})}
                        for label, ts in times.items()}
    report["new_tokens"] = sum(len(t) for t in ref_tokens)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "seq2seq_exits.json").write_text(json.dumps(report, indent=1))
    print(markdown(report))
    return 0


def _text(model, tokens: list[int]) -> str:
    from edgeinfer.seq2seq.whisper.transcribe import window_text

    return window_text(model, tokens, 0.0, False)[0]


def _merge(total, part):
    from edgeinfer.seq2seq.strategies import merge_stats

    return merge_stats(total, part)


def markdown(r: dict) -> str:
    lines = [f"{r['source']} {r['precision']}, exits {','.join(map(str, r['exits']))} of "
             f"{r['decoder_layers']} decoder layers, {r['files']} espeak-ng sentences ({r['new_tokens']} tokens "
             f"of plain greedy output), {r['threads']} threads; plain greedy WER {r['wer_plain']:.1f} %.", "",
             "| exit | teacher-forced top-1 agreement with the final layer |", "|---|---|"]
    for e, v in r["teacher_forced"].items():
        lines.append(f"| {e} | {100 * v['top1_agreement']:.1f} % ({v['agree']}/{v['positions']}) |")
    lines += ["", "| early-exit threshold | average depth | token agreement with plain | identical transcripts "
              "| WER vs speech | WER vs plain |", "|---|---|---|---|---|---|"]
    for th, v in r["early_exit"].items():
        lines.append(f"| {th} | {v['average_depth']:.2f} | {100 * v['token_agreement']:.1f} % | "
                     f"{v['identical_transcripts']}/{r['files']} | {v['wer_vs_speech']:.1f} % | "
                     f"{v['wer_vs_plain']:.1f} % |")
    lines += ["", f"| decoding (greedy, {r['rounds']} interleaved rounds, median) | decoder seconds | "
              "speed vs plain unstaged | tokens identical | acceptance | tokens per verify | average depth |",
              "|---|---|---|---|---|---|---|"]
    for label, v in r["decode"].items():
        acc = f"{100 * v['acceptance_rate']:.0f} %" if "acceptance_rate" in v else ""
        tpv = f"{v['tokens_per_verify']:.2f}" if "tokens_per_verify" in v else ""
        depth = f"{v['average_depth']:.2f}" if "average_depth" in v else ""
        lines.append(f"| {label} | {v['seconds_median']:.3f} | {v['speedup_vs_plain_unstaged']:.2f}× | "
                     f"{'yes' if v['identical_tokens'] else 'no'} | {acc} | {tpv} | {depth} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
