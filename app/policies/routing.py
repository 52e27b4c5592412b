"""`model=auto`: the most accurate ready model whose estimated latency fits a budget.

Estimate, per candidate
    ms = p95 of its recent per-image service time (engine.stats: decode + preprocess + inference)
         + the queue it has right now (images queued or reserved x its recent inference cost per image).
    The service time says what the model costs; the queue term says what it costs *now*, so a burst
    moves traffic to cheaper variants on the next request, not after a window of slow samples.
    With fewer than MIN_SAMPLES fresh samples the service time is the cold-start estimate from MACs:
    OVERHEAD_MS + k x GMACs, k calibrated on the measured model nearest in MACs (else
    DEFAULT_MS_PER_GMAC, from a busy 2-core CPU).

Accuracy ranking
    Pretrained models rank by top-1: the publisher's reference number, or `accuracy.measured` when there
    is no reference or the measurement used at least MIN_MEASURED_SIZE images (five photos cannot rank
    Lite0 against Lite2). Random-weight models rank below every pretrained one, by MACs as a proxy.

Choice, and what happens under load
    The best ranked model that fits the budget, then the other fitting ones by rank, then the rest by
    estimate: that order is tried until one admits the request. A model that refused (queue full) is
    tried last for a moment (engine.stats.REFUSAL_MEMORY_S), so refusals teach the router as much as
    answers do. Only when every candidate refuses does the request fail with 503 + Retry-After.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import Overloaded, Unavailable
from ..engine.dataplane import ImageResult
from ..engine.facade import ModelView, Plane, RouteInfo
from ..engine.stats import ServiceStats

OVERHEAD_MS = 2.0
DEFAULT_MS_PER_GMAC = 150.0
MIN_MEASURED_SIZE = 1000
MAX_BUDGET_MS = 600_000.0


@dataclass(frozen=True)
class Candidate:
    """What routing needs to know about one ready model."""

    name: str
    macs: int
    top1: float | None  # None: no meaningful accuracy (random weights / none recorded)
    accuracy_source: str  # "reference", "measured" or "macs-proxy"


def candidate(entry: ModelView) -> Candidate | None:
    m = entry.manifest
    if not entry.serving or m is None:
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


def service_ms(c: Candidate, stats: ServiceStats | RouteStats, others: list[Candidate]) -> tuple[float, str]:
    """(p95 per-image service ms, how it was obtained): measured, or the cold-start estimate from MACs."""
    measured = stats.p95_ms(c.name)
    if measured is not None:
        return measured, f"measured p95 over {stats.samples(c.name)} recent images"
    gmacs = max(c.macs, 1) / 1e9
    best: tuple[float, Candidate, float] | None = None
    for o in others:
        p95 = stats.p95_ms(o.name) if o.name != c.name else None
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
    budget_ms: float
    order: list[str]  # the models to try, best first
    estimates: dict[str, float]  # model -> estimated ms
    reasons: dict[str, str]  # model -> why it ranks where it does
    refused: list[str] = field(default_factory=list)  # tried and refused (queue full), in order
    chosen: str | None = None  # the model that answered

    @property
    def budget_missed(self) -> bool:
        return self.chosen is not None and self.estimates[self.chosen] > self.budget_ms

    def to_dict(self) -> dict[str, Any]:
        chosen = self.chosen or self.order[0]
        out = {
            "chosen": chosen,
            "budget_ms": self.budget_ms,
            "estimated_p95_ms": round(self.estimates[chosen], 3),
            "budget_missed": self.estimates[chosen] > self.budget_ms,
            "reason": self.reasons[chosen],
            "considered": {k: round(v, 3) for k, v in self.estimates.items()},
        }
        if self.refused:
            out["refused"] = list(self.refused)
        return out

    def headers(self) -> dict[str, str]:
        chosen = self.chosen or self.order[0]
        h = {"X-Effnet-Model": chosen, "X-Effnet-Estimated-P95-Ms": f"{self.estimates[chosen]:.1f}"}
        if self.estimates[chosen] > self.budget_ms:
            h["X-Effnet-Budget-Missed"] = "true"
        return h


def choose(candidates: list[Candidate], budget_ms: float, stats: ServiceStats | RouteStats,
           queue_ms: dict[str, float] | None = None) -> Decision | None:
    """The order to try the candidates in; None when there is none."""
    if not candidates:
        return None
    queue_ms = queue_ms or {}
    est: dict[str, float] = {}
    how: dict[str, str] = {}
    for c in candidates:
        service, source = service_ms(c, stats, candidates)
        queued = queue_ms.get(c.name, 0.0)
        est[c.name] = service + queued
        how[c.name] = f"p95 {est[c.name]:.1f} ms ({source}" + (f"; + {queued:.1f} ms of queue now)" if queued else ")")

    def acc(c: Candidate) -> str:
        if c.top1 is None:
            return f"random weights or no accuracy recorded: ranked by MACs ({c.macs / 1e9:.3g} GMACs) as a proxy"
        return f"top-1 {c.top1:g}% ({c.accuracy_source})"

    refused = [c for c in candidates if stats.recently_refused(c.name)]
    willing = [c for c in candidates if c not in refused]
    fits = sorted((c for c in willing if est[c.name] <= budget_ms), key=_rank, reverse=True)
    rest = sorted((c for c in willing if est[c.name] > budget_ms), key=lambda c: (est[c.name], c.macs))
    last = sorted(refused, key=lambda c: (est[c.name], c.macs))
    reasons: dict[str, str] = {}
    for c in fits:
        better = [o.name for o in candidates if _rank(o) > _rank(c)]
        reasons[c.name] = f"most accurate model within the budget: {acc(c)}; {how[c.name]} <= {budget_ms:g} ms" + (
            f"; more accurate but over budget or busy: {', '.join(better)}" if better else "")
    for c in rest:
        reasons[c.name] = f"no ready model fits {budget_ms:g} ms; the fastest one, {how[c.name]}"
    for c in last:
        reasons[c.name] = f"refused a request moments ago (queue full); tried last; {how[c.name]}"
    order = [c.name for c in fits + rest + last]
    return Decision(budget_ms, order, est, reasons)


async def classify_auto(
    plane: Plane, budget_ms: float, read_images: Callable[[], Awaitable[list[bytes]]], arrived: float,
    timeout_s: float | None = None,
) -> tuple[list[ImageResult], Decision]:
    """Try the decision's order until a model admits and answers; the body is read once, by the first."""
    views = {v.name: v for v in plane.views()}
    cands = [c for c in (candidate(v) for v in views.values()) if c is not None]
    info = await plane.route_info()
    queue = {c.name: info[c.name].queue_drain_ms for c in cands if c.name in info}
    decision = choose(cands, budget_ms, RouteStats(info), queue)
    if decision is None:
        raise Unavailable("no model is ready yet", retry_after=5)
    images: list[bytes] | None = None
    refusal: Overloaded | None = None
    for name in decision.order:
        try:
            async with plane.open(views[name], arrived, timeout_s) as call:
                if images is None:
                    images = await read_images()
                results = await call.images(images)
        except Overloaded as exc:
            refusal = exc
            decision.refused.append(name)
            continue
        decision.chosen = name
        plane.note_auto_routed(name, decision.budget_missed)
        return results, decision
    assert refusal is not None
    refusal.message = f"every candidate model is overloaded ({', '.join(decision.refused)}); retry shortly"
    refusal.headers = {**refusal.headers, **decision.headers()}
    raise refusal


class RouteStats:
    """The two questions `choose` asks of ServiceStats, answered from the engine's snapshot (one per request:
    in a worker process the samples live in the engine)."""

    def __init__(self, info: dict[str, RouteInfo]) -> None:
        self.info = info

    def p95_ms(self, model: str) -> float | None:
        i = self.info.get(model)
        return None if i is None else i.p95_ms

    def samples(self, model: str) -> int:
        i = self.info.get(model)
        return 0 if i is None else i.samples

    def recently_refused(self, model: str) -> bool:
        i = self.info.get(model)
        return i is not None and i.recently_refused


def is_family_name(model: str) -> bool:
    """`auto`, `cascade` and `cascade:a,b` are policies over several models, not a model name."""
    return model == "auto" or model == "cascade" or model.startswith("cascade:")
