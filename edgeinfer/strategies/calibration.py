"""Calibrating a big/little pair (``edgeinfer calibrate``): the settings each strategy uses by default.

On a short calibration text (a few prompts, shipped in ``calibration_prompts.txt``, or the user's, each
continued for NEW_TOKENS tokens):

- the big model's own greedy continuations are the reference;
- quality of a strategy's output = PPL_big(reference) / PPL_big(output), PPL_big the big model's perplexity
  of the generated tokens (the measure of the EAD and BiLD papers: how likely the big model finds the text;
  1.0 = as good as its own greedy text); a setting *meets* the target QUALITY when it does at CONFIDENCE
  (90%: a bootstrap over the prompts), not only on average: on a few prompts one or two confident errors of
  the little model more or less move the mean by a percent or more;
- EAD: whose entropy decides (the writing model's, as in the paper, or the little model's at every
  position), the rolling window (1, 3, 5 tokens) and ``tau`` (a 0.05 grid), the combination with the
  smallest big-model share that meets QUALITY when EAD's rule is replayed along the reference (teacher-forced,
  seconds: it follows real generation closely); then one real generation at that setting, and a bisection
  over a coarser grid below it should real generation fall short;
- BiLD's fallback threshold (at a fixed rollback threshold): the smallest whose output meets QUALITY
  (quality rises with it: the big model takes over sooner), by real generation;
- speculative decoding's cost model: the measured cost of a draft and of a verifying pass per number of
  rows, and the acceptance per draft position along the reference (:mod:`.cost_model`).

Every evaluation decodes the whole calibration text, so the search is a handful of runs of under a thousand
tokens: minutes on a laptop CPU for a 0.5B/1.5B pair.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cost_model import CostModel, run_lengths
from .ead import ENTROPY_OF
from .pair import drafting_head
from .pair_file import PairSettings, package_identity

PROMPTS_FILE = Path(__file__).with_name("calibration_prompts.txt")
TAU_GRID = (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0)
FALLBACK_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
ROLLBACK = 3.0  # nats: BiLD's rollback threshold while its fallback threshold is calibrated
NEW_TOKENS = 96  # tokens per calibration prompt (cli/calibrate.py's default too): 8 x 32 held too few errors
CONFIDENCE = 0.9  # a setting meets the target when it does at this confidence (a bootstrap over the prompts)
TAU_STEP = 0.05  # EAD's tau is chosen on this grid by the replay
WINDOWS = (1, 3, 5)  # EAD's rolling-entropy windows tried (in a teacher-forced replay)
RULES = tuple((who, w) for who in ENTROPY_OF for w in WINDOWS)  # EAD's (whose entropy decides, window) tried


def calibration_prompts(path: str | Path | None = None) -> list[str]:
    """One prompt per non-empty line of PATH (default: the shipped calibration prompts)."""
    text = Path(path or PROMPTS_FILE).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def assured_quality(extra_nll, tokens, confidence: float = CONFIDENCE, draws: int = 1000) -> float:
    """The quality exp(-sum(EXTRA_NLL) / sum(TOKENS)) of a text made of several prompts' outputs, as a lower
    bound at CONFIDENCE: the (1 - CONFIDENCE) quantile over bootstrap resamples of the prompts (seeded, so the
    same measurements give the same bound). A few prompts decide a mean: one or two confident errors more or
    less move it by a percent or more."""
    extra, n = np.asarray(extra_nll, np.float64), np.asarray(tokens, np.float64)
    picks = np.random.default_rng(0).integers(0, len(extra), (draws, len(extra)))
    return float(np.quantile(np.exp(-extra[picks].sum(1) / n[picks].sum(1)), 1 - confidence))


@dataclass
class Evaluation:
    """One strategy setting run over the calibration prompts: its quality (the mean over all tokens) and that
    quality assured at CONFIDENCE (what the search compares with the target)."""

    setting: dict
    quality: float
    assured: float
    big_share: float
    seconds: float
    tokens: int


@dataclass
class Calibration:
    big: object  # edgeinfer Model
    little: object
    prompts: list[str]
    new_tokens: int = NEW_TOKENS
    log: object = None  # callable(str) for progress lines
    ids: list[list[int]] = field(default_factory=list)
    reference: list[list[int]] = field(default_factory=list)
    reference_nlls: list[float] = field(default_factory=list)  # per prompt, of the big model's own greedy text
    reference_s: float = 0.0
    evaluations: list[Evaluation] = field(default_factory=list)

    def __post_init__(self):
        self.big.attach_little(self.little)
        self.ids = [self.big.encode(self._message(p)) for p in self.prompts]
        t0 = time.perf_counter()
        self.reference = [self.big.complete(i, max_new_tokens=self.new_tokens, ignore_eos=True).tokens
                          for i in self.ids]
        self.reference_s = time.perf_counter() - t0
        self.reference_nlls = [self.nll(i, r) for i, r in zip(self.ids, self.reference)]

    def _message(self, prompt: str):
        return [{"role": "user", "content": prompt}] if self.big.tokenizer.chat_template else prompt

    def say(self, line: str) -> None:
        if self.log:
            self.log(line)

    def nll(self, ids: list[int], out: list[int]) -> float:
        """Sum of -log p_big(out[i] | ids + out[:i])."""
        dec = self.big.decoder
        dec.reset()
        logits = dec.forward(ids + out[:-1], logits_to_keep=len(out)).astype(np.float64)
        dec.reset()
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        return float(-logp[np.arange(len(out)), out].sum())

    def evaluate(self, strategy: str, **options) -> Evaluation:
        tokens = big = 0
        seconds = 0.0
        extra = []  # per prompt: NLL under the big model beyond its own greedy text's
        for ids, ref_nll in zip(self.ids, self.reference_nlls):
            t0 = time.perf_counter()
            res = self.big.complete(ids, max_new_tokens=self.new_tokens, ignore_eos=True, strategy=strategy,
                                    **options)
            seconds += time.perf_counter() - t0
            tokens += res.new_tokens
            big += res.stats["tokens"]["big"]
            extra.append(self.nll(ids, res.tokens) - ref_nll)
        lengths = [len(r) for r in self.reference]
        ev = Evaluation(dict(options), math.exp(-sum(extra) / sum(lengths)), assured_quality(extra, lengths),
                        big / max(1, tokens), seconds, tokens)
        self.evaluations.append(ev)
        self.say(f"  {strategy} {options}: quality {ev.quality:.3f} ({ev.assured:.3f} at {CONFIDENCE:.0%} "
                 f"confidence), big model on {100 * ev.big_share:.0f}% of tokens, {ev.tokens / ev.seconds:.1f} tok/s")
        return ev

    def search(self, strategy: str, key: str, grid, target: float, rising: bool, **fixed) -> tuple[float, Evaluation]:
        """The grid value furthest towards the little model whose assured quality still meets TARGET, by
        bisection. RISING: quality rises along GRID (BiLD's fallback), else falls (EAD's tau)."""
        grid = list(grid) if rising else list(grid)[::-1]  # now quality rises along grid: want the first ok
        lo, hi = -1, len(grid) - 1  # grid[lo] known to fail; grid[hi], the most careful, assumed ok (unmeasured:
        results: dict[int, Evaluation] = {}  # it is all but the big model alone)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            ev = self.evaluate(strategy, **fixed, **{key: grid[mid]})
            results[mid] = ev
            if ev.assured >= target:
                hi = mid
            else:
                lo = mid
        if hi not in results:  # every other setting fell short: measure the most careful one (it may too)
            results[hi] = self.evaluate(strategy, **fixed, **{key: grid[hi]})
        return grid[hi], results[hi]


def measure_pair_costs(big_decoder, little_decoder, ids: list[int], max_rows: int = 9,
                       repeats: int = 7) -> tuple[float, dict[int, float]]:
    """Median seconds of a little step, and of a big pass over 1..MAX_ROWS rows after IDS, interleaved."""
    bd, ld = big_decoder, little_decoder
    bd.reset()
    ld.reset()
    bd.forward(ids, logits_to_keep=1)
    ld.forward(ids, logits_to_keep=1)
    n = len(ids)
    toks = (ids * max_rows)[-max_rows:]
    draft: list[float] = []
    verify: dict[int, list[float]] = {r: [] for r in range(1, max_rows + 1)}
    head = drafting_head(ld)
    ld.set_exit_context(ids)
    for _ in range(repeats):
        t0 = time.perf_counter()
        for t in toks[:4]:
            if head is None:
                ld.step(t)
            else:  # drafts go through the little model's drafting head (pair.Track does the same)
                ld.exit_logits(ld.step_partial(t, head)[None], head)
                ld.pending[head] = None
        draft.append((time.perf_counter() - t0) / 4)
        ld.truncate(n)
        for r in range(1, max_rows + 1):
            t0 = time.perf_counter()
            if r == 1:
                bd.step(toks[0])
            else:
                bd.forward(toks[:r], logits_to_keep=r)
            verify[r].append(time.perf_counter() - t0)
            bd.truncate(n)
    bd.reset()
    ld.reset()
    return statistics.median(draft), {r: statistics.median(v) for r, v in verify.items()}


def teacher_forced(cal: Calibration) -> list[dict]:
    """Along each reference: the little model's greedy token and entropy given the big model's prefix (through
    its drafting head if it has one), and the big model's entropy and log-probability of that token."""
    from .pair import entropy

    out = []
    for ids, ref in zip(cal.ids, cal.reference):
        rows = {}
        for name, dec, stages in (("little", cal.little.decoder, drafting_head(cal.little.decoder)),
                                  ("big", cal.big.decoder, None)):
            dec.reset()
            dec.set_exit_context(ids)  # a VocabTrim drafting head also scores the prompt's tokens
            rows[name] = dec.forward(ids + ref[:-1], logits_to_keep=len(ref), stages=stages)
            dec.reset()
        little = rows["little"].argmax(-1)
        big = rows["big"].astype(np.float64)
        big -= big.max(-1, keepdims=True)
        logp = big[np.arange(len(ref)), little] - np.log(np.exp(big).sum(-1))
        out.append({"agree": [int(a) == b for a, b in zip(little, ref)],
                    "little_entropy": [entropy(r) for r in rows["little"]],
                    "big_entropy": [entropy(r) for r in rows["big"]], "big_logprob_of_little": logp.tolist()})
    return out


def acceptance_along(trace: list[dict], max_k: int = 8) -> list[float]:
    """α_j along the references: the little model's greedy token against the big model's, given the big prefix."""
    counts = np.zeros((max_k, 2))
    for t in trace:
        runs = run_lengths(t["agree"])
        for j in range(1, max_k + 1):
            counts[j - 1] += [sum(r >= j for r in runs), sum(r >= j - 1 for r in runs)]
    return (counts[:, 0] / np.maximum(counts[:, 1], 1)).tolist()


def replay_ead(trace: list[dict], tau: float, window: int, min_hold: int = 1,
               entropy_of: str = "writer") -> tuple[float, float]:
    """EAD's switching rule replayed along the references (teacher-forced): (big share, quality), quality
    approximated as exp(-mean extra NLL under the big model of the little model's differing tokens).
    ENTROPY_OF: whose rolling entropy decides (edgeinfer/strategies/ead.py)."""
    per = [_replay_prompt(t, tau, window, min_hold, entropy_of) for t in trace]
    n = max(1, sum(p[2] for p in per))
    return sum(p[0] for p in per) / n, math.exp(-sum(p[1] for p in per) / n)


def _replay_prompt(t: dict, tau: float, window: int, min_hold: int, entropy_of: str) -> tuple[int, float, int]:
    """(tokens the big model writes, extra NLL of the little model's differing tokens, tokens) along one reference."""
    big, extra = 0, 0.0
    writers = (_writers_by_little if entropy_of == "little" else _writers_by_writer)(t, tau, window, min_hold)
    for i, writer in enumerate(writers):
        if writer == "big":
            big += 1
        elif not t["agree"][i]:
            extra -= t["big_logprob_of_little"][i]
    return big, extra, len(t["agree"])


def _writers_by_writer(t: dict, tau: float, window: int, min_hold: int):
    """Who writes each position under the paper's rule: the writing model's rolling entropy decides."""
    ent: deque[float] = deque(maxlen=window)
    active, held = "little", 0
    for i in range(len(t["agree"])):
        if active == "little":
            ent.append(t["little_entropy"][i])
            if sum(ent) / len(ent) <= tau:
                yield "little"
                continue
            active, held = "big", 0
            ent.clear()
        yield "big"
        held += 1
        ent.append(t["big_entropy"][i])
        if held >= min_hold and sum(ent) / len(ent) <= tau:
            active = "little"
            ent.clear()


def _writers_by_little(t: dict, tau: float, window: int, min_hold: int):
    """Who writes each position when the little model's rolling entropy alone decides."""
    ent: deque[float] = deque(maxlen=window)
    active, held = "little", 0
    for i in range(len(t["agree"])):
        ent.append(t["little_entropy"][i])
        to = "big" if active == "big" and held < min_hold or sum(ent) / len(ent) > tau else "little"
        if to != active:
            active, held = to, 0
        held += 1
        yield active


def replay_tau(trace: list[dict], target: float, entropy_of: str, window: int) -> float | None:
    """EAD's largest tau (on a TAU_STEP grid, scanned upwards until the first miss) whose replayed quality meets
    TARGET at CONFIDENCE over the references; None when even the smallest misses it. The replay follows real
    generation closely (docs/big-little.md: share equal, quality within 0.012 on 24 prompts)."""
    return _replay_tau_and_share(trace, target, entropy_of, window)[0]


def _replay_tau_and_share(trace: list[dict], target: float, entropy_of: str, window: int) -> tuple[float | None, float]:
    """replay_tau's tau and the big-model share the replay gives at it (1.0 when no tau meets TARGET)."""
    best, share = None, 1.0
    for tau in np.arange(TAU_STEP, 6.0 + TAU_STEP / 2, TAU_STEP):
        tau = round(float(tau), 2)
        per = [_replay_prompt(t, tau, window, 1, entropy_of) for t in trace]
        if assured_quality([p[1] for p in per], [p[2] for p in per]) < target:
            break
        best, share = tau, sum(p[0] for p in per) / max(1, sum(p[2] for p in per))
    return best, share


def ead_by_replay(trace: list[dict], target: float) -> tuple[str, int, float | None]:
    """EAD's (whose entropy decides, rolling window, tau) with the smallest big-model share among the RULES,
    each at its replay_tau."""
    shares = {(e, w): _replay_tau_and_share(trace, target, e, w) for e, w in RULES}
    (entropy_of, window), (tau, _) = min(shares.items(), key=lambda item: item[1][1])
    return entropy_of, window, tau


def calibrate_pair(big, little, quality: float = 0.95, prompts: list[str] | None = None,
                   new_tokens: int = NEW_TOKENS,
                   rollback: float = ROLLBACK, log=None) -> PairSettings:
    """Measure the pair on the calibration prompts and choose EAD's tau, BiLD's thresholds and the
    speculative cost model (see the module's docstring). BIG and LITTLE are loaded edgeinfer models."""
    cal = Calibration(big, little, prompts or calibration_prompts(), new_tokens, log)
    cal.say(f"reference: {len(cal.prompts)} prompts x {new_tokens} tokens by the big model alone "
            f"({sum(map(len, cal.reference)) / cal.reference_s:.1f} tok/s)")
    trace = teacher_forced(cal)
    entropy_of, window, tau = ead_by_replay(trace, quality)
    cal.say(f"EAD: the {entropy_of} model's entropy, rolling window {window}, tau {tau} (of {', '.join(ENTROPY_OF)} x "
            f"{', '.join(map(str, WINDOWS))}: the smallest big-model share at the target, {CONFIDENCE:.0%} assured, "
            "in a teacher-forced replay)")
    little_alone = cal.evaluate("ead", tau=1e9)  # tau never reached: the little model writes every token
    ead = None if tau is None else cal.evaluate("ead", tau=tau, window=window, entropy_of=entropy_of)
    if ead is None or ead.assured < quality:  # real generation falls short of the replay: search below it
        lower = [t for t in TAU_GRID if tau is None or t < tau] or [0.0]
        tau, ead = cal.search("ead", "tau", lower, quality, rising=False, window=window, entropy_of=entropy_of)
    fallback, bild = cal.search("bild", "fallback_threshold", FALLBACK_GRID, quality, rising=True,
                                rollback_threshold=rollback)
    draft_s, verify_s = measure_pair_costs(big.decoder, little.decoder, cal.ids[0] + cal.reference[0])
    model = CostModel(draft_s, verify_s, acceptance_along(trace))
    k, speedup = model.best()
    cal.say(f"speculative: draft {1e3 * draft_s:.1f} ms, one-row pass {1e3 * verify_s[1]:.1f} ms; acceptance by "
            f"position {' '.join(f'{a:.2f}' for a in model.acceptance)}; best fixed draft length {k}: "
            f"{speedup:.2f}x by the cost model")
    measured = {
        "prompts": len(cal.prompts), "new_tokens": new_tokens,
        "reference_tok_s": sum(map(len, cal.reference)) / cal.reference_s,
        "little_alone": {"quality": little_alone.quality},
        "ead": {"tau": tau, "window": window, "entropy_of": entropy_of, "quality": ead.quality,
                "assured_quality": ead.assured, "big_share": ead.big_share, "meets_target": ead.assured >= quality},
        "bild": {"fallback_threshold": fallback, "rollback_threshold": rollback, "quality": bild.quality,
                 "assured_quality": bild.assured, "big_share": bild.big_share, "meets_target": bild.assured >= quality},
        "speculative": {"best_fixed_draft_len": k, "modelled_speedup": speedup},
        "evaluations": [{"setting": e.setting, "quality": e.quality, "assured_quality": e.assured,
                         "big_share": e.big_share,
                         "tok_s": e.tokens / e.seconds} for e in cal.evaluations],
    }
    return PairSettings(big={"name": big.package.root.name, "identity": package_identity(big.package)},
                        little={"name": little.package.root.name, "identity": package_identity(little.package)},
                        quality_target=quality, tau=tau, window=window, entropy_of=entropy_of,
                        fallback_threshold=fallback, rollback_threshold=rollback,
                        cost_model=model, measured=measured)
