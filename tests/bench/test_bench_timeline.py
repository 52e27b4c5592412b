"""benchmarks/timeline.py's arithmetic: one request's spans and client clock -> its hops."""

from __future__ import annotations

import pytest

from benchmarks.timeline import HOPS, hops

MS = 1_000_000


def test_hops_split_a_request_into_what_the_spans_and_the_client_saw():
    # client sends at 0, the app's span is 1..20 ms, the client has the answer at 21 ms
    spans = [("request", 1 * MS, 20 * MS), ("body", 1 * MS, 2 * MS), ("open", 2 * MS, 3 * MS),
             ("admission", 3 * MS, 4 * MS), ("decode", 4 * MS, 6 * MS), ("submit", 6 * MS, 17 * MS),
             ("queue", 6 * MS, 7 * MS), ("inference", 7 * MS, 15 * MS), ("answer", 17 * MS, 18 * MS)]
    h = hops(spans, 0, 21 * MS)
    assert h["to the app"] == 1 and h["write + read"] == 1 and h["total"] == 21
    assert (h["body"], h["open"], h["admission"], h["decode"], h["answer"]) == (1, 1, 1, 2, 1)
    assert (h["queue"], h["inference"]) == (1, 8)
    assert h["wake-ups and trips"] == pytest.approx(2)  # the submit's 11 ms less queue and inference
    assert h["rest in the app"] == pytest.approx(2)  # 19 ms of request less 17 ms of direct children
    assert sum(h[k] for k in HOPS) == pytest.approx(h["total"])


def test_a_request_without_its_request_span_is_left_out():
    assert hops([("body", 0, MS)], 0, 2 * MS) is None
