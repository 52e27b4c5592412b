"""The batcher's promises that tests/serving/test_serve_batcher.py left unpinned, each found by a mutant
that survived `make mutation` (docs/testing.md): deadlines counted from arrival, the metric hooks'
numbers, draining a batch that is inside the model, full batches that do not wait, padding past one
batch, and the log lines an operator reads. Same fake model as there (the argmax is the image's value).
"""

from __future__ import annotations

import asyncio
import logging
import threading

import numpy as np
import pytest

from effnet_serve.core.errors import DeadlineExceeded, InferenceFailed, ShuttingDown, VersionStopped
from effnet_serve.engine.batcher import Batcher
from effnet_serve.engine.observe import BatchObserver
from test_serve_batcher import Recorder, img, run


def answer(results) -> list[int]:
    return [int(np.argmax(r.probs)) for r in results]


def test_time_before_submit_counts_against_the_deadline():
    """`arrived` is when the request reached the server: decoding time is spent from the same deadline."""
    model = Recorder()

    async def main():
        loop = asyncio.get_running_loop()
        b = Batcher("m", model, max_batch=4, max_delay_s=0.0, max_queue=10, timeout_s=10.0)
        b.start()
        with pytest.raises(DeadlineExceeded) as late:
            await b.submit([img(1)], arrived=loop.time() - 50.0)  # spent 50 s decoding; 10 s allowed
        on_time = await b.submit([img(2)], arrived=loop.time() - 5.0)
        await b.stop()
        return late.value, on_time

    late, on_time = run(main())
    assert late.status == 503 and str(late) == "request waited more than 10s before reaching model 'm'"
    assert answer(on_time) == [2]
    assert model.shapes == [1]  # the late one never reached the model


def test_a_client_deadline_can_only_shorten_the_servers():
    """The server allows 1 s: far more than a queued image waits here, however busy the machine (only
    the waits past a deadline are timed, and a wait lasts at least what it asks)."""
    gate = threading.Event()
    model = Recorder(gate)

    async def main():
        b = Batcher("m", model, max_batch=4, max_delay_s=0.0, max_queue=10, timeout_s=1.0)
        b.start()
        blocker = asyncio.ensure_future(b.submit([img(0)]))
        await asyncio.sleep(0.05)  # inside the model
        with b.reserve(3) as room:
            hasty = asyncio.ensure_future(room.submit([img(1)], None, 0.05))  # the client allows 50 ms
            patient = asyncio.ensure_future(room.submit([img(2)], None, 60.0))  # 60 s: the server's 1 s wins
            fine = asyncio.ensure_future(room.submit([img(3)], None, None))
            await asyncio.sleep(0)  # queued (their clocks started) before the wait below begins
            await asyncio.sleep(0.1)  # past the client's 50 ms, well within the server's 1 s
            gate.set()
            with pytest.raises(DeadlineExceeded):
                await hasty
            await fine
        await blocker
        gate.clear()
        blocker = asyncio.ensure_future(b.submit([img(0)]))
        await asyncio.sleep(0.05)
        patient = asyncio.ensure_future(b.reserve(1).submit([img(2)], None, 60.0))
        await asyncio.sleep(0)
        await asyncio.sleep(1.2)  # past the server's 1 s
        gate.set()
        with pytest.raises(DeadlineExceeded):
            await patient
        await blocker
        await b.stop()

    run(main())


def test_hooks_see_the_real_numbers():
    """The metrics are fed from these hooks: queue depth, items, batch sizes, skipped and expired counts."""
    gate = threading.Event()
    model = Recorder(gate)
    depth, items, batches, skipped, expired = [], [], [], [], []

    async def main():
        loop = asyncio.get_running_loop()
        b = Batcher("m", model, max_batch=8, max_delay_s=0.0, max_queue=100, timeout_s=5.0,
                    observer=BatchObserver(depth=depth.append, queued=items.append,
                                           ran=lambda n, s: batches.append((n, s)), skipped=skipped.append,
                                           expired=expired.append))
        b.start()
        blocker = asyncio.ensure_future(b.submit([img(0)]))
        await asyncio.sleep(0.05)  # inside the model; the queue is empty again
        assert depth[-1] == 0
        gone = [asyncio.ensure_future(b.submit([img(v)])) for v in (1, 2)]
        late = [asyncio.ensure_future(b.submit([img(v)], arrived=loop.time() - 10)) for v in (3, 4, 5)]
        kept = asyncio.ensure_future(b.submit([img(6), img(7)]))
        await asyncio.sleep(0)
        assert depth[-1] == 7  # 2 + 3 + 2 queued behind the running one
        for t in gone:
            t.cancel()
        gate.set()
        out = await kept
        await blocker
        await asyncio.gather(*gone, *late, return_exceptions=True)
        await b.stop()
        return out

    out = run(main())
    assert answer(out) == [6, 7]
    assert skipped == [2] and expired == [3]
    assert [n for n, _ in batches] == [1, 2] and all(s > 0 for _, s in batches)
    assert len(items) == 3 and all(0 <= q < 5 for q in items)
    assert depth[-1] == 0


def test_a_full_batch_does_not_wait_for_announced_images():
    """max_batch images queued: the batch cannot grow, so announced company is not waited for."""
    model = Recorder()

    async def main():
        loop = asyncio.get_running_loop()
        b = Batcher("m", model, max_batch=2, max_delay_s=5.0, max_queue=10)
        b.start()
        with b.reserve(1):  # announced, never sent
            t0 = loop.time()
            out = await b.submit([img(1), img(2)])
            waited = loop.time() - t0
        await b.stop()
        return out, waited

    out, waited = run(main())
    assert answer(out) == [1, 2] and out[0].batch_size == 2
    assert waited < 2.5  # not the 5 s delay


def test_an_item_that_waited_through_the_previous_batch_is_held_back_at_most_the_delay_after_it():
    """After a run, a queued item waits for the clients that run answered (at most the delay from the run's
    end), and never for announced images past its own delay. Told by the order of events, not by a stopwatch:
    the announced image is sent only after the waiting one is answered, so a batcher that held the waiting
    image for it (or for the answered client, without end) never answers it, and run() fails the test."""
    gate = threading.Event()
    model = Recorder(gate)

    async def main():
        b = Batcher("m", model, max_batch=8, max_delay_s=0.3, max_queue=10)
        b.start()
        blocker = asyncio.ensure_future(b.submit([img(0)]))
        await asyncio.sleep(0.05)  # inside the model
        with b.reserve(1) as announced:
            waiting = asyncio.ensure_future(b.submit([img(4)]))
            await asyncio.sleep(0)
            assert b.depth == 1  # queued before the wait below begins
            await asyncio.sleep(0.4)  # longer than the delay (a sleep lasts at least that), behind the blocker
            gate.set()
            await blocker
            out = await waiting
            late = await announced.submit([img(5)])
        await b.stop()
        return out, late

    out, late = run(main())
    assert answer(out) == [4] and out[0].batch_size == 1
    assert answer(late) == [5] and late[0].batch_size == 1
    assert model.shapes == [1, 1, 1]


def test_with_padding_more_than_one_batch_is_split_into_full_batches():
    gate = threading.Event()
    model = Recorder(gate)

    async def main():
        b = Batcher("m", model, max_batch=4, max_delay_s=0.0, max_queue=100, pad=True)
        b.start()
        blocker = asyncio.ensure_future(b.submit([img(0)]))
        await asyncio.sleep(0.05)
        rest = asyncio.gather(*(b.submit([img(i)]) for i in range(1, 8)))
        await asyncio.sleep(0)
        gate.set()
        out = await rest
        await blocker
        await b.stop()
        return out

    out = run(main())
    assert [answer(r)[0] for r in out] == [1, 2, 3, 4, 5, 6, 7]
    assert model.shapes == [1, 4, 4]  # 7 queued: a batch of 4, then 3 padded up to 4
    assert [r[0].batch_size for r in out] == [4, 4, 4, 4, 3, 3, 3]  # batch_size counts real images only


def test_stop_lets_the_batch_inside_the_model_finish_within_the_drain():
    gate = threading.Event()
    model = Recorder(gate)

    async def main():
        b = Batcher("m", model, max_batch=4, max_delay_s=0.0, max_queue=10)
        b.start()
        inside = asyncio.ensure_future(b.submit([img(3)]))
        await asyncio.sleep(0.05)  # the queue is empty, the batch is in the model
        loop = asyncio.get_running_loop()
        stopping = asyncio.ensure_future(b.stop(drain_s=10))
        await asyncio.sleep(0.05)  # stop() is polling the batch inside the model
        assert not stopping.done()
        t0 = loop.time()
        gate.set()
        await stopping
        return await inside, loop.time() - t0

    out, stopped_after = run(main())
    assert answer(out) == [3]
    # It noticed the batch was done (a 10 ms poll, a few ms of work) rather than polling at leisure or
    # sitting out the 10 s drain: a bound some 25 times what it takes.
    assert stopped_after < 0.5


def test_stop_without_drain_fails_the_batch_inside_the_model_and_the_queue_with_shutting_down():
    """stop() (no drain: the default) fails what is running and what is queued at once, and returns only
    once the model's thread is done with its batch, so the session can be closed after it."""
    gate, finished = threading.Event(), threading.Event()
    model = Recorder(gate)

    def slow_model(x):
        out = model(x)
        finished.set()
        return out

    async def main():
        b = Batcher("m", slow_model, max_batch=1, max_delay_s=0.0, max_queue=10)
        b.start()
        inside = asyncio.ensure_future(b.submit([img(3)]))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(b.submit([img(v)])) for v in (4, 5)]
        await asyncio.sleep(0)
        threading.Timer(0.3, gate.set).start()  # the model thread must end for stop() to return
        await b.stop()
        assert finished.is_set()
        out = await asyncio.gather(inside, *queued, return_exceptions=True)
        return out

    out = run(main())
    assert all(isinstance(e, ShuttingDown) and e.status == 503 and str(e) == "the server is shutting down" for e in out)
    assert model.shapes == [1]  # the queued two never reached the model


def test_stop_waits_for_the_batch_inside_the_model_without_holding_the_event_loop():
    """A drain shorter than one run (a b7 batch takes seconds on a CPU): the batch's clients are refused at
    once, and while stop() waits for the model's thread the loop goes on serving every other model and
    connection of the process. Here the loop itself lets the model finish: a stop() that blocked the loop
    would never let it (the model gives up after 10 s and the test fails)."""
    gate = threading.Event()
    model = Recorder(gate)

    async def main():
        b = Batcher("m", model, max_batch=1, max_delay_s=0.0, max_queue=10)
        b.start()
        inside = asyncio.ensure_future(b.submit([img(3)]))
        await asyncio.sleep(0.05)  # in the model, which waits for the gate
        stopping = asyncio.ensure_future(b.stop())
        (refused,) = await asyncio.gather(inside, return_exceptions=True)
        await asyncio.sleep(0.05)
        still_waiting = not stopping.done()
        gate.set()
        await asyncio.wait_for(stopping, 5)
        return refused, still_waiting

    refused, still_waiting = run(main(), limit_s=20)
    assert isinstance(refused, ShuttingDown)
    assert still_waiting  # stop() returns only once the thread is done with its batch (the session may close)
    assert model.shapes == [1]


def test_stop_gives_its_own_refusal_to_the_queued_and_to_the_waiting_for_room():
    """An unload or a reload stops a model while the server goes on: what it refuses says so, not "the server
    is shutting down" (registry.py passes the refusal)."""
    gate = threading.Event()
    model = Recorder(gate)

    def unloaded():
        return VersionStopped("model 'm' was unloaded before this request ran", retry_after=30)

    async def main():
        b = Batcher("m", model, max_batch=1, max_delay_s=0.0, max_queue=2)
        b.start()
        inside = asyncio.ensure_future(b.submit([img(3)]))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(b.submit([img(4)]))  # the queue is full now: one running, one queued
        await asyncio.sleep(0)
        waiting = asyncio.ensure_future(b.room.reserve_within(1, 10.0))
        peeking = asyncio.ensure_future(b.room.wait_for_room(10.0))
        await asyncio.sleep(0.01)
        assert b.room.waiting == 2
        stopping = asyncio.ensure_future(b.stop(0.0, unloaded))
        out = await asyncio.gather(inside, queued, waiting, peeking, return_exceptions=True)
        gate.set()
        await stopping
        after = await asyncio.gather(b.room.wait_for_room(1.0), return_exceptions=True)
        return out + after

    for e in run(main(), limit_s=20):
        assert isinstance(e, VersionStopped) and e.status == 503, e
        assert str(e) == "model 'm' was unloaded before this request ran" and e.headers["Retry-After"] == "30"


def test_an_idle_batcher_stops_at_once_and_names_its_task():
    async def main():
        loop = asyncio.get_running_loop()
        b = Batcher("b2", Recorder(), max_batch=4, max_delay_s=0.0, max_queue=10)
        b.start()
        names = {t.get_name() for t in asyncio.all_tasks()}
        t0 = loop.time()
        await b.stop(drain_s=5)
        return names, loop.time() - t0

    names, stopped_after = run(main())
    assert "batcher-b2" in names  # what asyncio's task dumps show
    assert stopped_after < 2.0  # nothing ran, nothing is busy


def test_a_wrong_output_shape_is_logged_with_both_shapes(caplog):
    async def main():
        b = Batcher("m", lambda x: np.zeros((1, 10), np.float32), max_batch=4, max_delay_s=0.05, max_queue=10)
        b.start()
        out = await asyncio.gather(b.submit([img(1)]), b.submit([img(2)]), return_exceptions=True)
        await b.stop()
        return out

    with caplog.at_level(logging.ERROR, logger="effnet.batcher"):
        out = run(main())
    assert all(isinstance(o, InferenceFailed) for o in out)
    assert "model m failed on a batch of 2: ValueError: model returned shape (1, 10) for a batch of 2" in caplog.messages


def test_a_reservation_made_before_stop_cannot_submit_after_it():
    async def main():
        b = Batcher("m", Recorder(), max_batch=4, max_delay_s=0.0, max_queue=10)
        b.start()
        room = b.reserve(1)
        await b.stop()
        with pytest.raises(ShuttingDown) as exc:
            await room.submit([img(1)])
        return exc.value

    assert str(run(main())) == "the server is shutting down"


def test_inference_runs_on_the_models_own_thread():
    """One executor per model (named infer-<model> in thread dumps). Which of its threads runs a batch is
    not asserted: an executor allowed more threads may start a second one when a batch is submitted before
    the last one's thread has marked itself idle, at random, and still runs one batch at a time (the loop
    awaits each), so only the name is a behaviour a test can hold to."""
    seen = []

    def model(x):
        seen.append(threading.current_thread().name)
        return np.zeros((x.shape[0], 10), np.float32)

    async def main():
        b = Batcher("b4", model, max_batch=2, max_delay_s=0.0, max_queue=10)
        b.start()
        for _ in range(3):
            await b.submit([img(1)])
        await b.stop()

    run(main())
    assert len(seen) == 3 and all(name.startswith("infer-b4_") for name in seen), seen


def test_a_failing_batch_is_logged_with_the_model_and_the_error(caplog):
    async def main():
        def model(x):
            raise RuntimeError("CUDA out of memory (simulated)")

        b = Batcher("b7", model, max_batch=4, max_delay_s=0.0, max_queue=10)
        b.start()
        with pytest.raises(InferenceFailed) as exc:
            await b.submit([img(1)])
        await b.stop()
        return exc.value

    with caplog.at_level(logging.ERROR, logger="effnet.batcher"):
        exc = run(main())
    assert str(exc) == "inference failed for model 'b7'"
    # One line, and not also the loop's "unexpected error" traceback: a failing model is an expected path.
    assert [r.getMessage() for r in caplog.records if r.name == "effnet.batcher"] == [
        "model b7 failed on a batch of 1: RuntimeError: CUDA out of memory (simulated)"]


def test_an_unexpected_error_in_the_loop_is_logged_and_the_loop_goes_on(caplog):
    """A bug outside the model (here a metrics hook that raises once) is logged with the batcher's name
    and a traceback; the batch's request gets InferenceFailed at once, and the next request is served."""
    calls = []

    def on_batch(n, seconds):
        calls.append(n)
        if len(calls) == 1:
            raise RuntimeError("hook bug (simulated)")

    async def main():
        b = Batcher("m", Recorder(), max_batch=4, max_delay_s=0.0, max_queue=10, observer=BatchObserver(ran=on_batch))
        b.start()
        victim = asyncio.ensure_future(b.submit([img(1)]))
        done, _ = await asyncio.wait([victim], timeout=2.0)
        assert victim in done, "the batch's client was left waiting"
        with pytest.raises(InferenceFailed) as exc:
            victim.result()
        assert str(exc.value) == "inference failed for model 'm'"
        out = await b.submit([img(2)])
        await b.stop()
        return out

    with caplog.at_level(logging.ERROR, logger="effnet.batcher"):
        out = run(main())
    assert answer(out) == [2] and calls == [1, 1]
    records = [r for r in caplog.records if r.getMessage() == "batcher m: unexpected error"]
    assert len(records) == 1 and records[0].exc_info and "hook bug (simulated)" in caplog.text


def test_the_cost_per_image_is_a_smoothed_average_of_the_batches(monkeypatch):
    """per_image_s prices a queue for the router and for Retry-After: the first batch's seconds per image,
    then an exponential average weighing each new batch 0.2. The batcher's perf_counter is a clock that
    only the fake model moves (from 1000 s, so a sum of two readings is no small number): every duration
    it reports is then exact, whatever the machine's load."""
    import types

    import effnet_serve.engine.batcher as batcher_module
    clock = [1000.0]
    real = batcher_module.time
    monkeypatch.setattr(batcher_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0], monotonic=real.monotonic))
    cost = [0.1]  # seconds per image, as the fake model takes them

    def model(x):
        clock[0] += cost[0] * x.shape[0]
        return np.zeros((x.shape[0], 10), np.float32)

    async def main():
        b = Batcher("m", model, max_batch=4, max_delay_s=0.0, max_queue=10)
        b.start()
        assert b.per_image_s == 0.0 and b.batches_run == 0
        seen = []
        for n, c in ((2, 0.1), (4, 0.3), (1, 0.3)):
            cost[0] = c
            out = await b.submit([img(1)] * n)
            assert len(out) == n and out[0].inference_s == pytest.approx(c * n)
            assert out[0].queue_s == 0.0  # no model ran between its arrival and its batch
            assert out[0].logits.shape == (10,) and out[0].batch_size == n
            seen.append(b.per_image_s)
        runs = b.batches_run
        assert b.queued == 0 and b.depth == 0  # nothing admitted is left counted once it is answered
        await b.stop()
        return seen, runs

    seen, runs = run(main())
    assert runs == 3
    assert seen[0] == pytest.approx(0.1)
    assert seen[1] == pytest.approx(0.8 * 0.1 + 0.2 * 0.3)
    assert seen[2] == pytest.approx(0.8 * seen[1] + 0.2 * 0.3)


def test_stop_with_a_drain_returns_at_once_when_nothing_is_left():
    model = Recorder()

    async def main():
        loop = asyncio.get_running_loop()
        b = Batcher("m", model, max_batch=4, max_delay_s=0.0, max_queue=10)
        b.start()
        await b.submit([img(1)])
        await b.submit([img(2), img(3)])
        t0 = loop.time()
        await b.stop(drain_s=5)
        return loop.time() - t0

    assert run(main()) < 2.0  # the drain is an upper bound, not a pause


def test_room_reserved_before_stop_is_honoured_while_the_drain_runs():
    """A request that held queue room when shutdown began (its images still decoding) is answered if it
    submits within the drain; the drain waits for it."""

    async def main():
        b = Batcher("m", Recorder(), max_batch=4, max_delay_s=0.0, max_queue=10)
        b.start()
        room = b.reserve(1)
        stopping = asyncio.ensure_future(b.stop(drain_s=5))
        await asyncio.sleep(0.1)  # stop() has begun and is draining
        assert not stopping.done()  # waiting for the reserved image
        out = await room.submit([img(6)])
        await stopping
        return out

    assert answer(run(main())) == [6]


def test_a_hook_that_raises_while_a_batch_is_taken_costs_no_client_its_answer(caplog):
    """A metrics hook called while a batch is taken (here on_expired) that raises is logged, and neither
    the live image taken in the same batch nor the loop is lost: the items are already off the queue
    when the hooks run, so the error must stop there. (The expired image's client was told first.)"""

    def on_expired(n):
        raise RuntimeError("hook bug (simulated)")

    async def main():
        loop = asyncio.get_running_loop()
        b = Batcher("m", Recorder(), max_batch=4, max_delay_s=0.0, max_queue=10, timeout_s=10.0,
                    observer=BatchObserver(expired=on_expired))
        late = asyncio.ensure_future(b.submit([img(1)], arrived=loop.time() - 100.0))
        live = asyncio.ensure_future(b.submit([img(2)]))
        await asyncio.sleep(0)
        assert b.depth == 2  # both queued before the loop runs: one take holds both
        b.start()
        done, _ = await asyncio.wait([late, live], timeout=5.0)  # answered in milliseconds by a live loop
        assert late in done and live in done, "a client of the take whose hook raised was never answered"
        with pytest.raises(DeadlineExceeded):
            late.result()
        after = asyncio.ensure_future(b.submit([img(3)]))
        done, _ = await asyncio.wait([after], timeout=5.0)
        assert after in done, "the batcher's loop ended with the hook's error"
        await b.stop()
        return live.result(), after.result()

    with caplog.at_level(logging.ERROR, logger="effnet.batcher"):
        first, then = run(main())
    assert answer(first) == [2] and answer(then) == [3]
    assert [r.getMessage() for r in caplog.records if r.name == "effnet.batcher"] == ["batcher m: a metrics hook failed"]


def test_a_failure_while_a_batch_is_taken_answers_its_clients_and_the_loop_goes_on(caplog):
    """Anything that raises after the items left the queue (here the queue room's grant) answers the
    items taken with the 500 of a failed inference, instead of leaving them waiting, and the loop serves
    the next request."""

    async def main():
        b = Batcher("m", Recorder(), max_batch=4, max_delay_s=0.0, max_queue=10, timeout_s=10.0)
        grant = b.room.grant
        failures = [RuntimeError("queue-room bug (simulated)")]

        def flaky_grant():
            if failures:
                raise failures.pop()
            grant()

        b.room.grant = flaky_grant
        b.start()
        taken = asyncio.ensure_future(b.submit([img(1)]))
        done, _ = await asyncio.wait([taken], timeout=5.0)  # answered in milliseconds by a live loop
        assert taken in done, "the client of a take that failed was never answered"
        with pytest.raises(InferenceFailed, match="inference failed for model 'm'"):
            taken.result()
        after = asyncio.ensure_future(b.submit([img(2)]))
        done, _ = await asyncio.wait([after], timeout=5.0)
        assert after in done, "the batcher's loop ended with the take's error"
        await b.stop()
        return after.result()

    with caplog.at_level(logging.ERROR, logger="effnet.batcher"):
        out = run(main())
    assert answer(out) == [2]
    assert [r.getMessage() for r in caplog.records if r.name == "effnet.batcher"] == ["batcher m: unexpected error"]


def test_work_submitted_before_start_waits_for_it():
    """A batcher queues work from the moment it exists and serves it once started; only stop() makes it
    refuse work (which is why enqueue_reserved checks `_closing` and not just for a missing loop task)."""

    async def main():
        b = Batcher("m", Recorder(), max_batch=4, max_delay_s=0.0, max_queue=10)
        early = asyncio.ensure_future(b.submit([img(3)]))
        await asyncio.sleep(0)  # submit() has queued it; no loop takes it yet
        assert not early.done() and b.depth == 1
        b.start()
        out = await early
        await b.stop()
        return out

    assert answer(run(main())) == [3]
