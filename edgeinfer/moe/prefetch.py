"""Read-ahead that never loses: the guesses more likely right than wrong, on the tokens where
reading ahead measures faster than not.

The decoder ranks each layer's experts before the layer runs (decoder.py: the layer's router on
the current stream). Two decisions, both from measurements of this run:

- *Which guesses.* Per layer and guess rank, the measured probability p that a guess of that rank
  which was not cached is then chosen (smoothed over tokens; the likely experts are usually cached
  already, so an uncached guess is right less often than the top-k guess as a whole). A guess is
  read when p > 1/2: right more often than wrong. Reads started without threads (the default,
  reads.py) take no slot and evict nothing, so a wrong guess costs disk time and the CPU to start
  it; reader threads never evict the running layer's experts nor their own layer's other guesses
  (cache.py), and demand reads overtake them (reader.py).
- *Whether at all, per token.* What read-ahead saves (waits for records) and what it costs (the
  decode thread's CPU for ranking and starting reads, the disk time wrong guesses take from needed
  reads, another thread or the disk competing with the compute for a busy machine's cores) all end
  up in a token's wall time, and how they weigh depends on the disk, the record size, the budget
  and the machine's load. So the decoder times its tokens with and without read-ahead: the first
  tokens alternate, then each token reads ahead only if the median time of its recent tokens with
  read-ahead is lower than without by more than ``_MARGIN`` (a median: one token preempted on a busy
  machine does not flip the choice; a margin: where the two tie within the noise of a few tokens'
  times, the choice would otherwise follow the noise, and every token spent in the slower mode is
  lost), but now and then takes the other mode, to keep measuring: first after ``_EXPLORE`` tokens,
  then twice as late each time the choice stands (up to one token in ``_EXPLORE_MAX``: where
  read-ahead cannot pay, exploring it is pure cost), at once again when an explored token alone
  would flip it, and often again as soon as it flips. Reading ahead or not changes nothing the cache
  holds (guesses read without threads take no slot), so the two modes see the same cache. A token
  without read-ahead does not even rank its layers' experts.
"""

from __future__ import annotations

from collections import deque

from .cache import ExpertCache
from .reader import ReaderPool

_ALPHA = 0.05  # smoothing of the per-rank hit probabilities (~20 tokens)
_SAMPLES = 7  # token times kept per mode (their median is the mode's time)
_WARMUP = 10  # the first tokens alternate between reading ahead and not
_MARGIN = 0.05  # read ahead only where its tokens measure this much faster than without (a tie is noise)
_EXPLORE = 8  # then one token in this many takes the other mode ...
_EXPLORE_MAX = 128  # ... and each exploration that leaves the choice as it was doubles the interval, up to this
_FETCH_P = 0.5  # a guess is read when it is more likely right than wrong


def _reads_ahead(on_s: float, off_s: float) -> bool:
    """Read ahead when its tokens take less time than without by more than the margin (a tie is noise)."""
    return on_s < (1 - _MARGIN) * off_s


class ReadAhead:
    """Decides, per token, whether to read ahead and, per layer, which guesses; starts their reads (or asks
    the reader pool for them)."""

    def __init__(self, cache: ExpertCache, pool: ReaderPool | None, top_k: int, depth: int | None = None):
        """POOL: reader threads that read guesses into slots; None: reads started by this thread
        (cache.advise)."""
        self.cache, self.pool, self.top_k = cache, pool, top_k
        self.depth = depth or top_k + 2  # guesses considered per layer
        self.p: dict[int, list[float]] = {}
        self.token_s: dict[bool, deque] = {True: deque(maxlen=_SAMPLES), False: deque(maxlen=_SAMPLES)}
        self.tokens = 0
        self.on = True  # this token's mode
        self.every = _EXPLORE  # tokens between explorations of the mode not chosen
        self._countdown = _EXPLORE
        self._exploring = False
        self._chosen: bool | None = None

    def _probs(self, layer: int) -> list[float]:
        if layer not in self.p:  # prior: top-k guesses mostly right, the rest mostly wrong
            self.p[layer] = [0.8] * self.top_k + [0.2] * (self.depth - self.top_k)
        return self.p[layer]

    def start_token(self) -> bool:
        """Whether the token about to be decoded reads ahead (called once per token, before its layers)."""
        n = self.tokens
        self.tokens += 1
        self._exploring = False
        chosen = self._choice()
        if n < _WARMUP or chosen is None:
            self.on = n % 2 == 0
            return self.on
        if chosen != self._chosen:  # the choice flipped: explore often again
            self.every = self._countdown = _EXPLORE
        self._chosen = chosen
        self._countdown -= 1
        self._exploring = self._countdown <= 0
        if self._exploring:
            self._countdown = self.every
        self.on = chosen != self._exploring
        return self.on

    def _choice(self) -> bool | None:
        """Whether to read ahead by the two modes' median token times; None before both were timed."""
        on_s, off_s = self.seconds(True), self.seconds(False)
        return None if on_s is None or off_s is None else _reads_ahead(on_s, off_s)

    def seconds(self, on: bool) -> float | None:
        """The median time of the last tokens decoded with read-ahead ON (or without), None before any."""
        times = sorted(self.token_s[on])
        return (times[(len(times) - 1) // 2] + times[len(times) // 2]) / 2 if times else None

    def observe_token(self, seconds: float) -> None:
        """The token begun with ``start_token`` took SECONDS (wall time)."""
        self.token_s[self.on].append(seconds)
        if not self._exploring:
            return
        on_s, off_s = (seconds, self.seconds(False)) if self.on else (self.seconds(True), seconds)
        if _reads_ahead(on_s, off_s) != self._chosen:  # this token alone would flip it: look again now
            self.every, self._countdown = _EXPLORE, 1
        elif self._choice() == self._chosen:  # the choice stands: explore less often
            self.every = self._countdown = min(2 * self.every, _EXPLORE_MAX)

    def request(self, step: int, layer: int, ranked: list[int],
                needed: tuple[int, list[int]] | None = None) -> frozenset:
        """Read ahead the guesses of RANKED (best first) for LAYER that are more likely right than wrong and not
        cached, behind NEEDED (the running layer and its experts, whose misses are read first, in the same
        submit; without reader threads only); returns the guesses that were not cached (what ``observe``
        learns from: a cached guess needs no read, right or wrong)."""
        p = self._probs(layer)
        guesses = ranked[: self.depth]
        uncached = self.cache.uncached(layer, guesses)
        fetch = [e for r, e in enumerate(guesses) if p[r] > _FETCH_P and e in uncached]
        if self.pool is not None:
            if fetch:
                self.pool.speculate(step, layer, fetch, frozenset(guesses[: self.top_k]) | frozenset(fetch))
        elif fetch or needed:
            running, its_experts = needed or (layer, [])
            self.cache.advise(running, its_experts, layer, fetch)
        return frozenset(uncached)

    def observe(self, layer: int, ranked: list[int], chosen: list[int], uncached: frozenset) -> None:
        """The router chose CHOSEN where RANKED was guessed: update the per-rank probabilities that an uncached
        guess is chosen."""
        p = self._probs(layer)
        for r, e in enumerate(ranked[: self.depth]):
            if e in uncached:
                p[r] += _ALPHA * ((e in chosen) - p[r])
