"""VocabTrim: an exit head that scores only the tokens a drafter needs, and the context's own.

An exit head's LM head reads vocab × hidden weights per token: for Qwen2.5-Coder-1.5B 152k × 1536, a fifth
of what a whole decode step reads, and for the 0.5B a third. A draft that is verified by the full model
needs no rare token: the trimmed head keeps the N tokens the model itself produces most on calibration
text (its own greedy continuations of the shipped prompts, or ``--calibration`` text, each position's
top-16 predictions counted with falling weights), plus the end-of-text tokens, and fills any remaining
room in id order. No fixed list holds a conversation's topic words ("Romeo", "bakery": measured, a 8,192-token
list alone missed 17% of the 1.5B model's tokens on the benchmark prompts, most of them words of the prompt),
so the head also scores the tokens of the context it is given at run time (``extra_token_ids``: the runtime
passes the prompt's, edgeinfer/decoders/staged.py), reading only their rows of the full head. Its graph writes
the scored logits into a full-width row of -1e9, so every consumer (self-speculative drafts, EAD's entropy, the
lossy early-exit strategy) reads the usual (positions, vocab) logits and never sees a dropped token as a
candidate. Verification stays the full model's own head: self-speculative and speculative decoding stay
lossless.

An exit after the last layer (``--exits L`` on an L-layer model, a stage holding only the final norm and
head) turns the trimmed head into a cheaper drafting head for the model as a whole: how a little model
drafts for a big one (edgeinfer/strategies/pair.py drafts through it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from edgeinfer.export.decoder.graph import EXIT_EXTRA_TOKENS, HIDDEN_IN, LOGITS, LOGITS_TO_KEEP
from edgeinfer.export.graph.blocks import Precision, embedding, linear, rms_norm
from edgeinfer.export.graph.onnx_graph import GraphBuilder
from edgeinfer.export.sources.gguf_tensors import BlockWeight
from edgeinfer.models.base import DecoderSpec, StateDict, final_norm, lm_head

DROPPED = -1e9  # the logit of a token the trimmed head does not score: finite, so softmax and entropy stay exact
TOP = 16  # predictions per position counted, weighted 1, 1/2, 1/3, ...
PROMPTS = 16  # shipped prompts continued when no calibration text is given
NEW_TOKENS = 24


def trimmed_exit_head(spec: DecoderSpec, sd: StateDict, precision: Precision, keep: np.ndarray) -> GraphBuilder:
    """Final norm + the LM head rows KEEP on any stage's residual stream, scattered into full-vocab logits."""
    g = GraphBuilder("exit_head")
    x = g.input(HIDDEN_IN, "float32", ["batch", "seq", spec.hidden])
    n_keep = g.input(LOGITS_TO_KEEP, "int64", [1])
    start = g.op1("Neg", [n_keep])
    x = g.op1("Slice", [x, start, g.const_i64([2**62], "slice_end"), g.const_i64([1], "slice_axis")])
    h = rms_norm(g, x, final_norm(sd, spec), spec.rms_eps, "model.norm")
    head = lm_head(sd, spec)
    keep = np.asarray(keep, dtype=np.int64)
    if isinstance(head, BlockWeight):
        rows = head.take_rows(keep)
        if precision.name == "source" and precision.lm_head_bits:
            requant = Precision(f"int{precision.lm_head_bits}", accuracy_level=precision.accuracy_level,
                                symmetric=True, quant_method="rtn")
            small = linear(g, h, rows.dequantize(), "lm_head_trimmed", requant, bits=precision.lm_head_bits)
        else:
            small = linear(g, h, rows, "lm_head_trimmed", precision)
    else:
        small = linear(g, h, np.asarray(head)[keep], "lm_head_trimmed", precision, bits=precision.head_bits)
    if spec.final_softcap:
        cap = g.initializer("final_softcap", np.array(spec.final_softcap, np.float32))
        small = g.op1("Mul", [g.op1("Tanh", [g.op1("Div", [small, cap])]), cap])
    # The context's own tokens (the prompt's, given at run time): rows gathered from the full head, so the topic
    # words no fixed list can hold are scored too; a gather reads only those rows.
    extra = g.input(EXIT_EXTRA_TOKENS, "int64", ["extra"])
    extra_2d = g.op1("Unsqueeze", [extra, g.const_i64([0])])
    rows, _ = embedding(g, extra_2d, head, "lm_head_extra", precision, None if isinstance(head, BlockWeight)
                        else precision.head_bits)
    extra_logits = g.op1("MatMul", [h, g.op1("Transpose", [rows], perm=[0, 2, 1])])
    if spec.final_softcap:
        extra_logits = g.op1("Mul", [g.op1("Tanh", [g.op1("Div", [extra_logits, cap])]), cap])
    shape = g.op1("Shape", [small])
    rows_shape = g.op1("Slice", [shape, g.const_i64([0]), g.const_i64([2]), g.const_i64([0])])
    full_shape = g.op1("Concat", [rows_shape, g.const_i64([spec.vocab], "vocab_size")], axis=0)
    import onnx

    base = g.op1("ConstantOfShape", [full_shape],
                 value=onnx.helper.make_tensor("dropped", onnx.TensorProto.FLOAT, [1], [DROPPED]))
    index = g.op1("Expand", [g.initializer("kept_tokens", keep.reshape(1, 1, -1)), shape])
    extra_index = g.op1("Expand", [g.op1("Unsqueeze", [extra_2d, g.const_i64([0])]), g.op1("Shape", [extra_logits])])
    g.op("ScatterElements", [base, g.op1("Concat", [index, extra_index], axis=2),
                             g.op1("Concat", [small, extra_logits], axis=2)], outputs=[LOGITS], axis=2)
    g.output(LOGITS, "float32", ["batch", "logits_seq", spec.vocab])
    return g


def kept_tokens(weights: np.ndarray, n: int, always: list[int]) -> np.ndarray:
    """The N token ids to keep: ALWAYS, then by falling WEIGHTS (ties and unseen tokens: lower id first)."""
    vocab = len(weights)
    order = np.lexsort((np.arange(vocab), -weights))
    chosen = list(dict.fromkeys([t for t in always if 0 <= t < vocab] + order.tolist()))[:n]
    return np.array(sorted(chosen), dtype=np.int64)


def calibration_token_sequences(model, texts: list[str] | None) -> list[list[int]]:
    """The model's own greedy continuations of the shipped prompts (or TEXTS as given), prompt included."""
    from edgeinfer.export.decoder.exit_adapters import PROMPTS_FILE, calibration_sequences

    if texts is not None:
        return calibration_sequences(model, texts, NEW_TOKENS)
    lines = [ln.strip() for ln in PROMPTS_FILE.read_text(encoding="utf-8").splitlines() if ln.strip()]
    seqs = []
    for line in lines[:: max(1, len(lines) // PROMPTS)][:PROMPTS]:
        prompt = [{"role": "user", "content": line}] if model.tokenizer.chat_template else line
        ids = model.encode(prompt)
        seqs.append(ids + model.complete(ids, max_new_tokens=NEW_TOKENS, ignore_eos=True).tokens)
    return seqs


def token_weights(model, seqs: list[list[int]]) -> np.ndarray:
    """How much the model itself uses each token over SEQS: each token counted once, and each position's
    top predictions counted 1, 1/2, 1/3, ..."""
    weights = np.zeros(model.decoder.vocab_size, np.float64)
    rank = 1.0 / np.arange(1, TOP + 1)
    for seq in seqs:
        np.add.at(weights, np.asarray(seq), 1.0)
        model.decoder.reset()
        logits = model.decoder.forward(seq, logits_to_keep=len(seq))
        top = np.argpartition(-logits, TOP, axis=-1)[:, :TOP]
        order = np.take_along_axis(logits, top, -1).argsort(-1)[:, ::-1]
        np.add.at(weights, np.take_along_axis(top, order, -1), rank[None, :])
    model.decoder.reset()
    return weights


def trim_exit_head(package_dir: Path, spec: DecoderSpec, sd: StateDict, precision: Precision, n: int,
                   texts: list[str] | None = None) -> dict:
    """Replace the exit head of the complete package in PACKAGE_DIR by one keeping N tokens; returns
    {kept, coverage, weight_bytes}: coverage = the share of the tokens of held-out calibration sequences
    (a quarter, not counted) that the kept set holds."""
    import edgeinfer

    model = edgeinfer.load(package_dir, verify=False)
    seqs = calibration_token_sequences(model, texts)
    held = max(1, len(seqs) // 4) if len(seqs) > 1 else 0  # coverage is measured on sequences not counted
    keep = kept_tokens(token_weights(model, seqs[: len(seqs) - held]), n, sorted(model.tokenizer.eos_token_ids))
    kept = set(keep.tolist())
    tokens = [t for s in (seqs[len(seqs) - held:] if held else seqs) for t in s]
    coverage = sum(t in kept for t in tokens) / max(1, len(tokens))
    del model
    path = package_dir / "graphs" / "exit_head.onnx"
    for old in (path, path.with_name(path.name + ".data")):
        if old.exists():
            old.unlink()
    trimmed_exit_head(spec, sd, precision, keep).save(path)
    data = path.with_name(path.name + ".data")
    return {"kept": int(len(keep)), "coverage": coverage,
            "weight_bytes": path.stat().st_size + (data.stat().st_size if data.exists() else 0)}


def add_trimmed_exit_head(tmp: Path, spec: DecoderSpec, sd: StateDict, precision: Precision, graphs: list[dict],
                          n: int, calibration, progress: bool) -> None:
    """The exporter's step for ``--exit-vocab N``: trim the exit head of the staged package in TMP and
    update its graph entry (GRAPHS, the manifest's list) with the bytes it now reads."""
    import sys

    from edgeinfer.export.calibration_text import read_paragraphs

    texts = read_paragraphs(calibration) if calibration is not None else None
    if progress:
        print(f"trimming the exit head to {n} tokens (VocabTrim) on calibration text...", file=sys.stderr)
    info = trim_exit_head(tmp, spec, sd, precision, n, texts)
    for g in graphs:
        if g.get("role") == "exit_head":
            g["weight_bytes"] = info["weight_bytes"]
            g["inputs"] = [*g["inputs"], EXIT_EXTRA_TOKENS]  # the runtime feeds it the context's tokens
    if progress:
        print(f"  kept {info['kept']} of {spec.vocab} tokens; they cover {100 * info['coverage']:.1f}% of the "
              "tokens of held-out calibration sequences", file=sys.stderr)


def check_exit_vocab(n: int | None, exits: list[int], vocab: int) -> None:
    """Refuse --exit-vocab without exits or outside 1..vocab, before anything is built."""
    from edgeinfer.errors import ExportError

    if n is None:
        return
    if not exits:
        raise ExportError("--exit-vocab trims the exit head: give the exits with --exits (e.g. 21; the last layer "
                          "gives the whole model a cheaper drafting head).")
    if not isinstance(n, int) or not 1 <= n <= vocab:
        raise ExportError(f"--exit-vocab keeps between 1 and the vocabulary's {vocab} tokens, got {n!r}.")
