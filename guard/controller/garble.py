"""The garble check: a resample the model itself finds far less likely than its first attempt is suspect.

After a firing, a resample (first token banned, lower temperature, steering) can drift out of the
text a monitor was trained on: a probe fit on fluent answers may stay silent on garbled text that
still carries the hazard. The model's own surprisal says when that happens, at no extra forward
pass: for every sampled answer token the engine reports ``-log p(token)`` under the model's plain
next-token distribution (temperature 1, nothing banned), see :attr:`guard.engine.base.StepOutput.surprisal`.

Contract: the *reference* is the mean surprisal of every token the first attempt sampled (kept
and discarded: text the model wrote freely for this prompt). A resample is checked once, over its
first ``window`` tokens (fewer when the answer ends sooner), leaving out its first token when the
strategy banned one there (that token is off the model's mode by construction). It is *suspect*
when its mean exceeds the reference by more than ``margin`` nats, i.e. its tokens are on average
``e**margin`` times less likely to the model than those it wrote unprompted. An engine that does
not report surprisal (``None``) switches the check off for the generation.
"""

from __future__ import annotations

from typing import NamedTuple

from guard.monitors.base import AggregationSpec, Monitor


class GarbleVerdict(NamedTuple):
    """The outcome of checking one resample."""

    mean_surprisal: float
    """Mean surprisal (nats per token) of the checked resampled tokens."""
    reference: float
    """Mean surprisal of the first attempt's tokens."""
    tokens: int
    """Resampled tokens checked."""
    suspect: bool
    """``mean_surprisal > reference + margin``."""


class SurprisalTracker:
    """Per-generation surprisal bookkeeping; positions are answer (output) indices."""

    def __init__(self, margin: float | None, window: int) -> None:
        self.margin, self.window = margin, window
        self.reference: list[float] = []
        self.current: dict[int, float] = {}
        self.start: int | None = None
        """First position of the current resample; ``None`` during the first attempt."""
        self.skip_first = False
        self.checked = False
        self.available = margin is not None

    def sampled(self, pos: int, surprisal: float | None) -> None:
        """Note the surprisal of the token just sampled at ``pos``."""
        if surprisal is None:
            self.available = False
            return
        if self.start is None:
            self.reference.append(surprisal)
        self.current[pos] = surprisal

    def resampling(self, point: int, banned_first: bool) -> None:
        """A rollback to ``point`` starts a resample (``banned_first``: its first draw had a ban)."""
        self.current = {p: s for p, s in self.current.items() if p < point}
        self.start, self.skip_first, self.checked = point, banned_first, False

    def check(self, length: int, finishing: bool) -> GarbleVerdict | None:
        """Check the current resample once enough of it exists (or it is finishing); ``None`` if not
        checked now."""
        if (
            not self.available
            or self.margin is None
            or self.start is None
            or self.checked
            or not self.reference
        ):
            return None
        lo = self.start + (1 if self.skip_first else 0)
        vals = [self.current[p] for p in range(lo, length) if p in self.current]
        if len(vals) < self.window and not finishing:
            return None
        self.checked = True
        if not vals:
            return None
        mean, ref = sum(vals) / len(vals), sum(self.reference) / len(self.reference)
        return GarbleVerdict(mean, ref, len(vals), mean > ref + self.margin)


class GarbleMonitor(Monitor):
    """Stands for the garble check in firings, discarded spans and reset events; it scores nothing."""

    def __init__(self, margin: float) -> None:
        self.name, self.layer, self.threshold = "garble", None, float(margin)
        self.aggregation = AggregationSpec("none")

    def score(self, hidden, token_ids):  # pragma: no cover - never bound as a monitor
        raise NotImplementedError("the garble check is run by the controller, not scored")
