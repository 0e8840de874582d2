"""Perplexity and top-1 agreement of a package on a text: ``edgeinfer perplexity``.

The counterpart of llama.cpp's ``llama-perplexity``, with the windowing rule written down so
that every engine can be scored the same way:

- The text is tokenized once by the package's tokenizer without special tokens and cut into
  consecutive, non-overlapping windows of ``context`` tokens. If the tokenizer puts a BOS token in
  front of a prompt (what ``edgeinfer run`` feeds the model), every window starts with that BOS
  followed by ``context - 1`` text tokens; otherwise a window is ``context`` text tokens. A tail
  shorter than a full window is left out.
- Each window is evaluated from an empty KV cache, in one batched pass.
- ``scoring="all"`` (the default) scores every prediction of a text token that has at least one
  token before it in the window: ``context - 1`` predictions per window. ``scoring="second-half"``
  is llama-perplexity's rule: only the predictions of the window's second half (positions
  ``context // 2`` .. ``context - 1``), each of which sees at least half a window of context.
- Perplexity is ``exp(mean negative log-likelihood)`` over all scored predictions, with the
  log-softmax taken in float64. Top-1 agreement with another package is the fraction of scored
  positions where both argmaxes are the same token (same windows, same token ids).

Only numpy and onnxruntime: a logits source is any callable ``window ids -> (len, vocab) logits``,
so a peer (llama.cpp in apps/bench/quality.py) is scored by exactly this code.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import EvaluationError

SCORING = ("all", "second-half")
LogitsFn = Callable[[list[int]], np.ndarray]
_ROWS = 32  # log-softmax in float64 this many rows at a time: bounded memory for a 262k vocabulary


def read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of PATH, or an EvaluationError saying why it cannot be read."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvaluationError(f"text file '{p}' does not exist: give the path of a UTF-8 text file.") from None
    except IsADirectoryError:
        raise EvaluationError(f"'{p}' is a folder, not a text file: give the path of a UTF-8 text file.") from None
    except UnicodeDecodeError as e:
        raise EvaluationError(f"text file '{p}' is not UTF-8 text (byte {e.start}): convert it to UTF-8.") from None
    except OSError as e:
        raise EvaluationError(f"text file '{p}' cannot be read ({e.strerror}): check its permissions.") from None


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis, in float64."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def adds_bos(tokenizer) -> int | None:
    """The BOS id the package's tokenizer puts in front of a prompt, None if it adds none."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = tokenizer.encode("a", add_special_tokens=True)
    plain = tokenizer.encode("a", add_special_tokens=False)
    return bos if with_special[:1] == [bos] and plain[:1] != [bos] else None


def make_windows(text_ids: Sequence[int], context: int, bos: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of CONTEXT tokens over TEXT_IDS (each led by BOS if given); the
    incomplete tail is dropped. Raises EvaluationError if not even one window fits."""
    if context < 2:
        raise EvaluationError(f"--context must be at least 2 tokens (got {context}).")
    step = context - (bos is not None)
    n = len(text_ids) // step
    if n == 0:
        raise EvaluationError(f"the text has {len(text_ids)} tokens, fewer than one window of {step} "
                              f"text tokens (--context {context}): give a longer text or a smaller --context.")
    lead = [bos] if bos is not None else []
    return [lead + list(text_ids[i * step:(i + 1) * step]) for i in range(n)]


def first_scored(context: int, scoring: str) -> int:
    """Index of the first logits row of a window that is scored (it predicts the next token)."""
    if scoring not in SCORING:
        raise EvaluationError(f"unknown scoring '{scoring}': choose one of {', '.join(SCORING)}.")
    return 0 if scoring == "all" else context // 2


@dataclass
class WindowScores:
    """Per scored position: negative log-likelihood of the true next token and the argmax token."""

    nll: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    argmax: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    seconds: float = 0.0  # time spent computing logits
    tokens_fed: int = 0

    @property
    def perplexity(self) -> float:
        return float(math.exp(self.nll.mean()))

    def agreement(self, other: WindowScores) -> float:
        if other.argmax.shape != self.argmax.shape:
            raise EvaluationError("the two scores cover different positions: score the same windows.")
        return float((self.argmax == other.argmax).mean())


def score_logits(logits: np.ndarray, window: Sequence[int], first: int) -> tuple[np.ndarray, np.ndarray]:
    """NLL (float64) and argmax of logits rows FIRST .. len-2 of WINDOW, each predicting the next token."""
    logits = np.asarray(logits)
    n = len(window)
    if logits.ndim != 2 or logits.shape[0] != n:
        raise EvaluationError(f"expected {n} rows of logits for a window of {n} tokens, got shape "
                              f"{tuple(logits.shape)}.")
    targets = np.asarray(window[first + 1:], dtype=np.int64)
    rows = logits[first:n - 1]
    nll = np.empty(len(targets), np.float64)
    for s in range(0, len(targets), _ROWS):
        lp = log_softmax(rows[s:s + _ROWS])
        nll[s:s + _ROWS] = -lp[np.arange(len(lp)), targets[s:s + _ROWS]]
    return nll, rows.argmax(-1).astype(np.int64)


def score_windows(logits_fn: LogitsFn, windows: list[list[int]], scoring: str = "all",
                  progress: bool | None = None, desc: str = "perplexity") -> WindowScores:
    """Run LOGITS_FN on every window and score it with SCORING (see the module docstring)."""
    first = first_scored(len(windows[0]), scoring)
    nll, arg, seconds = [], [], 0.0
    bar = _progress_bar(len(windows), desc, progress)
    try:
        for w in windows:
            t0 = time.perf_counter()
            logits = logits_fn(w)
            seconds += time.perf_counter() - t0
            a, b = score_logits(logits, w, first)
            nll.append(a)
            arg.append(b)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"ppl {math.exp(np.concatenate(nll).mean()):.2f}")
    finally:
        if bar is not None:
            bar.close()
    return WindowScores(np.concatenate(nll), np.concatenate(arg), seconds, sum(len(w) for w in windows))


def model_logits(model) -> LogitsFn:
    """A logits source for an edgeinfer Model: each window from an empty cache, in one batched pass."""
    def run(window: list[int]) -> np.ndarray:
        model.reset()
        try:
            return np.asarray(model.decoder.forward(window, logits_to_keep=len(window)))
        finally:
            model.reset()
    return run


def decode_path_argmax(model, ids: Sequence[int], window: int = 128, lead: int = 4) -> np.ndarray:
    """Teacher-forced argmax through the one-token decode path: each WINDOW of IDS from an empty cache,
    its first LEAD tokens prefilled, the rest fed one step at a time, so that every prediction reads
    what the cache stored (a batched pass can attend to fresh keys and values instead: an fp16 cache
    changes no prefill logit). Predictions of positions LEAD..WINDOW-1 of each full window."""
    preds = []
    for start in range(0, len(ids) - window + 1, window):
        w = [int(t) for t in ids[start:start + window]]
        model.reset()
        try:
            model.decoder.forward(w[:lead])
            preds += [int(np.argmax(model.decoder.step(t))) for t in w[lead:]]
        finally:
            model.reset()
    return np.array(preds, dtype=np.int64)


def check_same_vocabulary(model, other) -> None:
    """EvaluationError unless MODEL and OTHER tokenize alike and have the same output vocabulary."""
    a, b = model.tokenizer, other.tokenizer
    if a.tokenizer.get_vocab() != b.tokenizer.get_vocab() or a.bos_token_id != b.bos_token_id:
        raise EvaluationError(f"'{_label(other)}' has a different tokenizer than '{_label(model)}': top-1 agreement "
                              "needs two packages of the same vocabulary (e.g. two precisions of one model).")
    if model.decoder.vocab_size != other.decoder.vocab_size:
        raise EvaluationError(f"'{_label(other)}' has {other.decoder.vocab_size} logits and '{_label(model)}' "
                              f"{model.decoder.vocab_size}: top-1 agreement needs the same output vocabulary.")


@dataclass
class PerplexityReport:
    package: str
    context: int
    scoring: str
    windows: int
    scored_tokens: int
    perplexity: float
    mean_nll: float
    seconds: float
    tokens_per_s: float  # tokens fed through the model per second of logits computation
    bos: bool
    against: str | None = None
    against_perplexity: float | None = None
    top1_agreement: float | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def summary(self) -> str:
        s = (f"{self.package}: perplexity {self.perplexity:.3f} over {self.scored_tokens} scored tokens "
             f"({self.windows} windows of {self.context}, scoring {self.scoring}), {self.tokens_per_s:.0f} tok/s")
        if self.against is not None:
            s += (f"\n  against {self.against}: perplexity {self.against_perplexity:.3f}, "
                  f"top-1 agreement {self.top1_agreement:.4f}")
        return s


def evaluate(model, text: str, context: int = 256, against=None, scoring: str = "all",
             progress: bool | None = None) -> PerplexityReport:
    """Perplexity of MODEL (an edgeinfer Model) on TEXT, and top-1 agreement with AGAINST (another
    Model of the same tokenizer) if given. PROGRESS: None = a tqdm bar on a terminal only."""
    for m in (model, against):
        if m is not None and getattr(m, "kind", "decoder") != "decoder":
            raise EvaluationError(f"'{_label(m)}' is an encoder-decoder package: perplexity is computed for "
                                  "decoder-only language models.")
    if against is not None:
        check_same_vocabulary(model, against)
    capacity = min(model.max_context, against.max_context if against is not None else model.max_context)
    if context > capacity:
        raise EvaluationError(f"--context {context} is more than the {capacity} tokens the package holds: "
                              "choose a smaller --context or re-export with a larger --max-context.")
    bos = adds_bos(model.tokenizer)
    windows = make_windows(model.tokenizer.encode(text, add_special_tokens=False), context, bos)
    mine = score_windows(model_logits(model), windows, scoring, progress, desc=_label(model))
    rep = PerplexityReport(
        package=_label(model), context=context, scoring=scoring, windows=len(windows), scored_tokens=len(mine.nll),
        perplexity=mine.perplexity, mean_nll=float(mine.nll.mean()), seconds=mine.seconds,
        tokens_per_s=mine.tokens_fed / mine.seconds if mine.seconds else 0.0, bos=bos is not None)
    if against is not None:
        theirs = score_windows(model_logits(against), windows, scoring, progress, desc=_label(against))
        rep.against, rep.against_perplexity = _label(against), theirs.perplexity
        rep.top1_agreement = mine.agreement(theirs)
    return rep


def _label(model) -> str:
    pkg = getattr(model, "package", None)
    return str(pkg.root) if pkg is not None and hasattr(pkg, "root") else model.name


def _progress_bar(total: int, desc: str, enabled: bool | None):
    if enabled is False or (enabled is None and not sys.stderr.isatty()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional in the runtime
        return None
    return tqdm(total=total, desc=desc, unit="window", file=sys.stderr, leave=False)
