"""The /classify answer: one shape whatever the image count.

    {"model": ..., "pretrained": ..., "results": [{"model", "provider", "predictions": [...], "timing_ms": {...}}, ...]}

one entry per image, in upload order. Policies add their own block beside `results` (`routing` for
model=auto, `cascade` for cascades) and, for cascades, a `cascade` block inside each result.
"""

from __future__ import annotations

import time
from typing import Any

from ..engine.dataplane import ImageResult
from ..policies.cascade import CascadeOutcome
from ..policies.routing import Decision


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _timing(r: ImageResult, total_s: float) -> dict[str, float]:
    return {
        "decode": _ms(r.decode_s), "preprocess": _ms(r.preprocess_s), "queue": _ms(r.queue_s),
        "inference": _ms(r.inference_s), "total": _ms(total_s),
    }


def result_json(r: ImageResult, top_k: int, total_s: float) -> dict[str, Any]:
    return {"model": r.model, "provider": r.provider, "predictions": [p.as_dict() for p in r.top(top_k)],
            "timing_ms": _timing(r, total_s)}


def classify_body(model: str, pretrained: bool, results: list[ImageResult], top_k: int, started: float) -> dict[str, Any]:
    total = time.perf_counter() - started
    return {"model": model, "pretrained": pretrained, "results": [result_json(r, top_k, total) for r in results]}


def auto_body(results: list[ImageResult], decision: Decision, top_k: int, started: float, pretrained: bool) -> dict[str, Any]:
    body = classify_body(decision.chosen or results[0].model, pretrained, results, top_k, started)
    body["routing"] = decision.to_dict()
    return body


def cascade_body(outcome: CascadeOutcome, top_k: int, started: float, pretrained: bool) -> dict[str, Any]:
    total = time.perf_counter() - started
    results = []
    for i, r in enumerate(outcome.results):
        entry = result_json(r, top_k, total)
        entry["timing_ms"] = {**{k: _ms(v) for k, v in outcome.spent[i].items()}, "total": _ms(total)}
        info: dict[str, Any] = {
            "path": outcome.paths[i], "escalated": len(outcome.paths[i]) > 1, "top1_scores": outcome.top1_scores[i],
        }
        if outcome.skipped[i]:
            info["escalation_skipped"] = outcome.skipped[i]
        entry["cascade"] = info
        results.append(entry)
    return {
        "model": "cascade:" + ",".join(outcome.names),
        "pretrained": pretrained,
        "results": results,
        "cascade": {"models": outcome.names, "threshold": outcome.threshold},
    }


def cascade_headers(outcome: CascadeOutcome) -> dict[str, str]:
    single = len(outcome.results) == 1
    headers = {
        "X-Effnet-Model": outcome.results[0].model if single else ",".join(outcome.names),
        "X-Effnet-Cascade-Path": ",".join(outcome.paths[0]) if single else ",".join(outcome.names),
    }
    if outcome.degraded:
        headers["X-Effnet-Cascade-Degraded"] = "true"
    return headers
