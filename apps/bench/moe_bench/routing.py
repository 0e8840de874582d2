"""Routing ahead, evaluated: how well each way of guessing layer j's experts before layer j runs
does on real text, per layer and on average (recall of the top-k guess: the share of the experts
the router then chose that were guessed).

- ``stream``: layer j's router on the stream after the previous sparse layer's attention (the
  decoder's default: available one expert-FFN before layer j's attention);
- ``input``: layer j's router on the previous layer's input, before its attention (one more
  attention of lead time);
- ``fitted``: a small extra router per layer (what the exporter could add), fitted by ridge
  regression on calibration text from the previous layer's normalized input to layer j's router
  logits, evaluated on other text;
- ``two-ahead``: layer j's router on the stream two sparse layers back (lead time for deeper
  read-ahead).
"""

from __future__ import annotations

import numpy as np


def _traces(pkg, ids: list[int]) -> dict:
    """Per sparse layer: its input rows, its post-attention stream rows, its chosen experts (prompt path)."""
    from edgeinfer.runtimes import resolve_provider

    from edgeinfer.moe.decoder import MoEDecoder
    from edgeinfer.package import open_package

    dec = MoEDecoder(open_package(pkg, verify=False), resolve_provider("cpu"), max_context=len(ids) + 1,
                     prefetch=False, readers=0)
    out: dict = {}

    def trace(layer, x, stream, experts):
        out[layer] = (x.copy(), stream.copy(), experts.copy())

    dec.trace = trace
    dec.forward(ids)
    dec.close()
    return {"layers": out, "routers": dec.routers, "norms": dec.router_norms, "eps": dec.eps, "top_k": dec.top_k}


def _normed(v: np.ndarray, norm: np.ndarray, eps: float) -> np.ndarray:
    return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * norm


def _recall(scores: np.ndarray, chosen: np.ndarray, k: int) -> float:
    guess = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
    return float(np.mean([len(set(g) & set(c)) / k for g, c in zip(guess.tolist(), chosen.tolist())]))


def evaluate(pkg, fit_ids: list[int], test_ids: list[int], ridge: float = 1e-2) -> dict:
    fit, test = _traces(pkg, fit_ids), _traces(pkg, test_ids)
    k, eps = test["top_k"], test["eps"]
    R, N = test["routers"], test["norms"]
    layers = sorted(test["layers"])
    rows = []
    for a, j in zip(layers, layers[1:]):
        x_a, s_a, _ = test["layers"][a]
        chosen = test["layers"][j][2]
        row = {"layer": j,
               "stream": _recall(_normed(s_a, N[j], eps) @ R[j].T, chosen, k),
               "input": _recall(_normed(x_a, N[j], eps) @ R[j].T, chosen, k)}
        fx, _, _ = fit["layers"][a]
        fj = fit["layers"][j]
        # target: layer j's router logits on its own (post-attention, normalized) input, on the fit text
        target = _normed(fj[1], N[j], eps) @ R[j].T
        X = _normed(fx, N[j], eps)
        X1 = np.concatenate([X, np.ones((len(X), 1), X.dtype)], axis=1)
        W = np.linalg.solve(X1.T @ X1 + ridge * len(X1) * np.eye(X1.shape[1]), X1.T @ target)
        Xt = np.concatenate([_normed(x_a, N[j], eps), np.ones((len(x_a), 1), x_a.dtype)], axis=1)
        row["fitted"] = _recall(Xt @ W, chosen, k)
        prev = layers[layers.index(a) - 1] if layers.index(a) > 0 else None
        if prev is not None:
            row["two_ahead"] = _recall(_normed(test["layers"][prev][1], N[j], eps) @ R[j].T, chosen, k)
        rows.append(row)
    mean = {key: float(np.mean([r[key] for r in rows if key in r])) for key in ("stream", "input", "fitted",
                                                                              "two_ahead")}
    return {"per_layer": rows, "mean": mean, "fit_tokens": len(fit_ids), "test_tokens": len(test_ids),
            "chance": k / R.shape[1]}


def routing_ahead(model: str, tokens: int = 400) -> dict:
    """The evaluation on one benchmark model: fitted on the exporter's calibration text, tested on this
    repository's docs (MoEfied: real routing) or random tokens (random models)."""
    from edgeinfer.export.quant.calibrate import calibration_samples

    from .decode import real_text_ids
    from .models import MODELS

    pkg = MODELS[model]
    tok_json = (pkg / "tokenizer.json").read_text()
    fit = [t for s in calibration_samples(tok_json, None, 4096) for t in s][:tokens]
    if model.startswith("moefied"):
        test = real_text_ids(pkg, tokens)
    else:
        import json

        vocab = json.loads((pkg / "edgeinfer.json").read_text())["architecture"]["vocab_size"]
        test = np.random.default_rng(1234).integers(3, vocab, size=tokens).tolist()
    return {"model": model, **evaluate(pkg, fit, test)}
