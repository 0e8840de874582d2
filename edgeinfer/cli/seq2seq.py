"""``edgeinfer run`` for encoder-decoder packages: a WAV path for speech models
(Whisper), text for text-to-text models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from edgeinfer.errors import GenerationError


def run_seq2seq(model, prompt: str, args) -> int:
    params = dict(num_beams=args.num_beams, length_penalty=args.length_penalty,
                  no_repeat_ngram_size=args.no_repeat_ngram_size, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                  repetition_penalty=args.repetition_penalty)
    if args.stop:
        raise GenerationError("--stop applies to decoder packages: an encoder-decoder model ends at its "
                              "end-of-sequence token or --max-new-tokens.")
    pair_flags = [flag for flag, value in (("--tau", args.tau), ("--window", args.window),
                                           ("--min-hold", args.min_hold), ("--entropy-of", args.entropy_of),
                                           ("--fallback-threshold", args.fallback_threshold),
                                           ("--rollback-threshold", args.rollback_threshold)) if value is not None]
    if pair_flags:
        raise GenerationError(f"{', '.join(pair_flags)} belong to the big/little strategies (ead, bild) of decoder "
                              "packages: an encoder-decoder package takes none.")
    strategy = getattr(args, "strategy", None) or "plain"
    if strategy != "plain":  # lookup; early-exit / self-speculative / adaptive on a staged package (export --exits)
        params.update(strategy=strategy, exit_layer=args.exit_layer, threshold=args.threshold,
                      draft_len=args.draft_len)
    from edgeinfer.constraints import cli_constraint

    constraint = cli_constraint(args)
    if not model.audio:
        return _run_text(model, prompt, {**params, **constraint}, args)
    if constraint:
        raise GenerationError("constraints (--json-schema, --regex, --grammar, --choice) apply to text models, "
                              "not to speech transcription.")
    params.update(language=getattr(args, "language", None), task=getattr(args, "task", None))
    path = Path(prompt.strip())
    if not path.is_file():
        raise GenerationError(f"'{model.name}' is a speech model: give the path of a WAV file, not text "
                              f"('{prompt[:60]}' is no file).")
    show = None if args.json else (lambda text: (sys.stdout.write(text + "\n"), sys.stdout.flush()))
    res = model.transcribe(path, timestamps=args.timestamps, on_text=None if args.timestamps else show,
                           temperature_fallback=getattr(args, "temperature_fallback", True),
                           condition_on_previous_text=getattr(args, "condition_on_previous_text", True), **params)
    if args.json:
        out = {**res.as_dict(), "provider": model.target.name}
        print(json.dumps(out, ensure_ascii=False))
        return 0
    if args.timestamps:
        for seg in res.segments:
            end = f"{seg['end']:7.2f}" if seg["end"] is not None else "    ..."
            print(f"[{seg['start']:7.2f} → {end}] {seg['text']}")
    print(f"[{res.audio_s:.1f} s of audio in {res.elapsed_s:.2f} s ({res.inverse_rtf:.1f}x real time), "
          f"{res.windows} window(s), {res.silent_windows} silent, {res.new_tokens} tokens, {model.target.name}]",
          file=sys.stderr)
    fell_back = [w for w in res.window_stats if w["temperature"] > 0]
    if fell_back:
        print(f"[temperature fallback in {len(fell_back)} window(s): "
              + ", ".join(f"{w['start_s']:.1f} s at {w['temperature']}" for w in fell_back) + "]", file=sys.stderr)
    _print_strategy(res.strategy)
    return 0


def _run_text(model, prompt: str, params: dict, args) -> int:
    show = None if args.json else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    res = model.generate(prompt, on_text=show, **params)
    if args.json:
        print(json.dumps({**res.as_dict(), "provider": model.target.name}, ensure_ascii=False))
        return 0
    sys.stdout.write("\n")
    print(f"[{res.input_tokens} input tokens, {len(res.tokens)} new, first token {res.ttft_s * 1000:.0f} ms "
          f"(encoder {res.encoder_s * 1000:.0f} ms), {res.decode_tok_s:.1f} tok/s, {model.target.name}]",
          file=sys.stderr)
    _print_strategy(res.strategy)
    return 0


def _print_strategy(stats: dict | None) -> None:
    """One stderr line of early-exit / self-speculative statistics (all of them: --json's "stats")."""
    if not stats:
        return
    if stats["strategy"] == "lookup":
        detail = (f"{stats['accepted']}/{stats['drafted']} drafts accepted, {stats['verify_calls']} verifications, "
                  f"{stats['plain_steps']} plain steps")
    elif stats["strategy"] == "adaptive":
        detail = (f"{stats['accepted']}/{stats['drafted']} drafts accepted, {stats['plain_steps']} plain steps, "
                  f"{stats['lookup_rounds']} lookup rounds, choices {stats['choices']}")
    elif stats["strategy"] == "self-speculative":
        detail = (f"exit {stats['exit_layer']}, {stats['accepted']}/{stats['drafted']} drafts accepted, "
                  f"{stats.get('tokens_per_verify', 0):.2f} tokens per verification")
    else:
        detail = (f"threshold {stats['threshold']}, exits taken {stats['exits']}, {stats['full']} at full depth, "
                  f"average depth {stats.get('average_depth', 0):.2f}")
    print(f"[{stats['strategy']}: {detail}]", file=sys.stderr)
