"""Top-k accuracy, Wilson score intervals and a confusion summary. numpy only."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for k successes in n trials, as fractions in [0, 1]; None when n = 0.

    Unlike the normal approximation p ± z·sqrt(p(1-p)/n) it stays inside [0, 1] and does not
    collapse to a zero-width interval at 0/n or n/n, which is what small evaluation sets give.
    """
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must lie in [0, n={n}]")
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # Clamp float noise; at k = 0 (k = n) the exact lower (upper) bound is 0 (1).
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def topk(logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest logits per row, best first: [n, k]."""
    k = min(k, logits.shape[1])
    part = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(logits, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


@dataclass
class Tally:
    """Running counts over scored images (images that could not be read are not scored)."""

    n: int = 0
    top1: int = 0
    top5: int = 0
    mistakes: Counter = field(default_factory=Counter)  # (true, predicted) -> count, top-1 mistakes
    per_class: Counter = field(default_factory=Counter)  # true -> images
    per_class_top1: Counter = field(default_factory=Counter)  # true -> correct top-1

    def add(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Score a batch; returns the top-5 predictions [n, 5]."""
        pred = topk(logits, 5)
        for row, label in zip(pred, labels.tolist()):
            self.n += 1
            self.per_class[label] += 1
            if row[0] == label:
                self.top1 += 1
                self.per_class_top1[label] += 1
            else:
                self.mistakes[(label, int(row[0]))] += 1
            if label in row:
                self.top5 += 1
        return pred

    def summary(self) -> dict:
        def pct(k: int) -> float | None:
            return round(100.0 * k / self.n, 2) if self.n else None

        def ci(k: int) -> list[float] | None:
            bounds = wilson(k, self.n)
            return [round(100.0 * b, 2) for b in bounds] if bounds else None

        return {
            "size": self.n,
            "top1": pct(self.top1),
            "top5": pct(self.top5),
            "top1_ci95": ci(self.top1),
            "top5_ci95": ci(self.top5),
            "top1_correct": self.top1,
            "top5_correct": self.top5,
        }

    def confusion(self, labels: list[str], limit: int = 10) -> list[dict]:
        """The most frequent top-1 mistakes, true -> predicted, with their share of the true class."""
        rows = []
        for (true, pred), count in sorted(self.mistakes.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]:
            rows.append({
                "true": true,
                "true_label": labels[true] if 0 <= true < len(labels) else str(true),
                "predicted": pred,
                "predicted_label": labels[pred] if 0 <= pred < len(labels) else str(pred),
                "count": count,
                "of_true": self.per_class[true],
            })
        return rows
