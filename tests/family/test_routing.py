"""model=auto: the routing decision on injected service-time statistics, queue depth and refusals, and
live requests (including a chosen model that refuses)."""

from __future__ import annotations

import time

import httpx
import pytest
from serving_helpers import encode, live_server, photo, queue_held

from effnet_serve.core.config import Settings

from effnet_serve.engine import stats as service_stats
from effnet_serve.engine.stats import ServiceStats
from effnet_serve.policies import routing
from effnet_serve.policies.routing import Candidate, choose

LITE0 = Candidate("lite0", 385_000_000, 75.1, "reference")
LITE2 = Candidate("lite2", 860_000_000, 77.6, "reference")
LITE4 = Candidate("lite4", 2_640_000_000, 80.4, "reference")
FAMILY = [LITE0, LITE2, LITE4]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def stats_with(clock=None, **p95_ms: float) -> ServiceStats:
    """Every model gets 20 samples whose p95 is (about) the given milliseconds."""
    s = ServiceStats(clock=clock or Clock())
    for name, ms in p95_ms.items():
        for _ in range(20):
            s.observe(name, ms / 1000.0)
    return s


def first(d) -> str:
    return d.order[0]


def test_most_accurate_that_fits_then_the_others_in_the_order_they_are_tried():
    s = stats_with(lite0=10, lite2=30, lite4=120)
    d = choose(FAMILY, 50, s)
    assert d.order == ["lite2", "lite0", "lite4"]  # fitting by accuracy, then the rest by estimate
    assert d.estimates["lite2"] == pytest.approx(30)
    d.chosen = "lite2"
    assert not d.budget_missed and d.to_dict()["estimated_p95_ms"] == pytest.approx(30)
    assert "lite4" in d.reasons["lite2"] and "top-1 77.6% (reference)" in d.reasons["lite2"]
    assert first(choose(FAMILY, 200, s)) == "lite4"
    assert first(choose(FAMILY, 15, s)) == "lite0"


def test_the_queue_a_model_has_now_counts_before_any_slow_sample_arrives():
    s = stats_with(lite0=10, lite2=30, lite4=120)
    d = choose(FAMILY, 50, s, queue_ms={"lite2": 40.0})
    assert first(d) == "lite0" and d.estimates["lite2"] == pytest.approx(70)
    assert "queue now" in d.reasons["lite2"]


def test_a_model_that_just_refused_is_tried_last_for_a_moment():
    clock = Clock()
    s = stats_with(clock, lite0=10, lite2=30, lite4=120)
    s.refused("lite2")
    d = choose(FAMILY, 50, s)
    assert d.order == ["lite0", "lite4", "lite2"] and "refused" in d.reasons["lite2"]
    clock.t += service_stats.REFUSAL_MEMORY_S + 0.01
    assert first(choose(FAMILY, 50, s)) == "lite2"  # forgiven


def test_load_moves_the_choice_to_cheaper_models():
    clock = Clock()
    s = stats_with(clock, lite0=10, lite2=30, lite4=120)
    assert first(choose(FAMILY, 50, s)) == "lite2"
    for _ in range(100):  # lite2 got slower: its recent images take 80 ms
        s.observe("lite2", 0.080)
    assert first(choose(FAMILY, 50, s)) == "lite0"


def test_nothing_fits_falls_back_to_the_fastest_and_says_so():
    s = stats_with(lite0=60, lite2=90, lite4=300)
    d = choose(FAMILY, 50, s)
    d.chosen = first(d)
    assert d.chosen == "lite0" and d.budget_missed
    assert d.headers()["X-Effnet-Budget-Missed"] == "true"
    assert "no ready model fits" in d.reasons["lite0"]
    assert "X-Effnet-Budget-Missed" not in choose(FAMILY, 70, s).headers()


def test_cold_start_estimate_from_macs():
    d = choose(FAMILY, 1000, ServiceStats())  # nothing measured: documented constant
    want = routing.OVERHEAD_MS + routing.DEFAULT_MS_PER_GMAC * LITE4.macs / 1e9
    assert first(d) == "lite4" and d.estimates["lite4"] == pytest.approx(want, rel=1e-3)
    assert "nothing measured" in d.reasons["lite4"]
    # lite0 measured at 12 ms: the others are estimated with k calibrated on it.
    s = stats_with(lite0=12)
    k = (12 - routing.OVERHEAD_MS) / (LITE0.macs / 1e9)
    d = choose(FAMILY, 30, s)
    assert d.estimates["lite2"] == pytest.approx(routing.OVERHEAD_MS + k * LITE2.macs / 1e9, rel=1e-3)
    assert first(d) == "lite2" and "calibrated on lite0" in d.reasons["lite2"]


def test_window_ages_out():
    clock = Clock()
    s = stats_with(clock, lite2=500)
    assert s.p95_ms("lite2") == pytest.approx(500)
    clock.t += service_stats.MAX_AGE_S + 1
    assert s.p95_ms("lite2") is None  # back to the estimate: it may be chosen (and measured) again
    s.observe("lite2", 0.02)
    assert s.p95_ms("lite2") is None  # one sample is not a p95


def test_random_weights_rank_by_macs_below_pretrained():
    a = Candidate("tiny", 2_000_000, None, "macs-proxy")
    b = Candidate("tiny2", 6_000_000, None, "macs-proxy")
    s = ServiceStats()
    d = choose([a, b], 1000, s)
    assert first(d) == "tiny2" and "MACs" in d.reasons["tiny2"] and "proxy" in d.reasons["tiny2"]
    assert first(choose([a, b, LITE0], 1000, s)) == "lite0"


def test_measured_accuracy_needs_a_real_set(tiny_family_repo):
    from effnet_serve.engine.facade import ModelView
    from effnet_serve.engine.manifest import load_manifest

    manifest = load_manifest(tiny_family_repo / "tiny")

    def serving(m):
        return ModelView("tiny", "ready", manifest=m, batch_sizes=(1,))

    assert routing.candidate(serving(manifest)).accuracy_source == "macs-proxy"  # random weights
    assert routing.candidate(ModelView("tiny", "loading", manifest=manifest)) is None  # not serving: no candidate
    m = manifest.model_copy(deep=True)
    m.weights.pretrained = True
    m.accuracy = m.accuracy.model_validate({"reference": {"top1": 75.0}, "measured": {"top1": 60.0, "size": 5}})
    assert routing.candidate(serving(m)) == Candidate("tiny", m.macs, 75.0, "reference")  # five photos do not override
    m.accuracy.measured.size = 5000
    assert routing.candidate(serving(m)) == Candidate("tiny", m.macs, 60.0, "measured")


# --- live --------------------------------------------------------------------------------
def test_classify_auto_live(family_server):
    """The choice on live statistics. Only tiny's samples are measured (a few ms each); every bound they
    are judged against is at least 1000x that, so a loaded machine cannot change the choice."""
    stats = family_server.plane.stats
    jpeg = encode(photo())
    with httpx.Client(base_url=family_server.url, timeout=30) as c:
        # Plain requests feed the statistics (the data plane), per model.
        for _ in range(service_stats.MIN_SAMPLES):
            assert c.post("/classify?model=tiny", content=jpeg, headers={"Content-Type": "image/jpeg"}).status_code == 200
        deadline = time.monotonic() + 10  # with worker processes the engine records a sample just after its answer
        while len(stats.fresh("tiny")) < service_stats.MIN_SAMPLES and time.monotonic() < deadline:
            time.sleep(0.01)
        measured = stats.p95_ms("tiny")
        assert measured is not None and len(stats.fresh("tiny")) == service_stats.MIN_SAMPLES
        # Inject: tiny2 (more MACs, so ranked higher) is slow right now: 100 s an image.
        for _ in range(50):
            stats.observe("tiny2", 100.0)
        r = c.post("/classify?model=auto&budget_ms=30000", content=jpeg, headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "tiny" and body["routing"]["chosen"] == "tiny"
        # The estimate it judged tiny by is tiny's measured p95 (nothing was queued), not a made-up number.
        assert body["routing"]["budget_ms"] == 30000
        assert body["routing"]["estimated_p95_ms"] == pytest.approx(measured, abs=1e-3)
        assert body["routing"]["considered"]["tiny2"] == pytest.approx(100_000.0)
        assert r.headers["X-Effnet-Model"] == "tiny" and "X-Effnet-Budget-Missed" not in r.headers
        assert len(body["results"][0]["predictions"]) == 5 and body["results"][0]["model"] == "tiny"
        # A budget nothing meets: the fastest, flagged.
        r = c.post("/classify?model=auto&budget_ms=0.001", content=jpeg, headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200 and r.headers["X-Effnet-Budget-Missed"] == "true"
        assert r.json()["routing"]["budget_missed"] is True and r.json()["model"] == "tiny"
        # No budget: EFFNET_DEFAULT_BUDGET_MS (1000 here) -> tiny2 fits again once fast.
        for _ in range(100):
            stats.observe("tiny2", 0.010)
        r = c.post("/classify?model=auto", content=jpeg, headers={"Content-Type": "image/jpeg"})
        assert r.json()["routing"]["budget_ms"] == 1000 and r.json()["model"] == "tiny2"
        r = c.post("/classify?model=auto&budget_ms=-3", content=jpeg, headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
        m = c.get("/metrics").text
        assert 'effnet_auto_routed_total{budget_missed="true",model="tiny"}' in m


def test_auto_moves_on_when_the_chosen_model_refuses_and_remembers(tiny_family_repo):
    """tiny2 ranks first (more MACs; random weights). With its queue full, model=auto answers from tiny
    instead of failing, says so, and sends the next request to tiny without asking tiny2 first."""
    settings = Settings(repository=tiny_family_repo, default_model="tiny", threads=1, decode_workers=2,
                        max_queue=4, default_budget_ms=60_000.0)
    jpeg = encode(photo())
    with live_server(settings) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        post = lambda: c.post("/classify?model=auto", content=jpeg, headers={"Content-Type": "image/jpeg"})  # noqa: E731
        assert post().json()["model"] == "tiny2"
        with queue_held(srv, "tiny2", 4):
            r = post()
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == "tiny" and body["routing"]["refused"] == ["tiny2"]
            r = post()  # the refusal was learnt: tiny first now, nothing refused on the way
            assert r.json()["model"] == "tiny" and "refused" not in r.json()["routing"]
            with queue_held(srv, "tiny", 4):
                r = post()
                assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
                assert "every candidate" in r.json()["error"]["message"] and "Retry-After" in r.headers
        m = c.get("/metrics").text
        assert 'effnet_requests_rejected_total{model="tiny2",reason="queue_full"}' in m
