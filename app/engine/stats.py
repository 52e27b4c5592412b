"""Recent per-image service times and refusals, per model: what `model=auto` judges a model by.

The data plane records one sample per image it answers: decode + preprocess + the inference run the
image was part of. Queueing is left out on purpose: the router adds the queue the model has *now*
(its batcher's depth times its recent inference cost per image), which reacts to load at once instead
of after a window of slow samples. A refusal (queue full) is remembered for a moment, so a router that
was just told "no" does not send the next request to the same place.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import numpy as np

WINDOW = 100
MAX_AGE_S = 60.0
MIN_SAMPLES = 5
REFUSAL_MEMORY_S = 1.0


class ServiceStats:
    def __init__(
        self,
        window: int = WINDOW,
        max_age_s: float = MAX_AGE_S,
        min_samples: int = MIN_SAMPLES,
        refusal_memory_s: float = REFUSAL_MEMORY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window, self.max_age_s, self.min_samples = window, max_age_s, min_samples
        self.refusal_memory_s, self.clock = refusal_memory_s, clock
        self._samples: dict[str, collections.deque[tuple[float, float]]] = {}
        self._refused_at: dict[str, float] = {}

    def observe(self, model: str, seconds: float) -> None:
        q = self._samples.get(model)
        if q is None:
            q = self._samples[model] = collections.deque(maxlen=self.window)
        q.append((self.clock(), seconds))

    def refused(self, model: str) -> None:
        self._refused_at[model] = self.clock()

    def recently_refused(self, model: str) -> bool:
        at = self._refused_at.get(model)
        return at is not None and self.clock() - at < self.refusal_memory_s

    def fresh(self, model: str) -> list[float]:
        q = self._samples.get(model)
        if not q:
            return []
        cutoff = self.clock() - self.max_age_s
        while q and q[0][0] < cutoff:
            q.popleft()
        return [s for _, s in q]

    def samples(self, model: str) -> int:
        return len(self.fresh(model))

    def percentile_ms(self, model: str, q: float) -> float | None:
        """Measured q-th percentile in ms, or None when fewer than min_samples fresh samples exist."""
        xs = self.fresh(model)
        if len(xs) < self.min_samples:
            return None
        return float(np.percentile(np.asarray(xs), q)) * 1000.0

    def p95_ms(self, model: str) -> float | None:
        return self.percentile_ms(model, 95)

    def p50_ms(self, model: str) -> float | None:
        return self.percentile_ms(model, 50)

    def snapshot(self) -> dict[str, dict]:
        return {m: {"samples": len(self.fresh(m)), "p95_ms": self.p95_ms(m)} for m in list(self._samples)}
