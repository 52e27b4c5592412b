"""The data plane on its own (app/engine/dataplane.py): one real manifest, a real Batcher with a fake
model, real decoding, and the metrics each request leaves. Added for mutants that survived
`make mutation` (docs/testing.md) behind the HTTP tests, which see only status codes: which metric
series a request lands in, the Retry-After a full queue gives, the admission wait's bounds, the
top-k order, and the deadline a client may shorten.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from effnet_serve.core import tracing
from effnet_serve.core.config import Settings
from effnet_serve.core.errors import BadRequest, ClientGone, DeadlineExceeded, Overloaded, ShuttingDown, Unavailable, UnknownModel
from effnet_serve.engine.batcher import Batcher
from effnet_serve.engine.dataplane import DataPlane, ImageResult, Prediction, view_of
from effnet_serve.engine.manifest import load_manifest
from effnet_serve.engine.metrics import Metrics
from effnet_serve.engine.registry import Registry
from serving_helpers import encode, photo, write_model


class Model:
    """Logits that put all mass on class 8 for a bright image (first pixel above the mean), else 7; can be
    held at a gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.shapes: list[int] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        assert self.gate.wait(10)
        self.shapes.append(x.shape[0])
        logits = np.zeros((x.shape[0], 1000), np.float32)
        logits[np.arange(x.shape[0]), 7 + (x[:, 0, 0, 0] > 0)] = 30.0
        return logits


@pytest.fixture
def setup(tmp_path):
    """(plane, entry, model, metric reader) for one ready model `fake` (crop 32), max_queue 8."""
    folder = write_model(tmp_path, "fake", crop=32, resize=36)
    made = []

    def make(**overrides):
        settings = Settings(repository=tmp_path, default_model="fake", max_queue=8, request_timeout_s=30.0, **overrides)
        registry = Registry(settings)
        entry = registry.entries["fake"]
        model = Model()
        entry.manifest, entry.status = load_manifest(folder), "ready"
        entry.batcher = Batcher("fake", model, max_batch=4, max_delay_s=0.0, max_queue=settings.max_queue,
                                timeout_s=settings.request_timeout_s)
        plane = DataPlane(settings, registry, Metrics(), ThreadPoolExecutor(2))
        made.append(plane)

        def metric(name: str, **labels) -> float:
            return plane.metrics.registry.get_sample_value(name, labels) or 0.0

        return plane, entry, model, metric

    yield make
    for plane in made:
        plane.decode_pool.shutdown()


def run(coro, entry=None):
    """Run `coro` with the entry's batcher started (and stopped after) inside the same event loop."""

    async def main():
        if entry is not None:
            entry.batcher.start()
        try:
            return await coro
        finally:
            if entry is not None:
                await entry.batcher.stop()

    return asyncio.run(asyncio.wait_for(main(), 20))


JPEG = encode(photo((64, 48)))
WHITE, BLACK = (encode(Image.new("RGB", (40, 40), c), "PNG") for c in ("white", "black"))


# --- answers ----------------------------------------------------------------------------------
def result(probs) -> ImageResult:
    return ImageResult("m", np.asarray(probs, np.float32), np.zeros(len(probs)), list("abcde"), 0.0, 0.0, 0.0, 0.0, 1)


def test_top_k_is_best_first_ties_to_the_lower_index_and_k_is_clamped():
    r = result([0.1, 0.3, 0.05, 0.3, 0.25])
    assert [(p.index, p.label) for p in r.top(3)] == [(1, "b"), (3, "d"), (4, "e")]
    assert [p.index for p in r.top(5)] == [1, 3, 4, 0, 2]
    assert [p.index for p in r.top(99)] == [1, 3, 4, 0, 2]
    assert [p.index for p in r.top(0)] == [1]  # at least one
    assert [p.index for p in r.top(1)] == [1]
    assert r.top(1)[0].score == pytest.approx(0.3)
    assert Prediction(3, "d", 0.25).as_dict() == {"index": 3, "label": "d", "score": 0.25}


def test_scores_are_clamped_to_probabilities():
    r = result([1.0000001, -1e-7, 0.0, 0.0, 0.0])
    assert [p.score for p in r.top(2)] == [1.0, 0.0]


def test_images_are_answered_in_order_with_labels_and_timings(setup):
    plane, entry, model, metric = setup()

    async def main():
        async with plane.open(entry) as call:
            return await call.images([WHITE, BLACK, WHITE])

    out = run(main(), entry)
    assert [r.top(1)[0].label for r in out] == ["class 8", "class 7", "class 8"]
    assert [r.model for r in out] == ["fake"] * 3 and model.shapes == [2, 1]  # CPU: no padding, 2 + 1
    assert entry.version and [r.version for r in out] == [entry.version] * 3  # which version answered
    assert [r.batch_size for r in out] == [2, 2, 1]
    assert all(r.decode_s > 0 and r.preprocess_s > 0 and r.inference_s > 0 and r.queue_s >= 0 for r in out)
    assert out[1].logits.shape == (1000,) and out[1].logits[7] == 30.0 and out[0].probs[8] > 0.99
    assert metric("effnet_requests_total", model="fake", status="200") == 1
    assert metric("effnet_request_duration_seconds_count", model="fake", status="200") == 1
    assert metric("effnet_stage_duration_seconds_count", model="fake", stage="decode") == 3
    assert metric("effnet_stage_duration_seconds_count", model="fake", stage="preprocess") == 3
    assert len(plane.stats.fresh("fake")) == 3
    assert plane.inflight["fake"] == 0


def test_tensors_skip_decoding(setup):
    plane, entry, model, metric = setup()

    async def main():
        async with plane.open(entry) as call:
            return await call.tensors([np.zeros((3, 32, 32), np.float32)])

    (r,) = run(main(), entry)
    assert r.top(1)[0].label == "class 7" and r.decode_s == 0.0 and r.preprocess_s == 0.0 and r.batch_size == 1
    assert r.version == entry.version
    assert metric("effnet_requests_total", model="fake", status="200") == 1


class RecordingSink:
    """A span sink that keeps what it is given (the OpenTelemetry one is tested in test_serve_tracing.py)."""

    def __init__(self) -> None:
        self.recorded: list[tuple[str, dict]] = []

    def span(self, name, attrs):
        return tracing.OFF

    def record(self, name, start_ns, end_ns, attrs):
        assert end_ns >= start_ns > 0
        self.recorded.append((name, dict(attrs)))


def test_tensors_get_queue_and_inference_spans_naming_the_model_and_its_version(setup):
    plane, entry, _, _ = setup()
    sink = RecordingSink()

    async def main():
        with tracing.begin(tracing.RequestTrace("r1"), sink):
            async with plane.open(entry) as call:
                return await call.tensors([np.zeros((3, 32, 32), np.float32)] * 2)

    run(main(), entry)
    assert entry.version  # the manifest's ONNX digest
    want = {"model": "fake", "model_version": entry.version, "images": 2}
    assert sink.recorded == [("queue", want), ("inference", {**want, "batch_size": 2})]


def test_image_counts_outside_one_to_max_queue_are_bad_requests(setup):
    plane, entry, model, metric = setup()

    async def main(images):
        async with plane.open(entry) as call:
            return await call.images(images)

    with pytest.raises(BadRequest) as none:
        run(main([]))
    assert str(none.value) == "the request holds no image"
    with pytest.raises(BadRequest) as many:
        run(main([JPEG] * 9))
    assert str(many.value) == "at most 8 images per request"
    assert model.shapes == []
    assert metric("effnet_requests_total", model="fake", status="400") == 2
    assert metric("effnet_requests_rejected_total", model="fake", reason="bad_request") == 2


@pytest.mark.parametrize("raised, status", [(ClientGone(), "499"), (asyncio.CancelledError(), "499"),
                                             (RuntimeError("bug"), "500")])
def test_a_request_that_ends_in_an_error_is_counted_under_its_status(setup, raised, status):
    plane, entry, model, metric = setup()

    async def main():
        async with plane.open(entry):
            assert plane.inflight["fake"] == 1
            raise raised

    with pytest.raises(type(raised)):
        run(main())
    assert metric("effnet_requests_total", model="fake", status=status) == 1
    assert metric("effnet_request_duration_seconds_count", model="fake", status=status) == 1
    assert plane.inflight["fake"] == 0


def test_a_workers_client_that_left_before_admission_is_a_499_with_its_duration(setup):
    """note_client_left (a worker's lone request whose client left before it asked the engine): counted and
    timed as a call closed with ClientGone is, for a model the engine has; any other name makes no series."""
    plane, entry, model, metric = setup()
    plane.note_client_left("fake", 0.25)
    plane.note_client_left("fake", -0.5)  # another process's clock: never a negative duration
    plane.note_client_left("not-a-model", 0.25)
    assert metric("effnet_requests_total", model="fake", status="499") == 2
    assert metric("effnet_request_duration_seconds_count", model="fake", status="499") == 2
    assert metric("effnet_request_duration_seconds_sum", model="fake", status="499") == 0.25
    assert "not-a-model" not in plane.metrics.render().decode()


# --- which model, and whether it serves --------------------------------------------------------
def test_no_name_is_the_default_model_and_an_unknown_one_lists_the_available(setup):
    plane, entry, _, _ = setup()
    assert plane.entry(None) is entry and plane.entry("fake") is entry
    with pytest.raises(UnknownModel) as exc:
        plane.entry("b9")
    assert exc.value.status == 404 and str(exc.value) == "unknown model"


def test_a_model_not_ready_is_refused_with_how_long_to_wait(setup):
    plane, entry, _, _ = setup()
    entry.status = "loading"
    with pytest.raises(Unavailable) as loading:
        plane.check_admissible(entry)
    assert str(loading.value) == "model 'fake' is still loading" and loading.value.headers["Retry-After"] == "5"
    entry.status, entry.reason = "unavailable", "onnx file is missing"
    with pytest.raises(Unavailable) as broken:
        plane.check_admissible(entry)
    assert str(broken.value) == "model 'fake' is unavailable: onnx file is missing"
    assert broken.value.headers["Retry-After"] == "30"
    entry.status = "ready"
    plane.check_admissible(entry)  # ready again: admitted
    plane.draining = True
    with pytest.raises(ShuttingDown):
        plane.check_admissible(entry)


# --- pricing a queue ----------------------------------------------------------------------------
def test_queue_drain_is_the_queued_images_at_the_recent_cost(setup):
    plane, entry, _, _ = setup()
    b = entry.batcher
    assert plane.queue_drain_ms(entry) == 0.0
    b.per_image_s = 0.02
    with b.reserve(3):
        assert plane.queue_drain_ms(entry) == pytest.approx(60.0)
    entry.batcher = None
    assert plane.queue_drain_ms(entry) == 0.0
    entry.batcher = b


def test_the_admission_wait_is_a_queue_drain_within_one_and_two_seconds(setup):
    plane, entry, _, _ = setup()
    b = entry.batcher  # max_queue 8
    assert plane.admission_wait_s(entry) == 1.0  # nothing measured yet
    for per_image, wait in ((0.01, 1.0), (0.15, 1.2), (1.0, 2.0)):
        b.per_image_s = per_image
        assert plane.admission_wait_s(entry) == pytest.approx(wait)
    entry.batcher = None
    assert plane.admission_wait_s(entry) == 1.0
    entry.batcher = b
    fixed, fixed_entry, _, _ = setup(admission_wait_ms=120)
    fixed_entry.batcher.per_image_s = 1.0
    assert fixed.admission_wait_s(fixed_entry) == pytest.approx(0.12)


def test_retry_after_is_the_drain_in_whole_seconds_rounded_up(setup):
    plane, entry, _, _ = setup()
    b = entry.batcher  # max_queue 8
    assert plane.retry_after_s(entry) == 1  # nothing measured yet
    for per_image, seconds in ((0.01, 1), (0.125, 1), (0.25, 2), (0.3, 3), (1.0, 8)):
        b.per_image_s = per_image
        assert plane.retry_after_s(entry) == seconds, per_image
    entry.batcher = None
    assert plane.retry_after_s(entry) == 1
    entry.batcher = b


def test_a_full_queue_is_refused_after_the_wait_with_the_drain_as_retry_after(setup):
    plane, entry, model, metric = setup(admission_wait_ms=50)
    b = entry.batcher
    b.per_image_s = 0.3  # a full queue of 8 drains in 2.4 s

    async def main():
        with b.reserve(8):
            refused = await plane.refusal(entry)
            with pytest.raises(Overloaded) as exc:
                async with plane.open(entry) as call:
                    await call.images([JPEG])
        return refused, exc.value

    refused, exc = run(main())
    assert isinstance(refused, Overloaded) and refused.headers["Retry-After"] == "3"
    assert exc.headers["Retry-After"] == "3"
    assert plane.stats.recently_refused("fake")
    assert metric("effnet_requests_total", model="fake", status="503") == 2
    assert metric("effnet_requests_rejected_total", model="fake", reason="queue_full") == 2
    assert model.shapes == []


def test_stage_one_admits_a_ready_model_with_room_and_records_what_it_refuses(setup):
    plane, entry, _, metric = setup()

    async def main():
        admitted = await plane.refusal(entry)
        entry.status = "loading"
        refused = await plane.refusal(entry)
        return admitted, refused

    admitted, refused = run(main())
    assert admitted is None
    assert isinstance(refused, Unavailable) and str(refused) == "model 'fake' is still loading"
    assert metric("effnet_requests_total", model="fake", status="503") == 1
    assert metric("effnet_requests_rejected_total", model="fake", reason="unavailable") == 1
    assert not plane.stats.recently_refused("fake")  # only a full queue steers the router away


# --- deadlines ----------------------------------------------------------------------------------
def test_a_client_deadline_shortens_the_servers_and_time_since_arrival_counts(setup):
    plane, entry, model, metric = setup()

    async def one(arrived=None, timeout_s=None):
        async with plane.open(entry, arrived, timeout_s) as call:
            return await call.tensors([np.zeros((3, 32, 32), np.float32)])

    async def main():
        loop = asyncio.get_running_loop()
        model.gate.clear()
        blocker = asyncio.ensure_future(one())
        await asyncio.sleep(0.05)  # inside the model
        hasty = asyncio.ensure_future(one(timeout_s=0.05))
        patient = asyncio.ensure_future(one(timeout_s=60.0))
        await asyncio.sleep(0)  # both opened (their clocks started) before the wait below begins
        await asyncio.sleep(0.2)
        model.gate.set()
        with pytest.raises(DeadlineExceeded):
            await hasty
        await patient
        await blocker
        with pytest.raises(DeadlineExceeded):
            await one(arrived=loop.time() - 31.0)  # arrived 31 s ago; the server allows 30
        return await one(arrived=loop.time() - 1.0, timeout_s=2.0)

    (late_but_fine,) = run(main(), entry)
    assert late_but_fine.top(1)[0].label == "class 7"
    assert metric("effnet_requests_total", model="fake", status="503") == 2
    assert metric("effnet_requests_rejected_total", model="fake", reason="deadline") == 2


def test_top_k_agrees_with_a_full_sort_on_a_real_sized_output():
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(1000)).astype(np.float32)
    r = ImageResult("m", probs, probs, [str(i) for i in range(1000)], 0.0, 0.0, 0.0, 0.0, 1)
    by_sort = [int(i) for i in np.argsort(-probs, kind="stable")]
    for k in (1, 2, 3, 5, 10, 100, 999, 1000):
        assert [p.index for p in r.top(k)] == by_sort[:k], k


def test_exactly_max_queue_images_in_one_request_are_admitted(setup):
    plane, entry, model, _ = setup()

    async def main():
        async with plane.open(entry) as call:
            return await call.images([WHITE] * 8)

    out = run(main(), entry)
    assert len(out) == 8 and model.shapes == [4, 4]


def test_a_request_at_a_full_queue_waits_for_room_within_the_admission_wait(setup):
    plane, entry, model, _ = setup(admission_wait_ms=3000)

    async def main():
        room = entry.batcher.reserve(8)  # full
        asyncio.get_running_loop().call_later(0.2, room.release)
        async with plane.open(entry) as call:
            return await call.images([WHITE])

    (out,) = run(main(), entry)
    assert out.top(1)[0].label == "class 8"


def test_decoding_runs_in_the_decode_pool_and_is_charged_to_the_memory_budget(setup, monkeypatch):
    import effnet_serve.engine.dataplane as dataplane
    plane, entry, _, _ = setup()
    plane.decode_pool.shutdown()
    plane.decode_pool = ThreadPoolExecutor(2, thread_name_prefix="decode-test")
    threads, budgets = [], []
    real = dataplane.prepare

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        budgets.append(kwargs.get("budget"))
        return real(*args, **kwargs)

    monkeypatch.setattr(dataplane, "prepare", spy)

    async def main():
        async with plane.open(entry) as call:
            return await call.images([WHITE, BLACK])

    run(main(), entry)
    assert len(threads) == 2 and all(t.startswith("decode-test") for t in threads)
    assert budgets == [plane.memory, plane.memory]
    assert plane.memory.peak > 0 and plane.memory.used == 0


def test_images_given_up_while_decoding_are_counted_as_skipped(setup, monkeypatch):
    import effnet_serve.engine.dataplane as dataplane
    plane, entry, model, metric = setup()
    started = threading.Event()
    real = dataplane.prepare

    def slow(*args, **kwargs):
        started.set()
        threading.Event().wait(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(dataplane, "prepare", slow)

    async def main():
        async def request():
            async with plane.open(entry) as call:
                return await call.images([WHITE, BLACK, WHITE])

        task = asyncio.ensure_future(request())
        while not started.is_set():
            await asyncio.sleep(0.01)
        task.cancel()  # the client went away mid-decode
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.4)  # let the decode threads finish

    run(main(), entry)
    assert metric("effnet_images_skipped_total", model="fake", reason="client_gone") == 3
    assert metric("effnet_requests_total", model="fake", status="499") == 1
    assert model.shapes == []


def test_the_service_time_sample_is_decode_plus_preprocess_plus_inference(setup):
    plane, entry, _, _ = setup()

    async def main():
        async with plane.open(entry) as call:
            return await call.images([WHITE, BLACK])

    out = run(main(), entry)
    assert plane.stats.fresh("fake") == pytest.approx([r.decode_s + r.preprocess_s + r.inference_s for r in out])


def test_a_refusal_for_a_full_queue_steers_the_router_away_at_once(setup):
    plane, entry, _, _ = setup(admission_wait_ms=0)

    async def main():
        with entry.batcher.reserve(8):
            return await plane.refusal(entry)

    assert isinstance(run(main()), Overloaded)
    assert plane.stats.recently_refused("fake")  # recorded by stage one itself


def test_a_request_admitted_before_draining_is_still_answered(setup):
    """Draining refuses new requests; one already admitted (its body still uploading) is served."""
    plane, entry, _, _ = setup()

    async def main():
        async with plane.open(entry) as call:
            plane.draining = True  # SIGTERM while the body was being read
            return await call.images([WHITE])

    (out,) = run(main(), entry)
    assert out.top(1)[0].label == "class 8"


def test_a_request_that_arrived_before_the_drain_began_is_admitted_during_it(setup):
    """A worker asks the engine for admission only once the body is in, so SIGTERM may come between a request's
    arrival and its admission: it was in flight, and is served as one process serves it. A request that
    arrived after the drain began, or one whose arrival is not known, is refused; so is an early one whose
    model no longer serves, with the drain's reason."""
    plane, entry, _, _ = setup()

    async def main():
        before = asyncio.get_running_loop().time() - 1.0
        plane.draining = True
        plane.check_admissible(entry, before)
        for arrived in (before + 5.0, None):
            with pytest.raises(ShuttingDown):
                plane.check_admissible(entry, arrived)
        async with plane.open(entry, arrived=before) as call:
            (out,) = await call.images([WHITE])
        with pytest.raises(ShuttingDown):
            async with plane.open(entry):
                pass
        entry.status, entry.reason = "unavailable", "unloaded"
        with pytest.raises(ShuttingDown) as closed:
            plane.check_admissible(entry, before)
        entry.status = "ready"
        plane.draining = False
        plane.check_admissible(entry)  # the drain called off: admitted again
        return out, closed.value

    out, closed = run(main(), entry)
    assert out.top(1)[0].label == "class 8"
    assert closed.code == "shutting_down" and closed.headers["Retry-After"] == "5"


def test_a_model_unloaded_while_the_body_was_read_is_a_503_not_a_crash(setup):
    plane, entry, _, metric = setup()

    async def main():
        async with plane.open(entry) as call:
            batcher = entry.batcher
            entry.batcher, entry.status, entry.reason = None, "unavailable", "unloaded"
            try:
                return await call.images([WHITE])
            finally:
                entry.batcher = batcher

    with pytest.raises(Unavailable) as exc:
        run(main(), entry)
    assert str(exc.value) == "model 'fake' is unavailable: unloaded"
    assert metric("effnet_requests_total", model="fake", status="503") == 1


def test_decoded_images_keep_the_requests_deadline(setup, monkeypatch):
    """Time spent decoding counts against the deadline: a slow decode past the client's timeout is
    refused before the model, not run."""
    import effnet_serve.engine.dataplane as dataplane
    plane, entry, model, _ = setup()
    real = dataplane.prepare

    def slow(*args, **kwargs):
        threading.Event().wait(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(dataplane, "prepare", slow)

    async def main():
        model.gate.clear()
        blocker = asyncio.ensure_future(plane.open(entry).__aenter__())
        call = await blocker
        held = asyncio.ensure_future(call.tensors([np.zeros((3, 32, 32), np.float32)]))
        await asyncio.sleep(0.05)  # the model is now held
        async with plane.open(entry, timeout_s=0.5) as hasty:
            late = asyncio.ensure_future(hasty.images([WHITE]))  # 0.3 s decoding + waiting behind the held batch
            await asyncio.sleep(0.6)
            model.gate.set()
            with pytest.raises(DeadlineExceeded):
                await late
        await held
        await call.__aexit__(None, None, None)
        loop = asyncio.get_running_loop()
        async with plane.open(entry, arrived=loop.time() - 29.8) as old:  # 0.3 s decode: past the 30 s
            with pytest.raises(DeadlineExceeded):
                await old.images([WHITE])

    run(main(), entry)
    assert model.shapes == [1]  # only the held one ran


def test_an_overload_keeps_a_longer_retry_after_than_the_drain(setup):
    """Retry-After on a full queue is the later of what the refusal said and the queue's drain."""
    plane, entry, _, _ = setup()
    entry.batcher.per_image_s = 0.25  # drain: 8 x 0.25 = 2 s

    async def main(retry_after):
        with pytest.raises(Overloaded) as exc:
            async with plane.open(entry):
                raise Overloaded("full", retry_after=retry_after)
        return exc.value.headers["Retry-After"]

    assert run(main(9)) == "9"
    assert run(main(1)) == "2"


def test_the_request_duration_is_the_time_the_call_took(setup):
    plane, entry, _, metric = setup()

    async def main():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with plane.open(entry) as call:
            await call.images([WHITE])
        return loop.time() - t0

    took = run(main(), entry)
    observed = metric("effnet_request_duration_seconds_sum", model="fake", status="200")
    assert 0 < observed <= took + 0.01


def test_a_fresh_plane_counts_nothing_in_flight(setup):
    plane, _, _, _ = setup()
    assert plane.uploading == 0 and plane.inflight == {} and plane.draining is False


def test_requests_in_flight_are_counted_per_model(setup):
    plane, entry, _, _ = setup()

    async def main():
        async with plane.open(entry):
            async with plane.open(entry):
                inside = plane.inflight["fake"]
        return inside

    assert run(main()) == 2 and plane.inflight["fake"] == 0


def test_draining_is_said_in_words_and_a_model_without_a_manifest_is_not_ready(setup):
    plane, entry, _, _ = setup()
    plane.draining = True
    with pytest.raises(ShuttingDown) as exc:
        plane.check_admissible(entry)
    assert str(exc.value) == "the server is shutting down" and exc.value.headers["Retry-After"] == "5"
    plane.draining = False
    manifest, entry.manifest = entry.manifest, None
    with pytest.raises(Unavailable):
        plane.check_admissible(entry)  # ready and batched, but nothing to label the answer with
    entry.manifest = manifest


def test_without_an_admission_wait_a_full_queue_is_refused_at_once(setup):
    plane, entry, _, _ = setup(admission_wait_ms=0)

    async def main():
        loop = asyncio.get_running_loop()
        with entry.batcher.reserve(8):
            t0 = loop.time()
            with pytest.raises(Overloaded):
                async with plane.open(entry) as call:
                    await call.images([WHITE])
            return loop.time() - t0

    assert run(main()) < 0.5


def test_a_request_let_in_by_the_gate_does_not_queue_again_while_there_is_room(setup):
    """Stage one of a Call passes `in_line=False`: with one slot free it is admitted even while another
    request waits in line for more room than is free."""
    plane, entry, _, _ = setup(admission_wait_ms=0)

    async def main():
        room = entry.batcher.room
        with entry.batcher.reserve(7):  # one slot of 8 free
            waiter = asyncio.ensure_future(room.reserve_within(2, 5.0))  # waits in line for two
            await asyncio.sleep(0.01)
            assert room.waiting
            async with plane.open(entry):
                admitted = True
            waiter.cancel()
        return admitted

    assert run(main())


def test_new_work_follows_a_reload_to_the_successor(setup, tmp_path):
    """A reload replaces the entry: once the old batcher closes (or is gone), new work goes to its
    successor, through any number of reloads; an entry still open keeps its work."""
    from effnet_serve.engine.registry import ModelEntry

    plane, old, _, _ = setup()
    new = ModelEntry("fake", old.folder, status="ready", manifest=old.manifest,
                     batcher=Batcher("fake", Model(), max_batch=4, max_queue=8))
    newest = ModelEntry("fake", old.folder, status="ready", manifest=old.manifest)
    old.successor = new
    assert plane.current(old) is old  # not closed yet: still takes work
    old.batcher.room.close()
    assert plane.current(old) is new
    new.successor = newest
    new.batcher = None  # unloaded
    assert plane.current(old) is newest
    assert plane.current(newest) is newest


def test_a_requests_images_share_one_pixel_allowance(tmp_path):
    """EFFNET_MAX_REQUEST_PIXELS counts all of a request's images together: each of two 64x64 images (4096 px)
    fits in 6000 pixels, both do not (413 before their pixels are decoded)."""
    from effnet_serve.core.errors import PayloadTooLarge
    from effnet_serve.engine.dataplane import decode_all
    from effnet_serve.engine.memory import MemoryBudget

    pp = load_manifest(write_model(tmp_path, "fake", crop=32, resize=36)).preprocess
    data = [encode(photo((64, 64), seed=i), "PNG") for i in range(2)]

    async def main(request_pixels):
        with ThreadPoolExecutor(2) as pool:
            return await decode_all(pool, data, pp, 10**7, MemoryBudget(256 << 20), "fake", request_pixels)

    assert len(asyncio.run(main(None))) == 2
    assert len(asyncio.run(main(4096 * 2))) == 2
    with pytest.raises(PayloadTooLarge) as caught:
        asyncio.run(main(6000))
    assert caught.value.status == 413


# --- survivors of the rerun after the second review (docs/testing.md) -------------------------------------
class SpanNames(RecordingSink):
    """Also keeps the spans a request opens itself (`with tracing.span(...)`), with their attributes."""

    def span(self, name, attrs):
        self.recorded.append((name, dict(attrs)))
        return tracing.OFF


def test_the_admission_span_says_how_many_images_it_reserves_for(setup):
    plane, entry, _, _ = setup()
    sink = SpanNames()

    async def main():
        with tracing.begin(tracing.RequestTrace("r2"), sink):
            async with plane.open(entry) as call:
                return await call.images([WHITE, BLACK, WHITE])

    run(main(), entry)
    assert ("admission", {"images": 3}) in sink.recorded


def test_opening_a_call_refuses_what_the_plane_would_refuse(setup):
    """Stage one in the call itself (the path a worker's `open` takes, with no gate before it): draining is
    refused there."""
    plane, entry, _, _ = setup()

    async def main():
        plane.draining = True
        with pytest.raises(ShuttingDown):
            async with plane.open(entry):
                pass
        plane.draining = False
        async with plane.open(entry):
            return "opened"

    assert run(main(), entry) == "opened"


def test_a_view_of_a_model_the_registry_no_longer_has_lists_the_available(setup):
    """A front end's view may outlive its model (a rename of the folder, a poll): the refusal names what is
    there, as a lookup by name does."""
    plane, entry, _, _ = setup()
    view = dataclasses.replace(view_of(entry), name="gone")

    async def main():
        with pytest.raises(UnknownModel) as exc:
            plane.open(view)
        return exc.value

    refused = run(main())
    assert refused.status == 404 and str(refused) == "unknown model" and refused.extra["available"] == ["fake"]


def test_route_info_carries_each_models_recent_median(setup):
    plane, entry, _, _ = setup()

    async def main():
        for _ in range(6):
            async with plane.open(entry) as call:
                await call.images([WHITE])
        return await plane.route_info()

    info = run(main(), entry)["fake"]
    assert info.p50_ms is not None and info.p50_ms == plane.stats.p50_ms("fake")


def test_each_answer_names_its_weights_and_the_provider_that_ran_it(setup):
    plane, entry, _, _ = setup()
    entry.session = types.SimpleNamespace(provider="CPUExecutionProvider")  # what the provider is read from

    async def main():
        async with plane.open(entry) as call:
            return await call.images([WHITE])

    (out,) = run(main(), entry)
    assert out.pretrained is entry.spec.weights.pretrained is False  # write_model's manifest: random weights
    assert out.provider == "CPUExecutionProvider"
