"""The dynamic batcher on its own, with fake run functions (same signature as the session's)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from effnet_serve.engine.batcher import Batcher, batch_sizes, softmax
from effnet_serve.engine.observe import BatchObserver
from effnet_serve.core.errors import DeadlineExceeded, InferenceFailed, Overloaded, ShuttingDown

SHAPE = (3, 2, 2)


def img(value: float) -> np.ndarray:
    return np.full(SHAPE, value, dtype=np.float32)


class Recorder:
    """A model: logits put all mass on class int(mean of the image); records batch shapes."""

    def __init__(self, gate: threading.Event | None = None, fail_when=None) -> None:
        self.shapes: list[int] = []
        self.gate = gate
        self.fail_when = fail_when

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.gate is not None:
            assert self.gate.wait(10)
        self.shapes.append(x.shape[0])
        if self.fail_when is not None and self.fail_when(x):
            raise RuntimeError("boom")
        logits = np.zeros((x.shape[0], 10), dtype=np.float32)
        logits[np.arange(x.shape[0]), x.reshape(x.shape[0], -1).mean(axis=1).astype(int) % 10] = 50.0
        return logits


def run(coro, limit_s: float = 10.0):
    """Run a test's coroutine on a fresh event loop, in a thread of its own. A wrong batcher can block
    its loop for good (a `while` that never awaits): no asyncio timeout fires then, but this thread's
    join does, and the test fails saying so instead of hanging until a runner kills it. Every test here
    takes well under 2 s; the limit is only for a loop that never finishes."""
    box: dict = {}

    def main() -> None:
        try:
            box["result"] = asyncio.run(asyncio.wait_for(coro, limit_s))
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread below
            box["error"] = exc

    thread = threading.Thread(target=main, name="test-event-loop", daemon=True)
    thread.start()
    thread.join(limit_s + 2.0)
    if thread.is_alive():
        pytest.fail(f"the event loop was still busy after {limit_s + 2:g} s: something blocks it without awaiting")
    if "error" in box:
        raise box["error"]
    return box["result"]


def test_batch_sizes_are_powers_of_two_capped_by_max():
    assert batch_sizes(1) == [1]
    assert batch_sizes(8) == [1, 2, 4, 8]
    assert batch_sizes(6) == [1, 2, 4, 6]
    assert batch_sizes(32) == [1, 2, 4, 8, 16, 32]


def test_softmax_rows_sum_to_one_and_keep_order():
    p = softmax(np.array([[1.0, 3.0, 2.0], [1000.0, 0.0, -1000.0]], dtype=np.float32))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    assert list(np.argsort(-p[0])) == [1, 2, 0]
    assert p[1, 0] == pytest.approx(1.0)


def test_each_request_gets_its_own_answer_in_batches_up_to_max():
    model = Recorder()

    async def main():
        b = Batcher("m", model, max_batch=4, max_delay_s=0.05, max_queue=100)
        b.start()
        results = await asyncio.gather(*(b.submit([img(i)]) for i in range(10)))
        await b.stop()
        return results

    results = run(main())
    assert [int(np.argmax(r[0].probs)) for r in results] == [i % 10 for i in range(10)]
    assert max(model.shapes) == 4
    assert sum(model.shapes) == 10
    assert all(s in (1, 2, 4) for s in model.shapes)  # only fixed shapes reach the model
    assert results[0][0].batch_size == 4


def test_a_partial_batch_waits_for_announced_images_but_at_most_the_delay():
    """Images announced (admitted, still decoding) that never arrive hold a batch for the delay, no longer."""
    model = Recorder()
    delay = 0.3

    async def main():
        loop = asyncio.get_running_loop()
        b = Batcher("m", model, max_batch=8, max_delay_s=delay, max_queue=100)
        b.start()
        release = asyncio.Event()

        async def announced_but_never_sent():
            with b.reserve(3):  # room held for three images that are never submitted
                await release.wait()

        announcer = asyncio.create_task(announced_but_never_sent())
        await asyncio.sleep(0)
        assert b.queued == 3  # the wait path is the one under test
        t0 = loop.time()
        first = await b.submit([img(1)])
        waited = loop.time() - t0
        announced_still = not announcer.done()
        release.set()
        await announcer
        await b.stop()
        return first, waited, announced_still

    first, waited, announced_still = run(main())
    assert first[0].batch_size == 1 and model.shapes == [1]
    assert announced_still  # it ran because the delay was over, not because the announcement ended
    assert waited >= delay * 0.9  # it did wait for the announced company ...
    assert waited < delay + 5.0  # ... and not for ever (generous: a bound, not a speed goal)


def test_without_padding_the_leftover_runs_next_and_with_padding_zeros_fill_the_shape():
    for pad, expected in ((False, [4, 1]), (True, [8])):
        gate = threading.Event()
        model = Recorder(gate)

        async def main(pad=pad, model=model, gate=gate):
            b = Batcher("m", model, max_batch=8, max_delay_s=0.0, max_queue=100, pad=pad)
            b.start()
            blocker = asyncio.ensure_future(b.submit([img(0)]))
            await asyncio.sleep(0.05)  # the blocker is now inside the model
            rest = asyncio.gather(*(b.submit([img(i)]) for i in range(1, 6)))
            await asyncio.sleep(0.01)
            gate.set()
            out = await rest
            await blocker
            await b.stop()
            return out

        out = run(main())
        assert model.shapes[1:] == expected, pad
        assert [int(np.argmax(r[0].probs)) for r in out] == [1, 2, 3, 4, 5]


def test_full_queue_is_refused_at_once_and_multi_image_requests_are_all_or_nothing():
    gate = threading.Event()
    model = Recorder(gate)

    async def main():
        # max_queue counts every image admitted and not yet answered: the running one too.
        b = Batcher("m", model, max_batch=1, max_delay_s=0.0, max_queue=4)
        b.start()
        first = asyncio.ensure_future(b.submit([img(0)]))
        await asyncio.sleep(0.05)  # taken by the loop, blocked in the model
        queued = [asyncio.ensure_future(b.submit([img(i)])) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await b.submit([img(3), img(4)])  # 1 running + 2 queued + 2 > 4: none of them is queued
        assert b.depth == 2 and b.queued == 3
        third = asyncio.ensure_future(b.submit([img(5)]))  # exactly fills the queue
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as exc:
            await b.submit([img(6)])
        gate.set()
        results = await asyncio.gather(first, *queued, third)
        await b.stop()
        return exc.value, results

    exc, results = run(main())
    assert exc.status == 503 and exc.headers["Retry-After"]
    assert [int(np.argmax(r[0].probs)) for r in results] == [0, 1, 2, 5]


def test_cancelled_requests_are_skipped_and_do_not_poison_the_batch():
    gate = threading.Event()
    model = Recorder(gate)

    async def main():
        b = Batcher("m", model, max_batch=8, max_delay_s=0.0, max_queue=100)
        b.start()
        blocker = asyncio.ensure_future(b.submit([img(0)]))
        await asyncio.sleep(0.05)
        tasks = [asyncio.ensure_future(b.submit([img(i)])) for i in range(1, 5)]
        await asyncio.sleep(0)
        tasks[1].cancel()  # the client of image 2 went away while queued
        tasks[2].cancel()
        gate.set()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        await blocker
        await b.stop()
        return done

    done = run(main())
    assert isinstance(done[1], asyncio.CancelledError) and isinstance(done[2], asyncio.CancelledError)
    assert int(np.argmax(done[0][0].probs)) == 1 and int(np.argmax(done[3][0].probs)) == 4
    assert model.shapes == [1, 2]  # the two cancelled images never reached the model


def test_a_failing_batch_fails_only_its_own_requests_and_the_loop_goes_on():
    gate = threading.Event()
    model = Recorder(gate, fail_when=lambda x: bool((x == 7).any()))

    async def main():
        b = Batcher("m", model, max_batch=4, max_delay_s=0.0, max_queue=100)
        b.start()
        blocker = asyncio.ensure_future(b.submit([img(0)]))
        await asyncio.sleep(0.05)
        doomed = [asyncio.ensure_future(b.submit([img(v)])) for v in (7, 1)]  # one batch of 2
        await asyncio.sleep(0)
        gate.set()
        failed = await asyncio.gather(*doomed, return_exceptions=True)
        after = await b.submit([img(3)])
        await blocker
        await b.stop()
        return failed, after

    failed, after = run(main())
    assert all(isinstance(f, InferenceFailed) and f.status == 503 for f in failed)
    assert int(np.argmax(after[0].probs)) == 3


def test_wrong_output_shape_is_an_inference_failure_not_a_crash():
    async def main():
        b = Batcher("m", lambda x: np.zeros((1, 10), np.float32), max_batch=4, max_delay_s=0.05, max_queue=10)
        b.start()
        out = await asyncio.gather(b.submit([img(1)]), b.submit([img(2)]), return_exceptions=True)
        await b.stop()
        return out

    assert all(isinstance(o, InferenceFailed) for o in run(main()))


def test_one_slow_model_does_not_block_another_models_queue():
    slow_gate = threading.Event()
    slow, fast = Recorder(slow_gate), Recorder()

    async def main():
        a = Batcher("slow", slow, max_batch=1, max_delay_s=0.0, max_queue=10)
        b = Batcher("fast", fast, max_batch=1, max_delay_s=0.0, max_queue=10)
        a.start()
        b.start()
        stuck = asyncio.ensure_future(a.submit([img(1)]))
        await asyncio.sleep(0.05)
        answers = [await b.submit([img(i)]) for i in range(3)]  # while `slow` is still inside its model
        assert not stuck.done()
        slow_gate.set()
        await stuck
        await a.stop()
        await b.stop()
        return answers

    answers = run(main())
    assert [int(np.argmax(r[0].probs)) for r in answers] == [0, 1, 2]


def test_requests_past_their_deadline_never_reach_the_model():
    gate = threading.Event()
    model = Recorder(gate)
    expired_counts: list[int] = []

    async def main():
        # 0.5 s: the blocker and the fresh one are taken within it however busy the machine is
        b = Batcher("m", model, max_batch=4, max_delay_s=0.0, max_queue=10, timeout_s=0.5,
                    observer=BatchObserver(expired=expired_counts.append))
        b.start()
        blocker = asyncio.ensure_future(b.submit([img(0)]))
        await asyncio.sleep(0.02)
        late = asyncio.ensure_future(b.submit([img(5)]))
        await asyncio.sleep(0)  # queued (its deadline running) before the wait below begins
        await asyncio.sleep(0.7)  # longer than the deadline, stuck behind the blocker
        gate.set()
        out = await asyncio.gather(late, return_exceptions=True)
        await blocker
        fresh = await b.submit([img(6)])
        await b.stop()
        return out[0], fresh

    late, fresh = run(main())
    assert isinstance(late, DeadlineExceeded) and late.status == 503
    assert expired_counts == [1]
    assert model.shapes == [1, 1]  # the blocker and the fresh one; the late one was dropped
    assert int(np.argmax(fresh[0].probs)) == 6


def test_stop_drains_the_queue_then_refuses_new_work():
    model = Recorder()

    async def main():
        b = Batcher("m", model, max_batch=2, max_delay_s=0.01, max_queue=10)
        b.start()
        pending = [asyncio.ensure_future(b.submit([img(i)])) for i in range(5)]
        await asyncio.sleep(0)
        await b.stop(drain_s=5)
        results = await asyncio.gather(*pending)
        with pytest.raises(ShuttingDown):
            await b.submit([img(1)])
        return results

    results = run(main())
    assert [int(np.argmax(r[0].probs)) for r in results] == [0, 1, 2, 3, 4]


def test_warm_up_runs_every_batch_shape():
    model = Recorder()
    b = Batcher("m", model, max_batch=6)
    b.warm_up(SHAPE)
    assert model.shapes == [1, 2, 4, 6]


def test_a_lone_request_runs_at_once_but_waits_for_announced_images():
    model = Recorder()

    async def main():
        loop = asyncio.get_running_loop()
        b = Batcher("m", model, max_batch=8, max_delay_s=5.0, max_queue=100)
        b.start()
        t0 = loop.time()
        alone = await b.submit([img(1)])  # nothing else on its way: no reason to wait 5 s
        alone_s = loop.time() - t0

        async def decoded_later():
            with b.reserve(1) as room:  # admitted, still decoding
                await asyncio.sleep(0.05)
                return await room.submit([img(2)])

        late = asyncio.create_task(decoded_later())
        await asyncio.sleep(0)  # the announcement is made before the first image arrives
        first = await b.submit([img(3)])
        await late
        await b.stop()
        return alone_s, alone, first

    alone_s, alone, first = run(main())
    assert alone[0].batch_size == 1 and alone_s < 2.5
    assert first[0].batch_size == 2  # it waited for the announced image instead of running alone


def test_clients_answered_together_are_batched_together_again():
    """Two groups of closed-loop clients: the group answered by a run sends again while the other group waits in
    the queue; the collector waits for it (up to the delay) instead of running two half batches per round."""
    gate = threading.Event()
    model = Recorder(gate)

    async def main():
        loop = asyncio.get_running_loop()
        b = Batcher("m", model, max_batch=8, max_delay_s=5.0, max_queue=100)
        b.start()

        async def client(value: float, rounds: int) -> list[int]:
            sizes = []
            for _ in range(rounds):
                sizes.append((await b.submit([img(value)]))[0].batch_size)
            return sizes

        first = [asyncio.create_task(client(v, 2)) for v in (1, 2)]  # answered by the first run, then send again
        await asyncio.sleep(0.05)  # taken by the loop, blocked in the model
        assert b.depth == 0 and b.queued == 2
        second = [asyncio.create_task(client(v, 1)) for v in (3, 4)]  # queued while the first run computes
        await asyncio.sleep(0.01)
        assert b.depth == 2
        gate.set()
        t0 = loop.time()
        sizes = await asyncio.gather(*first, *second)
        waited = loop.time() - t0
        await b.stop()
        return sizes, waited

    sizes, waited = run(main())
    assert model.shapes == [2, 4]  # not [2, 2, 2]: the queued pair waited for the pair just answered
    assert sizes == [[2, 4], [2, 4], [4], [4]]
    assert waited < 2.5  # and no longer than for them: the delay is 5 s (a bound, not a speed goal)


def test_after_a_run_the_queue_waits_for_the_answered_clients_at_most_the_delay():
    """Nobody answered by the run comes back: the queued requests run once the delay after the run is over."""
    gate = threading.Event()
    model = Recorder(gate)
    delay = 0.3

    async def main():
        loop = asyncio.get_running_loop()
        b = Batcher("m", model, max_batch=8, max_delay_s=delay, max_queue=100)
        b.start()
        first = asyncio.create_task(b.submit([img(1)]))
        await asyncio.sleep(0.05)  # taken by the loop, blocked in the model
        assert b.depth == 0 and b.queued == 1
        queued = asyncio.create_task(b.submit([img(2)]))
        await asyncio.sleep(0.01)
        assert b.depth == 1
        gate.set()
        await first
        t0 = loop.time()
        answer = await queued
        waited = loop.time() - t0
        alone_t0 = loop.time()
        alone = await b.submit([img(3)])  # the run before it left an empty queue: no reason to wait
        alone_s = loop.time() - alone_t0
        await b.stop()
        return answer, waited, alone, alone_s

    answer, waited, alone, alone_s = run(main())
    assert model.shapes == [1, 1, 1] and answer[0].batch_size == 1
    assert waited >= delay * 0.8  # it gave the answered client its chance ...
    assert waited < delay + 5.0  # ... and not for ever (generous: a bound, not a speed goal)
    assert alone[0].batch_size == 1 and alone_s < delay * 0.8


@pytest.mark.parametrize("pad, images, shapes", [(False, 3, [2, 1]), (True, 10, [8, 2])])
def test_a_lone_request_split_over_two_runs_does_not_wait_for_itself(pad, images, shapes):
    """A request with more images than one run takes (3 without padding: runs of 2 then 1; 10 with batches of
    8) on an idle model: the images left after the first run are the rest of the same request, whose client is
    not answered yet and cannot send again. They run at once, not after the delay (5 s here) spent waiting for
    "the clients the run answered"."""
    model = Recorder()

    async def main():
        loop = asyncio.get_running_loop()
        b = Batcher("m", model, max_batch=8, max_delay_s=5.0, max_queue=100, pad=pad)
        b.start()
        t0 = loop.time()
        out = await b.submit([img(i) for i in range(images)])
        took = loop.time() - t0
        await b.stop()
        return out, took

    out, took = run(main(), limit_s=20.0)
    assert model.shapes == shapes and [int(np.argmax(r.probs)) for r in out] == [i % 10 for i in range(images)]
    assert took < 2.5  # not the 5 s delay
