"""Confidence cascades: `model=cascade:lite0,lite2` runs the cheap model first and passes an image on to
the next model only when the cheap model's top-1 probability is under a threshold.

`escalate()` is THE decision: the server (`run_cascade`) and `effnet eval --cascade` (app/tools/eval)
both call it on softmax probabilities computed by the same `app.engine.batcher.softmax`, so the
threshold chosen offline means the same thing online.

Every stage is a data-plane call like any other request: the first model admits the request (or refuses
it with 503 + Retry-After) before the body is read; a multi-image request escalates only its unsure
images. When a later model is overloaded or unavailable, the earlier model's answer is kept and the
answer says so (`escalation_skipped`), instead of failing a request that already has an answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from ..core.errors import BadRequest, Unavailable
from ..engine.dataplane import ImageResult
from ..engine.facade import Plane

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


ADHOC_LABEL = "cascade"  # the metric label of every cascade but the configured one


def cascade_label(names: list[str], default: list[str]) -> str:
    """The `cascade` label of effnet_cascade_escalations: the configured cascade keeps its name, any other
    collapses to one value. Orderings of the loaded models are the client's choice (2 to 4 of 11 models:
    about 8,000 of them), so they must not mint series; from_model and to_model still say which pair."""
    return ",".join(names) if names == list(default) else ADHOC_LABEL


@dataclass
class CascadeOutcome:
    """Per image: the final answer, the models it went through and their top-1 probabilities."""

    names: list[str]
    threshold: float
    results: list[ImageResult]
    paths: list[list[str]]
    top1_scores: list[list[float]]
    skipped: list[str | None]
    # Summed over the stages an image went through (seconds).
    spent: list[dict[str, float]] = field(default_factory=list)

    @property
    def degraded(self) -> bool:
        return any(self.skipped)


async def run_cascade(
    plane: Plane, names: list[str], threshold: float,
    read_images: Callable[[], Awaitable[list[bytes]]], arrived: float, timeout_s: float | None = None,
) -> CascadeOutcome:
    entries = [plane.find(n) for n in names]
    label = cascade_label(names, plane.settings.default_cascade)
    async with plane.open(entries[0], arrived, timeout_s) as call:  # admitted before the body is read
        images = await read_images()
        first = await call.images(images)
    n = len(images)
    out = CascadeOutcome(names, threshold, list(first), [[names[0]] for _ in range(n)],
                         [[_top1(r)] for r in first], [None] * n, [_spent(r) for r in first])
    pending = [i for i, r in enumerate(first) if len(entries) > 1 and escalate(r.probs, threshold)]
    for depth in range(1, len(entries)):
        if not pending:
            break
        entry = entries[depth]
        plane.note_escalations(label, entries[depth - 1].name, entry.name, len(pending))
        try:
            async with plane.open(entry, arrived, timeout_s) as call:
                results = await call.images([images[i] for i in pending])
        except Unavailable as exc:
            for i in pending:
                out.skipped[i] = f"{entry.name}: {exc.message}"
            break
        nxt = []
        for i, r in zip(pending, results):
            out.results[i] = r
            out.paths[i].append(entry.name)
            out.top1_scores[i].append(_top1(r))
            out.spent[i] = {k: out.spent[i][k] + v for k, v in _spent(r).items()}
            if depth + 1 < len(entries) and escalate(r.probs, threshold):
                nxt.append(i)
        pending = nxt
    return out


def _top1(r: ImageResult) -> float:
    return round(float(np.max(r.probs)), 6)


def _spent(r: ImageResult) -> dict[str, float]:
    return {"decode": r.decode_s, "preprocess": r.preprocess_s, "queue": r.queue_s, "inference": r.inference_s}
