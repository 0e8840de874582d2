"""``edgeinfer calibrate BIG --little LITTLE --quality 0.95``: measure a big/little pair on a short calibration
text and store the settings its strategies then use by default (EAD's tau, BiLD's thresholds, speculative
decoding's cost model) in a small pair file in the package cache (edgeinfer/strategies/pair_file.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgeinfer.errors import EdgeInferError


def add_calibrate_command(sub) -> None:
    c = sub.add_parser("calibrate", help="calibrate a big/little pair: EAD's tau, BiLD's thresholds and the "
                       "speculative cost model, stored as that pair's defaults")
    c.add_argument("big", help="the big package (folder, cached NAME or alias)")
    c.add_argument("--little", required=True, metavar="PACKAGE", help="the little package (same tokenizer)")
    c.add_argument("--quality", type=float, default=0.95,
                   help="quality to keep: PPL_big(the big model's own greedy text) / PPL_big(the strategy's text) "
                        "on the calibration prompts (default 0.95)")
    c.add_argument("--prompts", default=None, metavar="FILE",
                   help="calibration prompts, one per line (default: 16 shipped prompts, prose and code)")
    c.add_argument("--new-tokens", type=int, default=None,
                   help="tokens generated per prompt (default: calibration.NEW_TOKENS, 96)")
    c.add_argument("--rollback-threshold", type=float, default=None,
                   help="BiLD's rollback threshold (nats) kept while its fallback threshold is calibrated "
                        "(default 3.0)")
    c.add_argument("--out", default=None, metavar="FILE",
                   help="write the pair file here instead of the package cache (then give it to run with --pair)")
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--json", action="store_true", help="print the pair file's contents")
    c.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args) -> int:
    from edgeinfer import load
    from edgeinfer.strategies.calibration import NEW_TOKENS, ROLLBACK, calibrate_pair, calibration_prompts
    from edgeinfer.strategies.pair_file import pair_file_path, write_pair_file

    if not 0.0 < args.quality <= 1.0:
        raise EdgeInferError(f"--quality is a share of the big model's quality, in (0, 1], got {args.quality}.")
    if args.new_tokens is not None and args.new_tokens < 4:
        raise EdgeInferError(f"--new-tokens must be at least 4, got {args.new_tokens}.")
    rollback = ROLLBACK if args.rollback_threshold is None else args.rollback_threshold
    if rollback < 0:
        raise EdgeInferError(f"--rollback-threshold is a cross-entropy in nats, >= 0; got {rollback}.")
    prompts = None
    if args.prompts:
        try:
            prompts = calibration_prompts(args.prompts)
        except (OSError, UnicodeDecodeError) as e:
            raise EdgeInferError(f"cannot read the calibration prompts '{args.prompts}': {e}.") from None
        if not prompts:
            raise EdgeInferError(f"'{args.prompts}' holds no prompts: write one per line.")
    big = load(args.big, threads=args.threads)
    little = load(args.little, threads=args.threads)
    if getattr(big, "kind", "decoder") != "decoder" or getattr(little, "kind", "decoder") != "decoder":
        raise EdgeInferError("calibrate takes two decoder packages of the same tokenizer.")
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    settings = calibrate_pair(big, little, quality=args.quality, prompts=prompts,
                              new_tokens=args.new_tokens or NEW_TOKENS, rollback=rollback, log=log)
    path = Path(args.out) if args.out else pair_file_path(big.package, little.package)
    write_pair_file(settings, path)
    m = settings.measured
    if args.json:
        print(json.dumps(settings.to_dict(), indent=1))
    else:
        ead, bild = m["ead"], m["bild"]
        print(f"EAD: tau {settings.tau:g}, window {settings.window}, the {settings.entropy_of} model's entropy "
              f"(quality {ead['quality']:.3f}, {ead['assured_quality']:.3f} assured; big model on "
              f"{100 * ead['big_share']:.0f}% "
              f"of tokens){'' if ead['meets_target'] else ' -- short of the target even at the lowest tau'}")
        print(f"BiLD: fallback {settings.fallback_threshold:g}, rollback {settings.rollback_threshold:g} (quality "
              f"{bild['quality']:.3f}, {bild['assured_quality']:.3f} assured; big model on "
              f"{100 * bild['big_share']:.0f}% of tokens)"
              f"{'' if bild['meets_target'] else ' -- short of the target even at the highest fallback'}")
        print(f"speculative: cost model stored (best fixed draft length {m['speculative']['best_fixed_draft_len']}, "
              f"{m['speculative']['modelled_speedup']:.2f}x modelled); the draft length is chosen per step")
        print(f"little model alone: quality {m['little_alone']['quality']:.3f}")
        print(f"wrote {path}" + (" (use it with --pair)" if args.out else
                                 " (used by default by ead, bild and speculative on this pair)"))
    return 0


def add_pair_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pair", default=None, metavar="FILE",
                   help="speculative|ead|bild: a pair file from 'edgeinfer calibrate --out' (default: the one the "
                        "package cache holds for this pair, if any)")
