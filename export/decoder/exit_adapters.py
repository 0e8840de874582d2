"""Exit adapters: a small map per early exit that brings an intermediate
residual stream closer to the final one, fitted in seconds on CPU.

Models not trained for early exit (SmolLM2, Gemma3) have poor raw exits: the
final norm and LM head expect the last layer's residual stream, not layer L's.
An adapter ``h -> h + (h W + b)`` (W full or low rank) is fitted by ridge
least squares so that, on calibration text, it maps the package's own layer-L
states (what the runtime will see, quantization included) to the source
model's final pre-norm states; the shared exit head then applies the final
norm and LM head. Closed form, no gradient steps: a 576-wide model fits each
exit in well under a second once the states are collected.

Calibration data, by default, is the model's own greedy continuations of the
prompts in ``adapter_prompts.txt`` (the text a drafter sees), with 20% of the
prompts held out to report the exit's top-1 agreement with the final layer
before and after the adapter.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
from edgeinfer.export.decoder.graph import HIDDEN_IN, HIDDEN_OUT
from edgeinfer.export.graph.onnx_graph import GraphBuilder
from edgeinfer.export.sources.load import SourceModel

from edgeinfer.errors import ExportError

PROMPTS_FILE = Path(__file__).with_name("adapter_prompts.txt")


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory; each is created, then
    dropped, one at a time) and keep their buffers (rotary tables) on the CPU."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _reference_model(src: SourceModel):
    """The source model in transformers (float32), rebuilt from the loaded weights: the exporter's own
    arrays become its parameters without a copy (a 1.5B model's fit peaked at 21 GB with one)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in src.config.items() if k != "transformers_version"}
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in src.state_dict.items()},
                          strict=False, assign=True)
    model.tie_weights()  # an LM head that shares the embedding's weights
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ExportError(f"the source weights lack {', '.join(missing[:3])}: exit adapters cannot be fitted "
                          "for this model; export it without --exit-adapters.")
    return model.eval().to(torch.float32)


def _final_prenorm_states(hf, ids: list[int]) -> np.ndarray:
    """The residual stream entering the final norm, (len(ids), hidden)."""
    import torch

    seen = {}
    norm = hf.get_decoder().norm if hasattr(hf, "get_decoder") else hf.model.norm
    handle = norm.register_forward_hook(lambda mod, args, out: seen.setdefault("x", args[0].detach()))
    try:
        with torch.no_grad():
            hf(torch.tensor([ids]))
    finally:
        handle.remove()
    return seen["x"][0].numpy().astype(np.float64)


def calibration_sequences(model, texts: list[str] | None, new_tokens: int) -> list[list[int]]:
    """Token sequences to fit on: TEXTS as given, or the model's own greedy continuations of the
    shipped prompts (chat-formatted where the package has a chat template)."""
    if texts:
        seqs = [model.tokenizer.encode(t) for t in texts]
        return [s[: model.max_context] for s in seqs if len(s) > 1]
    seqs = []
    for line in PROMPTS_FILE.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        prompt = [{"role": "user", "content": line.strip()}] if model.tokenizer.chat_template else line.strip()
        ids = model.encode(prompt)
        out = model.complete(ids, max_new_tokens=new_tokens, ignore_eos=True).tokens
        seqs.append(ids + out)
    return seqs


def exit_states(model, seq: list[int], stages: int) -> np.ndarray:
    """The package's residual stream after its first STAGES stages, (len(seq), hidden)."""
    dec = model.decoder
    dec.reset()
    dec.forward(seq, logits_to_keep=1, stages=stages)
    hidden = dec.pending[stages][0].astype(np.float64)
    dec.reset()
    return hidden


def fit_affine(x: np.ndarray, y: np.ndarray, rank: int | None, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """W, b minimising |x + x W + b - y|^2 + ridge * n * mean(x^2) * |W|^2; W truncated to RANK by SVD."""
    n, h = x.shape
    xa = np.concatenate([x, np.ones((n, 1))], axis=1)
    gram = xa.T @ xa
    reg = ridge * np.trace(gram[:h, :h]) / h
    gram[np.arange(h), np.arange(h)] += reg
    sol = np.linalg.solve(gram, xa.T @ (y - x))
    w, b = sol[:h], sol[h]
    if rank is not None and rank < h:
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        w = (u[:, :rank] * s[:rank]) @ vt[:rank]
    return w, b


def adapter_graph(w: np.ndarray, b: np.ndarray, rank: int | None, name: str) -> GraphBuilder:
    """hidden_out = hidden_in + hidden_in @ W + b, with W as two thin factors when low rank."""
    g = GraphBuilder(name)
    h = w.shape[0]
    x = g.input(HIDDEN_IN, "float32", ["batch", "seq", h])
    if rank is not None and rank < h:
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        a = g.initializer(f"{name}.down", (u[:, :rank] * s[:rank]).astype(np.float32))
        c = g.initializer(f"{name}.up", vt[:rank].astype(np.float32))
        delta = g.op1("MatMul", [g.op1("MatMul", [x, a]), c])
    else:
        delta = g.op1("MatMul", [x, g.initializer(f"{name}.weight", w.astype(np.float32))])
    delta = g.op1("Add", [delta, g.initializer(f"{name}.bias", b.astype(np.float32))])
    g.op("Add", [x, delta], outputs=[HIDDEN_OUT])
    g.output(HIDDEN_OUT, "float32", ["batch", "seq", h])
    return g


def _agreement(model, stages: int, hidden: np.ndarray, final_top: np.ndarray, w=None, b=None) -> float:
    h = hidden if w is None else hidden + hidden @ w + b
    logits = model.decoder.exit_logits(h.astype(np.float32))
    return float((logits.argmax(-1) == final_top).mean())


def fit_exit_adapters(package_dir: Path, src: SourceModel, rank: int | None = None,
                      texts: list[str] | None = None, new_tokens: int = 96, ridge: float = 1e-3) -> list[dict]:
    """Fit one adapter per exit of the package in PACKAGE_DIR (already complete, manifest written);
    writes ``graphs/exit_adapter_L.onnx`` and returns {layer, path, rank, agreement before/after}."""
    import edgeinfer

    model = edgeinfer.load(package_dir, verify=False)
    hf = _reference_model(src)
    seqs = calibration_sequences(model, texts, new_tokens)
    if len(seqs) < 2:
        raise ValueError("exit adapters need at least two calibration texts")
    held = max(1, len(seqs) // 5)
    train, test = seqs[:-held], seqs[-held:]
    targets = {id(s): _final_prenorm_states(hf, s) for s in seqs}
    final_top = {}
    for s in test:
        model.decoder.reset()
        final_top[id(s)] = model.decoder.forward(s, logits_to_keep=len(s)).argmax(-1)
    model.decoder.reset()
    out = []
    for layer, stages in sorted(model.decoder.exits.items()):
        x = np.concatenate([exit_states(model, s, stages) for s in train])
        y = np.concatenate([targets[id(s)] for s in train])
        w, b = fit_affine(x, y, rank, ridge)
        xt = np.concatenate([exit_states(model, s, stages) for s in test])
        top = np.concatenate([final_top[id(s)] for s in test])
        rel = f"graphs/exit_adapter_{layer}.onnx"
        adapter_graph(w, b, rank, f"exit_adapter_{layer}").save(package_dir / rel)
        out.append({"layer": layer, "path": rel, "rank": rank or w.shape[0], "train_tokens": len(x),
                    "heldout_tokens": len(xt), "agreement_raw": _agreement(model, stages, xt, top),
                    "agreement_adapted": _agreement(model, stages, xt, top, w, b)})
    return out
