"""Confidence cascades: `model=cascade:lite0,lite2` runs the cheap model first and passes an
image on to the next model only when the cheap model's top-1 probability is under a threshold.

`escalate()` is THE decision: the server (`run_cascade`) and `effnet eval --cascade`
(app/eval/cascade.py) both call it on softmax probabilities computed by the same
`app.batcher.softmax`, so the threshold chosen offline means the same thing online.

Per image: a multi-image request escalates only its unsure images. When a later model is
overloaded or unavailable, the earlier model's answer is kept (the response says so in
`cascade.escalation_skipped` and the `X-Effnet-Cascade-Degraded: true` header) instead of
failing a request that already has an answer.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from app.errors import ApiError, BadRequest, Unavailable, UnknownModel

if TYPE_CHECKING:
    from app.registry import ModelEntry
    from app.routes import State

MAX_STAGES = 4


def escalate(probs: np.ndarray, threshold: float) -> bool:
    """Pass the image on when the top-1 softmax probability is under the threshold."""
    return float(np.max(probs)) < threshold


def parse_cascade(model: str, default: list[str]) -> list[str]:
    """`cascade` -> the configured default; `cascade:a,b` -> [a, b]. Names are checked by the caller."""
    if model == "cascade":
        if not default:
            raise BadRequest("no default cascade is configured (EFFNET_DEFAULT_CASCADE); name one: model=cascade:a,b")
        names = list(default)
    else:
        names = [n.strip() for n in model[len("cascade:"):].split(",") if n.strip()]
    if not 2 <= len(names) <= MAX_STAGES:
        raise BadRequest(f"a cascade names 2 to {MAX_STAGES} models, cheapest first: model=cascade:a,b")
    if len(set(names)) != len(names):
        raise BadRequest("a cascade names each model once")
    return names


async def _stage(st: State, entry: ModelEntry, images: list[bytes], arrived: float) -> tuple[list, list]:
    """One model over some images, with /classify's checks and metrics: (prepared, results)."""
    from app.preprocess import prepare

    from app.routes import ensure_admissible

    name = entry.name
    started = time.perf_counter()
    status = "500"
    st.inflight[name] = st.inflight.get(name, 0) + 1
    try:
        ensure_admissible(st, entry)
        loop = asyncio.get_running_loop()
        pp = entry.manifest.preprocess
        prepared = await asyncio.gather(
            *(loop.run_in_executor(st.decode_pool, prepare, data, pp, st.settings.max_image_pixels) for data in images)
        )
        decode_hist = st.metrics.stage_duration.labels(name, "decode")
        pre_hist = st.metrics.stage_duration.labels(name, "preprocess")
        for p in prepared:
            decode_hist.observe(p.decode_s)
            pre_hist.observe(p.preprocess_s)
        results = await entry.batcher.submit([p.tensor for p in prepared], arrived)
        status = "200"
        return prepared, results
    except ApiError as exc:
        status = str(exc.status)
        if exc.reject_reason:
            st.metrics.rejected.labels(name, exc.reject_reason).inc()
        raise
    finally:
        st.inflight[name] -= 1
        st.metrics.requests.labels(name, status).inc()
        st.metrics.request_duration.labels(name, status).observe(time.perf_counter() - started)


async def run_cascade(
    st: State, names: list[str], threshold: float, images: list[bytes], top_k: int, arrived: float,
    started: float, on_latency=lambda model, seconds: None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The /classify body and extra headers for a cascade over the given images."""
    from app.routes import _ms, _top_k

    entries = []
    for n in names:
        e = st.registry.entries.get(n)
        if e is None:
            raise UnknownModel(f"unknown model {n!r} in the cascade", available=st.registry.names())
        entries.append(e)
    label = ",".join(names)  # only loaded names reach here: a bounded label value
    final: list[Any] = [None] * len(images)  # (entry, Result)
    paths: list[list[str]] = [[] for _ in images]
    scores: list[list[float]] = [[] for _ in images]
    skipped: list[str | None] = [None] * len(images)
    timing = {"decode": 0.0, "preprocess": 0.0, "queue": 0.0, "inference": 0.0}
    pending = list(range(len(images)))
    for depth, entry in enumerate(entries):
        if not pending:
            break
        t0 = time.perf_counter()
        try:
            prepared, results = await _stage(st, entry, [images[i] for i in pending], arrived)
        except Unavailable as exc:
            if depth == 0:
                raise
            for i in pending:
                skipped[i] = f"{entry.name}: {exc.message}"
            break
        on_latency(entry.name, time.perf_counter() - t0)
        timing["decode"] += sum(p.decode_s for p in prepared)
        timing["preprocess"] += sum(p.preprocess_s for p in prepared)
        timing["queue"] += max(r.queue_s for r in results)
        timing["inference"] += max(r.inference_s for r in results)
        nxt = []
        for i, r in zip(pending, results):
            final[i] = (entry, r)
            paths[i].append(entry.name)
            scores[i].append(round(float(np.max(r.probs)), 6))
            if depth + 1 < len(entries) and escalate(r.probs, threshold):
                st.metrics.cascade_escalations.labels(label, entry.name, entries[depth + 1].name).inc()
                nxt.append(i)
        pending = nxt

    lists, infos = [], []
    for i, (entry, r) in enumerate(final):
        labels = entry.manifest.labels
        lists.append(_top_k(r.probs, min(top_k, len(labels)), labels))
        info: dict[str, Any] = {
            "models": names, "threshold": threshold, "path": paths[i],
            "escalated": len(paths[i]) > 1, "top1_scores": scores[i],
        }
        if skipped[i]:
            info["escalation_skipped"] = skipped[i]
        infos.append(info)
    deepest = max((f[0] for f in final), key=lambda e: names.index(e.name))
    body = {
        "model": deepest.name if len(images) > 1 else final[0][0].name,
        "pretrained": all(f[0].manifest.weights.pretrained for f in final),
        "predictions": [[p.model_dump() for p in ps] for ps in lists] if len(lists) > 1 else [p.model_dump() for p in lists[0]],
        "timing_ms": {**{k: _ms(v) for k, v in timing.items()}, "total": _ms(time.perf_counter() - started)},
        "cascade": infos if len(infos) > 1 else infos[0],
    }
    headers = {"X-Effnet-Model": body["model"], "X-Effnet-Cascade-Path": ",".join(paths[0]) if len(images) == 1 else label}
    if any(skipped):
        headers["X-Effnet-Cascade-Degraded"] = "true"
    return body, headers
