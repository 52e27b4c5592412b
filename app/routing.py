"""`model=auto`: the most accurate loaded variant whose live p95 latency fits a budget.

Latency statistics
    `LatencyStats` keeps, per model, a small rolling window of end-to-end request latencies
    (handler start to answer: body read, decode, preprocess, queueing, inference), the last
    `WINDOW` requests no older than `MAX_AGE_S`. Every answered request refreshes it, so
    queueing under load shows up within a few requests and the choice moves to cheaper
    variants; when a model stops being chosen its samples age out and it is judged by the
    cold-start estimate again (calibrated on the models that are still measured, so a loaded
    server estimates high), which lets it back in once the load is gone.

Cold-start estimate (fewer than `MIN_SAMPLES` fresh samples)
    ms ≈ OVERHEAD_MS + k × GMACs. k is calibrated from the measured model nearest in MACs
    (k = (its p95 − OVERHEAD_MS) / its GMACs); with nothing measured, k = DEFAULT_MS_PER_GMAC,
    a constant from a busy 2-core CPU (a 640x480 JPEG end to end, p95: Lite0 73 ms ≈ 184 ms/GMAC,
    Lite2 131 ms ≈ 150 ms/GMAC). It only matters until a model has MIN_SAMPLES requests.

Accuracy ranking
    Pretrained models rank by top-1: the publisher's reference number, or `accuracy.measured`
    when there is no reference or the measurement used at least `MIN_MEASURED_SIZE` images
    (a five-photo plumbing check cannot rank Lite0 against Lite2). Random-weight models have
    no meaningful accuracy: they rank below every pretrained one, by MACs as a proxy (in a
    compound-scaled family, more compute means more accuracy).

Choice
    Among ready models whose estimated p95 ≤ budget, the best ranked (ties: fewer MACs).
    When none fits, the one with the lowest estimated p95, flagged `budget_missed`.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import numpy as np
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.registry import ModelEntry

WINDOW = 100
MAX_AGE_S = 60.0
MIN_SAMPLES = 5
OVERHEAD_MS = 2.0
DEFAULT_MS_PER_GMAC = 150.0
MIN_MEASURED_SIZE = 1000


class LatencyStats:
    """Rolling per-model windows of request latency (seconds in, milliseconds out)."""

    def __init__(self, window: int = WINDOW, max_age_s: float = MAX_AGE_S, min_samples: int = MIN_SAMPLES,
                 clock=time.monotonic) -> None:
        self.window, self.max_age_s, self.min_samples, self.clock = window, max_age_s, min_samples, clock
        self._samples: dict[str, collections.deque[tuple[float, float]]] = {}

    def observe(self, model: str, seconds: float) -> None:
        q = self._samples.get(model)
        if q is None:
            q = self._samples[model] = collections.deque(maxlen=self.window)
        q.append((self.clock(), seconds))

    def fresh(self, model: str) -> list[float]:
        q = self._samples.get(model)
        if not q:
            return []
        cutoff = self.clock() - self.max_age_s
        while q and q[0][0] < cutoff:
            q.popleft()
        return [s for _, s in q]

    def p95_ms(self, model: str) -> float | None:
        """Measured p95 in ms, or None when fewer than min_samples fresh samples exist."""
        xs = self.fresh(model)
        if len(xs) < self.min_samples:
            return None
        return float(np.percentile(np.asarray(xs), 95)) * 1000.0

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {m: {"samples": len(self.fresh(m)), "p95_ms": self.p95_ms(m)} for m in list(self._samples)}


@dataclass(frozen=True)
class Candidate:
    """What routing needs to know about one ready model."""

    name: str
    macs: int
    top1: float | None  # None: no meaningful accuracy (random weights / none recorded)
    accuracy_source: str  # "reference", "measured" or "macs-proxy"


def candidate(entry: ModelEntry) -> Candidate | None:
    m = entry.manifest
    if entry.status != "ready" or entry.batcher is None or m is None:
        return None
    ref, meas = m.accuracy.reference, m.accuracy.measured
    if not m.weights.pretrained:
        return Candidate(entry.name, m.macs, None, "macs-proxy")
    if meas is not None and (ref is None or (meas.size or 0) >= MIN_MEASURED_SIZE):
        return Candidate(entry.name, m.macs, meas.top1, "measured")
    if ref is not None:
        return Candidate(entry.name, m.macs, ref.top1, "reference")
    return Candidate(entry.name, m.macs, None, "macs-proxy")


def _rank(c: Candidate) -> tuple:
    # Pretrained with an accuracy first (by top-1), then the rest by MACs; ties: fewer MACs.
    return (c.top1 is not None, c.top1 if c.top1 is not None else c.macs, -c.macs)


def estimate_p95_ms(c: Candidate, stats: LatencyStats, others: list[Candidate]) -> tuple[float, str]:
    """(p95 ms, how it was obtained): measured, or the cold-start estimate from MACs."""
    measured = stats.p95_ms(c.name)
    if measured is not None:
        return measured, f"measured p95 over {len(stats.fresh(c.name))} recent requests"
    gmacs = max(c.macs, 1) / 1e9
    best: tuple[float, Candidate, float] | None = None
    for o in others:
        if o.name == c.name:
            continue
        p95 = stats.p95_ms(o.name)
        if p95 is None:
            continue
        dist = abs(math.log(max(o.macs, 1) / max(c.macs, 1)))
        if best is None or dist < best[0]:
            best = (dist, o, p95)
    if best is not None:
        _, o, p95 = best
        k = max(p95 - OVERHEAD_MS, 0.0) / (max(o.macs, 1) / 1e9)
        return OVERHEAD_MS + k * gmacs, f"not measured yet; estimated from MACs, calibrated on {o.name}"
    return OVERHEAD_MS + DEFAULT_MS_PER_GMAC * gmacs, (
        f"not measured yet; estimated from MACs ({DEFAULT_MS_PER_GMAC:g} ms/GMAC + {OVERHEAD_MS:g} ms, nothing measured)"
    )


@dataclass
class Decision:
    chosen: str
    budget_ms: float
    estimated_p95_ms: float
    budget_missed: bool
    reason: str
    considered: dict[str, float]  # model -> estimated p95 ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "budget_ms": self.budget_ms,
            "estimated_p95_ms": round(self.estimated_p95_ms, 3),
            "budget_missed": self.budget_missed,
            "reason": self.reason,
            "considered": {k: round(v, 3) for k, v in self.considered.items()},
        }

    def headers(self) -> dict[str, str]:
        h = {"X-Effnet-Model": self.chosen, "X-Effnet-Estimated-P95-Ms": f"{self.estimated_p95_ms:.1f}"}
        if self.budget_missed:
            h["X-Effnet-Budget-Missed"] = "true"
        return h


def choose(candidates: list[Candidate], budget_ms: float, stats: LatencyStats) -> Decision | None:
    """The routing decision; None when there is no candidate at all."""
    if not candidates:
        return None
    est = {c.name: estimate_p95_ms(c, stats, candidates) for c in candidates}
    fits = [c for c in candidates if est[c.name][0] <= budget_ms]
    considered = {c.name: est[c.name][0] for c in candidates}

    def acc(c: Candidate) -> str:
        if c.top1 is None:
            return f"random weights or no accuracy recorded: ranked by MACs ({c.macs / 1e9:.3g} GMACs) as a proxy"
        return f"top-1 {c.top1:g}% ({c.accuracy_source})"

    if fits:
        best = max(fits, key=_rank)
        p95, how = est[best.name]
        slower_better = [c.name for c in candidates if _rank(c) > _rank(best)]
        why = f"most accurate model within the budget: {acc(best)}; p95 {p95:.1f} ms ({how}) <= {budget_ms:g} ms"
        if slower_better:
            why += f"; more accurate but over budget: {', '.join(slower_better)}"
        return Decision(best.name, budget_ms, p95, False, why, considered)
    cheapest = min(candidates, key=lambda c: (est[c.name][0], c.macs))
    p95, how = est[cheapest.name]
    why = (f"no loaded model fits {budget_ms:g} ms; answering with the fastest one, p95 {p95:.1f} ms ({how})")
    return Decision(cheapest.name, budget_ms, p95, True, why, considered)


class LatencyRecorder:
    """ASGI middleware: feeds `LatencyStats` from every answered `POST /classify?model=<name>`.

    Requests for `auto`/`cascade` are recorded by their own handlers (per model actually run).
    Only names of models in the registry are recorded, never what a client invents.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != "/classify" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        qs = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        model = qs["model"][-1] if qs.get("model") else None
        if model is not None and is_family_name(model):
            await self.app(scope, receive, send)
            return
        status = 0

        async def _send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        await self.app(scope, receive, _send)
        if status != 200:
            return
        app = scope.get("app")
        st = getattr(getattr(app, "state", None), "effnet", None)
        fam = getattr(getattr(app, "state", None), "family", None)
        if st is None or fam is None:
            return
        name = model if model is not None else st.registry.default_model
        if name in st.registry.entries:
            fam.latency.observe(name, time.perf_counter() - started)


def is_family_name(model: str) -> bool:
    """`auto`, `cascade` and `cascade:a,b` are handled by app.family, not by a single model."""
    return model == "auto" or model == "cascade" or model.startswith("cascade:")
